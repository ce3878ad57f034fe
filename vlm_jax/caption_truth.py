"""Whether a caption is true of an image: which image-caption pairs are real negatives, and which captions a
retrieval oracle would accept for an image.

A sampled "negative" caption is often true of the image too ("the red circle is left of the blue square" holds in
every image where such a pair stands so). Matching (ITM) and contrastive (ITC) losses that push such pairs apart
learn noise; the ITM evaluation would count correct answers as errors. So every pair gets a truth value:

    TRUE       the caption holds for the image;
    AMBIGUOUS  the image's scene supports the caption under a reasonable reading but not under the dataset's
               labelling rule (the two objects' offset has no clear dominant axis, so "left of" and "above" both
               describe it): neither a positive nor a negative;
    FALSE      the caption is false for the image: a true negative.

Rules for (image i, caption j), first match wins:
  1. image i is caption j's image (same `image_id`)                                         -> TRUE
  2. caption j's normalised text equals one of image i's captions (`text_key`)              -> TRUE
  3. image i's scene is known (its objects' name keys and boxes, e.g. `spatial_shapes`) and caption j states a
     relation between a named subject and a named reference:
       either object not in image i                                                          -> FALSE
       else by `relations.relation_from_boxes` of their boxes in image i: the caption's relation -> TRUE;
       a direction when the offset's dominant axis is unclear (`relations.CLEAR_AXIS_MARGIN`) and the caption
       names one of the two candidate directions                                             -> AMBIGUOUS;
       anything else                                                                         -> FALSE
  4. otherwise (no scene knowledge: COCO, RefCOCO)                                           -> FALSE

Batch fields (written by the pipeline, `vlm_jax.data.pipeline`): caption_key int32[B] (`text_key` of the caption),
subject_key, reference_key int32[B] (`text_key` of the named objects, -1 when absent), relation int32[B],
has_relation bool[B], scene_keys int32[B, N] (the image's objects, -1 padding; N = 0 without scene knowledge),
scene_boxes float32[B, N, 4] (normalised xyxy), image_aspect float32[B] (width / height: directions are judged in
the image's own proportions, so boxes are scaled back before comparing offsets along x and y).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from vlm_jax.data.datasets import relations as rel

FALSE, TRUE, AMBIGUOUS = 0, 1, 2
NO_KEY = -1
CAPTION_FIELDS = ("caption_key", "subject_key", "reference_key", "relation", "has_relation")
SCENE_FIELDS = ("scene_keys", "scene_boxes", "image_aspect")


def normalise_text(text: str) -> str:
    """Lower case, single spaces, no surrounding space or final full stop: how captions are compared."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .")


def text_key(text: str) -> int:
    """A non-negative int32 key of the normalised text (CRC-32; equal texts, equal keys)."""
    return zlib.crc32(normalise_text(text).encode("utf-8")) & 0x7FFFFFFF


def relation_truth(relation, subject_box, reference_box):
    """int32[...] truth of "subject <relation> reference" given the two boxes (xyxy, same units).

    relation int[...], subject_box and reference_box float[..., 4] -> TRUE / AMBIGUOUS / FALSE (see the module
    docstring, rule 3).
    """
    s, r = subject_box, reference_box
    s_in_r = (r[..., 0] <= s[..., 0]) & (r[..., 1] <= s[..., 1]) & (s[..., 2] <= r[..., 2]) & (s[..., 3] <= r[..., 3])
    r_in_s = (s[..., 0] <= r[..., 0]) & (s[..., 1] <= r[..., 1]) & (r[..., 2] <= s[..., 2]) & (r[..., 3] <= s[..., 3])
    dx = (s[..., 0] + s[..., 2] - r[..., 0] - r[..., 2]) / 2
    dy = (s[..., 1] + s[..., 3] - r[..., 1] - r[..., 3]) / 2
    horizontal = jnp.where(dx > 0, rel.RIGHT, rel.LEFT)
    vertical = jnp.where(dy > 0, rel.BELOW, rel.ABOVE)
    major, minor = jnp.maximum(jnp.abs(dx), jnp.abs(dy)), jnp.minimum(jnp.abs(dx), jnp.abs(dy))
    clear = (major >= rel.CLEAR_AXIS_MARGIN * minor) & (major > 0)
    label = jnp.where(s_in_r, rel.INSIDE, jnp.where(r_in_s, rel.OUTSIDE,
                      jnp.where(jnp.abs(dx) >= jnp.abs(dy), horizontal, vertical)))
    nested = s_in_r | r_in_s
    directional = (relation != rel.INSIDE) & (relation != rel.OUTSIDE)
    coinciding = major == 0  # centres coincide: any direction could be said
    candidate = directional & (coinciding | (relation == horizontal) | (relation == vertical))
    ambiguous = ~nested & ~clear & candidate
    return jnp.where(ambiguous, AMBIGUOUS, jnp.where(relation == label, TRUE, FALSE)).astype(jnp.int32)


def _object_box(scene_keys, scene_boxes, key):
    """scene int[I, N], float[I, N, 4]; key int[T] -> (bool[I, T] present, float32[I, T, 4] its box)."""
    match = (scene_keys[:, None, :] == key[None, :, None]) & (key[None, :, None] != NO_KEY)  # [I, T, N]
    box = jnp.einsum("itn,inc->itc", match.astype(jnp.float32), scene_boxes.astype(jnp.float32))
    return jnp.any(match, axis=-1), box


def truth_matrix(images: Mapping, captions: Mapping, own_text=None):
    """int32[I, T]: truth of caption t for image i (TRUE / AMBIGUOUS / FALSE).

    images: image_id int[I], and optionally scene_keys int[I, N], scene_boxes float[I, N, 4] and image_aspect
    float[I] (width / height; 1 when absent).
    captions: image_id int[T], and optionally the `CAPTION_FIELDS`.
    own_text: optional bool[I, T], caption t's text equals one of image i's captions (rule 2).
    Works on numpy or jax arrays (inside or outside jit).
    """
    truth = jnp.where(images["image_id"][:, None] == captions["image_id"][None, :], TRUE, FALSE)
    if own_text is not None:
        truth = jnp.where(own_text, TRUE, truth)
    scene_keys = images.get("scene_keys")
    if scene_keys is None or scene_keys.shape[-1] == 0 or "subject_key" not in captions:
        return truth.astype(jnp.int32)
    boxes = jnp.asarray(images["scene_boxes"], jnp.float32)
    if images.get("image_aspect") is not None:  # x in units of the image height, like y
        aspect = jnp.asarray(images["image_aspect"], jnp.float32)[:, None, None]
        boxes = boxes * jnp.concatenate([aspect, jnp.ones_like(aspect)] * 2, axis=-1)
    has_s, box_s = _object_box(scene_keys, boxes, captions["subject_key"])
    has_r, box_r = _object_box(scene_keys, boxes, captions["reference_key"])
    stated = captions["has_relation"].astype(bool) & (captions["subject_key"] != NO_KEY) & (
        captions["reference_key"] != NO_KEY)  # [T]
    known = jnp.any(scene_keys != NO_KEY, axis=-1)  # [I]
    by_scene = jnp.where(has_s & has_r, relation_truth(captions["relation"][None, :], box_s, box_r), FALSE)
    return jnp.where((truth == FALSE) & known[:, None] & stated[None, :], by_scene, truth).astype(jnp.int32)


def batch_truth(batch: Mapping):
    """int32[B, B] truth of caption row j for image row i of a batch (one caption per row; rows with the same
    image_id show the same image)."""
    images = {k: batch[k] for k in ("image_id", *SCENE_FIELDS) if k in batch}
    captions = {k: batch[k] for k in ("image_id", *CAPTION_FIELDS) if k in batch}
    own_text = None
    if "caption_key" in batch:
        # Image i has caption j's text when some row k shows image i and has that text: [B, B] @ [B, B], so no
        # [B, B, B] intermediate at large global batches.
        same_image = batch["image_id"][:, None] == batch["image_id"][None, :]
        same_text = batch["caption_key"][:, None] == batch["caption_key"][None, :]
        own_text = (same_image.astype(jnp.float32) @ same_text.astype(jnp.float32)) > 0
    return truth_matrix(images, captions, own_text)


def split_truth(collected: Mapping[str, np.ndarray], chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth over a split's collected rows (one row per caption): (int8[I, T] truth of caption t for distinct
    image i, int[I] the image ids in increasing order, int[T] each caption's image row)."""
    ids, first, text_to_image = np.unique(collected["image_id"], return_index=True, return_inverse=True)
    text_to_image = text_to_image.reshape(-1)
    images = {"image_id": ids}
    images.update({k: np.asarray(collected[k])[first] for k in SCENE_FIELDS if k in collected})
    captions = {k: np.asarray(collected[k]) for k in ("image_id", *CAPTION_FIELDS) if k in collected}
    own_text = None
    if "caption_key" in collected:
        # has_text[i, u]: image i has a caption with distinct text u; caption t's column is its text's.
        _, text_index = np.unique(captions["caption_key"], return_inverse=True)
        text_index = text_index.reshape(-1)
        has_text = np.zeros((len(ids), text_index.max(initial=0) + 1), bool)
        has_text[text_to_image, text_index] = True
        own_text = has_text[:, text_index]  # [I, T]
    blocks = [np.asarray(truth_matrix({k: v[start:start + chunk] for k, v in images.items()}, captions,
                                      None if own_text is None else own_text[start:start + chunk]), np.int8)
              for start in range(0, len(ids), chunk)]
    return np.concatenate(blocks), ids, text_to_image
