"""Losses of the multitask model: contrastive (ITC), matching (ITM), box (L1 + GIoU), spatial relation.

Every loss is a pure function of arrays that returns a dict of named scalar terms ("loss" is the one to optimise).
`total_loss(outputs, batch, weights)` combines them with weights from the config.

Shapes: B batch, E embedding width, C classes.

Global batch: the contrastive and matching losses compare every image with every text of the batch they are given.
Under `jax.jit` with a batch sharded over devices the arrays are global, so the [B, B] similarity matrix spans the
global batch (XLA inserts the gathers): the loss is the global-batch loss, not a per-device one.

Bad input policy:
  * Masked-out positions (no box, no relation, invalid ITM negative) are ignored even if they hold NaN/inf: they are
    replaced by a harmless constant with `jnp.where` before any arithmetic, so they add neither value nor gradient.
    (Multiplying by a 0/1 mask would not do: NaN * 0 = NaN.)
  * Non-finite values at valid positions are NOT sanitised: they propagate to a non-finite total, which the train
    step's finite check (skip the update or fail fast, per config) sees. Silently clipping would hide broken data or
    a diverged model.
  * Empty batches (B = 0) and batches with no valid box / relation / negative give a 0 term with 0 gradient.
  * Boxes with x2 < x1 follow `box_ops`' clamp policy (an inverted side counts as empty).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import box_ops

# Logit used to remove an entry from a softmax; finite so that no inf - inf can appear.
_NEG = -1e9


def default_loss_config() -> ml_collections.ConfigDict:
    """Loss weights. The defaults reproduce the seed recipe: ITC + ITM + 0.1 L1(box) + 0.1 CE(spatial).

    `box` multiplies the whole box term `box_l1 * L1 + box_giou * (1 - GIoU)`; the seed recipe has no GIoU term
    (box_giou = 0; GIoU is still computed and logged). `matryoshka` > 0 adds the mean contrastive loss over the nested
    widths `matryoshka_dims` (each must be <= the embedding width).
    """
    return ml_collections.ConfigDict(dict(
        itc=1.0, itm=1.0, box=0.1, spatial=0.1,
        box_l1=1.0, box_giou=0.0,
        matryoshka=0.0, matryoshka_dims=(32, 64, 128, 256),
    ))


def l2_normalize(x, axis=-1, eps=1e-6):
    """x / max(||x||, eps) along `axis`, in float32; a zero vector stays zero with a finite gradient."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _same_image(image_ids, batch):
    """bool[B, B]: pair (i, j) shows the same image. Without ids only the diagonal does."""
    if image_ids is None:
        return jnp.eye(batch, dtype=bool)
    return image_ids[:, None] == image_ids[None, :]


def contrastive_logits(image_emb, text_emb, logit_scale):
    """float[B, E] x float[B, E] x float[] -> float32[B, B] scaled cosine similarities (row = image, col = text)."""
    return logit_scale * (l2_normalize(image_emb) @ l2_normalize(text_emb).T)


def contrastive_loss(image_emb, text_emb, logit_scale, image_ids=None, valid=None):
    """Symmetric InfoNCE (CLIP) over the (global) batch.

    Args:
      image_emb: float[B, E] image embeddings (normalised here).
      text_emb: float[B, E] text embeddings of the paired captions (normalised here).
      logit_scale: float[] multiplier of the cosine similarities (the model's exp(log_scale), already clipped).
      image_ids: optional int[B]; pairs j != i with image_ids[j] == image_ids[i] (another caption of the same image)
        are removed from i's negatives instead of being pushed away as false negatives.
      valid: optional bool[B]; rows with False (padding) are neither queries nor negatives.
    Returns:
      {"loss": (i2t + t2i) / 2, "i2t": float[], "t2i": float[]}; all 0 for B = 0 or no valid row.
    """
    batch = image_emb.shape[0]
    if batch == 0:
        zero = jnp.zeros((), jnp.float32)
        return {"loss": zero, "i2t": zero, "t2i": zero}
    valid = jnp.ones(batch, bool) if valid is None else valid.astype(bool)
    logits = contrastive_logits(image_emb, text_emb, logit_scale)  # [B, B]
    off_diag = ~jnp.eye(batch, dtype=bool)
    remove = (_same_image(image_ids, batch) | ~valid[:, None] | ~valid[None, :]) & off_diag
    logits = jnp.where(remove, _NEG, logits)
    diag = jnp.diagonal(logits)
    i2t = _masked_mean(jax.nn.logsumexp(logits, axis=1) - diag, valid)
    t2i = _masked_mean(jax.nn.logsumexp(logits, axis=0) - diag, valid)
    return {"loss": 0.5 * (i2t + t2i), "i2t": i2t, "t2i": t2i}


def matryoshka_contrastive_loss(image_emb, text_emb, logit_scale, dims, image_ids=None, valid=None):
    """Mean contrastive loss over nested prefixes of the embeddings (Matryoshka representation learning).

    Args: as `contrastive_loss`, plus `dims`: increasing widths, each <= E; prefix [:, :d] is re-normalised.
    Returns: {"loss": mean over dims, "d{d}": loss at width d for each d}.
    """
    width = image_emb.shape[-1]
    if not dims or any(d <= 0 or d > width for d in dims):
        raise ValueError(f"matryoshka_dims: expected widths in (0, {width}], got {tuple(dims)}")
    terms = {f"d{d}": contrastive_loss(image_emb[:, :d], text_emb[:, :d], logit_scale, image_ids, valid)["loss"]
             for d in dims}
    terms["loss"] = sum(terms.values()) / len(dims)
    return terms


def sample_hard_negatives(sim, image_ids=None, rng=None, valid=None):
    """In-batch hard negatives for ITM, ALBEF/BLIP style.

    For each image i, one negative text j with probability softmax_j(sim[i, j]) over texts of *other* images; for
    each text j, one negative image likewise from softmax_i(sim[i, j]). Pairs showing the same image (the positive
    and other captions of that image) are never drawn. With `rng=None` the hardest negative (argmax) is taken:
    deterministic, for evaluation.

    Args:
      sim: float[B, B] image-text similarities (gradients are stopped here).
      image_ids: optional int[B]; None = every row is a different image.
      rng: PRNG key or None.
      valid: optional bool[B]; padding rows (False) are never drawn and get no negative.
    Returns:
      dict of int32[B] "neg_text" (for image i), "neg_image" (for text j) and bool[B] "neg_text_valid",
      "neg_image_valid" (False when no other valid pair shows another image, or the row itself is padding; the
      index is then the row itself).
    """
    batch = sim.shape[0]
    sim = jax.lax.stop_gradient(sim).astype(jnp.float32)
    valid = jnp.ones(batch, bool) if valid is None else valid.astype(bool)
    allowed = ~_same_image(image_ids, batch) & valid[:, None] & valid[None, :]  # [B, B]
    logits_i2t = jnp.where(allowed, sim, -jnp.inf)
    logits_t2i = jnp.where(allowed, sim, -jnp.inf).T  # row = text
    if rng is None:
        neg_text = jnp.argmax(logits_i2t, axis=1)
        neg_image = jnp.argmax(logits_t2i, axis=1)
    else:
        rng_t, rng_i = jax.random.split(rng)
        neg_text = jax.random.categorical(rng_t, logits_i2t, axis=1)
        neg_image = jax.random.categorical(rng_i, logits_t2i, axis=1)
    valid_t = jnp.any(allowed, axis=1)
    valid_i = jnp.any(allowed, axis=0)
    own = jnp.arange(batch)
    return {
        "neg_text": jnp.where(valid_t, neg_text, own).astype(jnp.int32),
        "neg_image": jnp.where(valid_i, neg_image, own).astype(jnp.int32),
        "neg_text_valid": valid_t,
        "neg_image_valid": valid_i,
    }


def _masked_mean(values, mask):
    """Mean of values[mask] (0 when nothing is valid); masked entries may be non-finite."""
    mask = mask.astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _cross_entropy(logits, labels):
    """float[N, C] x int[N] -> float32[N]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def itm_loss(logits, labels, valid=None):
    """Class-balanced image-text matching cross-entropy.

    The model gives B positives and 2B hard negatives (one per image, one per text). Each class is averaged on its
    own and the two means are averaged: positives and negatives weigh the same whatever their counts.

    Args:
      logits: float[N, 2] (class 1 = matching pair); labels: int[N] in {0, 1}; valid: optional bool[N].
    Returns:
      {"loss": (mean CE over positives + mean CE over negatives) / 2, "acc": accuracy over valid rows}.
    """
    valid = jnp.ones(labels.shape, bool) if valid is None else valid.astype(bool)
    safe_logits = jnp.where(valid[:, None], logits.astype(jnp.float32), 0.0)
    safe_labels = jnp.where(valid, labels, 0)
    ce = _cross_entropy(safe_logits, safe_labels)
    pos, neg = valid & (safe_labels == 1), valid & (safe_labels == 0)
    loss = 0.5 * (_masked_mean(ce, pos) + _masked_mean(ce, neg))
    correct = jnp.argmax(safe_logits, axis=-1) == safe_labels
    return {"loss": loss, "acc": _masked_mean(correct.astype(jnp.float32), valid)}


def box_loss(pred, target, has_box, l1_weight=1.0, giou_weight=1.0):
    """Box regression loss, normalised by the number of valid boxes.

    Args:
      pred: float[B, 4] predicted xyxy; target: float[B, 4] xyxy; has_box: bool[B].
      l1_weight, giou_weight: weights of the two parts.
    Returns:
      {"loss": l1_weight * l1 + giou_weight * (1 - giou), "l1": mean over valid boxes of the mean |pred - target|
       over the 4 coordinates, "giou": mean GIoU over valid boxes, "num_boxes": float[]}. 0 valid boxes -> all 0.
    """
    valid = has_box.astype(bool)
    # Rows without a box get a fixed valid box before any arithmetic (no NaN, no gradient from them).
    dummy = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
    pred = jnp.where(valid[:, None], pred.astype(jnp.float32), dummy)
    target = jnp.where(valid[:, None], target.astype(jnp.float32), dummy)
    l1 = _masked_mean(jnp.mean(jnp.abs(pred - target), axis=-1), valid)
    giou = _masked_mean(box_ops.generalized_box_iou_paired(pred, target), valid)
    num = jnp.sum(valid).astype(jnp.float32)
    # 1 - giou of "no boxes" must be 0, not 1.
    giou_term = jnp.where(num > 0, 1.0 - giou, 0.0)
    return {"loss": l1_weight * l1 + giou_weight * giou_term, "l1": l1, "giou": giou, "num_boxes": num}


def spatial_loss(logits, labels, has_relation):
    """Spatial-relation cross-entropy over the samples that have a label.

    Args: logits: float[B, C]; labels: int[B] in [0, C) (ignored where has_relation is False); has_relation: bool[B].
    Returns: {"loss": mean CE over labelled samples (0 if none), "acc": accuracy over them}.
    """
    valid = has_relation.astype(bool)
    safe_logits = jnp.where(valid[:, None], logits.astype(jnp.float32), 0.0)
    safe_labels = jnp.where(valid, labels, 0)
    ce = _cross_entropy(safe_logits, safe_labels)
    correct = (jnp.argmax(safe_logits, axis=-1) == safe_labels).astype(jnp.float32)
    return {"loss": _masked_mean(ce, valid), "acc": _masked_mean(correct, valid)}


def _resolve_weights(weights):
    merged = default_loss_config().to_dict()
    if weights is not None:
        given = weights.to_dict() if isinstance(weights, ml_collections.ConfigDict) else dict(weights)
        unknown = sorted(set(given) - set(merged))
        if unknown:
            raise ValueError(f"loss weights: unknown keys {unknown}; expected a subset of {sorted(merged)}")
        merged.update(given)
    return merged


def total_loss(outputs: Mapping, batch: Mapping, weights=None):
    """Weighted sum of all terms.

    Args:
      outputs: the MultitaskModel's dict: image_emb [B, E], text_emb [B, E], logit_scale [], itm_logits [N, 2],
        itm_labels [N], optional itm_valid [N], box_pred [B, 4], spatial_logits [B, C].
      batch: the data batch: image_id [B], box [B, 4], has_box [B], relation [B], has_relation [B], and optionally
        valid [B] (False on eval padding rows, which then count nowhere; ITM pairs are checked via itm_pairs).
      weights: mapping / ConfigDict with keys of `default_loss_config()` (missing keys take the defaults).
    Returns:
      (total float32[], dict of named float32[] terms: total, itc, itc_i2t, itc_t2i, itm, itm_acc, box, box_l1,
       box_giou, num_boxes, spatial, spatial_acc, logit_scale, and matryoshka(+ per width) when enabled).
    """
    w = _resolve_weights(weights)
    image_ids, valid = batch.get("image_id"), batch.get("valid")
    itm_valid = outputs.get("itm_valid")
    has_box, has_relation = batch["has_box"], batch["has_relation"]
    if valid is not None:
        valid = valid.astype(bool)
        has_box, has_relation = has_box & valid, has_relation & valid
        if "itm_pairs" in outputs:
            pairs = outputs["itm_pairs"]
            pair_ok = valid[pairs[:, 0]] & valid[pairs[:, 1]]
            itm_valid = pair_ok if itm_valid is None else itm_valid & pair_ok
    itc = contrastive_loss(outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"], image_ids, valid)
    itm = itm_loss(outputs["itm_logits"], outputs["itm_labels"], itm_valid)
    box = box_loss(outputs["box_pred"], batch["box"], has_box, w["box_l1"], w["box_giou"])
    spatial = spatial_loss(outputs["spatial_logits"], batch["relation"], has_relation)
    total = (w["itc"] * itc["loss"] + w["itm"] * itm["loss"] + w["box"] * box["loss"]
             + w["spatial"] * spatial["loss"])
    terms = {
        "itc": itc["loss"], "itc_i2t": itc["i2t"], "itc_t2i": itc["t2i"],
        "itm": itm["loss"], "itm_acc": itm["acc"],
        "box": box["loss"], "box_l1": box["l1"], "box_giou": box["giou"], "num_boxes": box["num_boxes"],
        "spatial": spatial["loss"], "spatial_acc": spatial["acc"],
        "logit_scale": jnp.asarray(outputs["logit_scale"], jnp.float32),
    }
    if w["matryoshka"]:
        mrl = matryoshka_contrastive_loss(outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"],
                                          tuple(w["matryoshka_dims"]), image_ids, valid)
        total = total + w["matryoshka"] * mrl["loss"]
        terms.update({f"matryoshka_{k}" if k != "loss" else "matryoshka": v for k, v in mrl.items()})
    terms["total"] = total
    return total, terms
