"""Losses of the tasks: contrastive (ITC), matching (ITM), box (L1 + GIoU), spatial relation.

Every loss is a pure function of arrays that returns a dict of named scalar terms ("loss" is the one to optimise);
the tasks (`vlm_jax.tasks`) call them and the multitask model sums them with the weights of `config.tasks`.

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

import jax
import jax.numpy as jnp
import optax

from vlm_jax import box_ops
from vlm_jax.models.pooling import l2_normalize

# Logit used to remove an entry from a softmax; finite so that no inf - inf can appear.
_NEG = -1e9


def same_image(image_ids, batch):
    """bool[B, B]: pair (i, j) shows the same image. Without ids only the diagonal does."""
    if image_ids is None:
        return jnp.eye(batch, dtype=bool)
    return image_ids[:, None] == image_ids[None, :]


def contrastive_logits(image_emb, text_emb, logit_scale):
    """float[B, E] x float[B, E] x float[] -> float32[B, B] scaled cosine similarities (row = image, col = text)."""
    return logit_scale * (l2_normalize(image_emb) @ l2_normalize(text_emb).T)


def contrastive_loss(image_emb, text_emb, logit_scale, image_ids=None, valid=None, negatives=None):
    """Symmetric InfoNCE (CLIP) over the (global) batch.

    Args:
      image_emb: float[B, E] image embeddings (normalised here).
      text_emb: float[B, E] text embeddings of the paired captions (normalised here).
      logit_scale: float[] multiplier of the cosine similarities (the model's exp(log_scale), already clipped).
      image_ids: optional int[B]; pairs j != i with image_ids[j] == image_ids[i] (another caption of the same image)
        are removed from i's negatives instead of being pushed away as false negatives.
      valid: optional bool[B]; rows with False (padding) are neither queries nor negatives.
      negatives: optional bool[B, B], True where caption j is false for image i (`vlm_jax.caption_truth`); when
        given, every other off-diagonal pair (a caption true of another image too) leaves the denominators, and
        `image_ids` is not needed.
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
    not_negative = same_image(image_ids, batch) if negatives is None else ~negatives.astype(bool)
    remove = (not_negative | ~valid[:, None] | ~valid[None, :]) & off_diag
    logits = jnp.where(remove, _NEG, logits)
    diag = jnp.diagonal(logits)
    i2t = _masked_mean(jax.nn.logsumexp(logits, axis=1) - diag, valid)
    t2i = _masked_mean(jax.nn.logsumexp(logits, axis=0) - diag, valid)
    return {"loss": 0.5 * (i2t + t2i), "i2t": i2t, "t2i": t2i}


def matryoshka_contrastive_loss(image_emb, text_emb, logit_scale, dims, image_ids=None, valid=None, negatives=None):
    """Mean contrastive loss over nested prefixes of the embeddings (Matryoshka representation learning).

    Args: as `contrastive_loss`, plus `dims`: increasing widths, each <= E; prefix [:, :d] is re-normalised.
    Returns: {"loss": mean over dims, "d{d}": loss at width d for each d}.
    """
    width = image_emb.shape[-1]
    if not dims or any(d <= 0 or d > width for d in dims):
        raise ValueError(f"matryoshka_dims: expected widths in (0, {width}], got {tuple(dims)}")
    terms = {f"d{d}": contrastive_loss(image_emb[:, :d], text_emb[:, :d], logit_scale, image_ids, valid,
                                       negatives)["loss"]
             for d in dims}
    terms["loss"] = sum(terms.values()) / len(dims)
    return terms


def _masked_mean(values, mask):
    """Mean of values[mask] (0 when nothing is valid); masked entries may be non-finite."""
    mask = mask.astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _cross_entropy(logits, labels):
    """float[N, C] x int[N] -> float32[N]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.astype(jnp.int32))


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


def locate_loss(centres, boxes, valid):
    """Mean L1 distance between attended positions and the centres of the boxes they should look at.

    Args: centres: float[B, K, 2] (x, y); boxes: float[B, K, 4] xyxy; valid: bool[B].
    Returns: float32[] mean over valid rows and the K objects (0 if none); masked rows may hold NaN.
    """
    valid = valid.astype(bool)
    target = 0.5 * (boxes[..., :2] + boxes[..., 2:])
    dist = jnp.where(valid[:, None, None], jnp.abs(centres.astype(jnp.float32) - target.astype(jnp.float32)), 0.0)
    return _masked_mean(jnp.mean(dist, axis=(1, 2)), valid)


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


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise focal loss (Lin et al. 2017) on sigmoid outputs, float32.

    FL = -alpha_t (1 - p_t)^gamma log(p_t), p_t = p if target else 1 - p, alpha_t = alpha if target else 1 - alpha
    (alpha < 0: no alpha weighting). logits, targets: float[...] (targets in {0, 1}) -> float32[...]. log(p_t) comes
    from the logits (`optax.sigmoid_binary_cross_entropy`), so it is finite for any finite logit.
    """
    logits, targets = logits.astype(jnp.float32), targets.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    ce = optax.sigmoid_binary_cross_entropy(logits, targets)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


IGNORE_INDEX = -100  # transformers' label of tokens that are not predicted (prompt, image, padding)


def token_cross_entropy(logits, labels, *, head=None, chunk_size: int = 0):
    """Per-token shifted cross-entropy: position t predicts labels[t + 1].

    logits float[B, T, V] (or hidden float[B, T, D] with `head`, see `next_token_loss`), labels int[B, T] ->
    (float32[B, T-1] cross-entropy, 0 where not counted; bool[B, T-1] the argmax is the label; bool[B, T-1] counted,
    i.e. label != IGNORE_INDEX). With chunk_size > 0 the float32 logits of one chunk of positions exist at a time.
    """
    x, target = logits[:, :-1], labels[:, 1:]
    counted = target != IGNORE_INDEX
    safe = jnp.where(counted, target, 0).astype(jnp.int32)

    def per_token(xc, tc):  # [B, t, D or V], int[B, t] -> (float32[B, t], bool[B, t])
        lg = (head(xc) if head is not None else xc).astype(jnp.float32)
        ce = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, tc[..., None], -1)[..., 0]
        return ce, jnp.argmax(lg, -1) == tc

    steps = x.shape[1]
    if chunk_size > 0 and steps > chunk_size:
        n = -(-steps // chunk_size)
        pad = n * chunk_size - steps
        xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        ts = jnp.pad(safe, ((0, 0), (0, pad)))
        split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n, chunk_size, *a.shape[2:]), 1, 0)  # noqa: E731
        merge = lambda a: jnp.moveaxis(a, 0, 1).reshape(x.shape[0], -1)[:, :steps]  # noqa: E731
        ce, correct = jax.lax.map(jax.checkpoint(lambda a: per_token(*a)), (split(xs), split(ts)))  # [n, B, chunk]
        ce, correct = merge(ce), merge(correct)
    else:
        ce, correct = per_token(x, safe)
    return jnp.where(counted, ce, 0.0), correct & counted, counted


def weighted_token_loss(ce, counted, weights=None, spans=None) -> dict:
    """float32[B, t] per-token cross-entropy, bool[B, t] counted [, float[B, t] weights, {name: bool[B, t]}] ->
    {"loss": sum of weight x ce over counted tokens / their count, "tokens", and per span `<name>` (its mean
    cross-entropy) and `<name>_tokens`}."""
    w = jnp.ones_like(ce) if weights is None else weights.astype(jnp.float32)
    tokens = jnp.sum(counted).astype(jnp.float32)
    out = {"loss": jnp.sum(jnp.where(counted, w * ce, 0.0)) / jnp.maximum(tokens, 1.0), "tokens": tokens}
    for name, mask in (spans or {}).items():
        in_span = mask.astype(bool) & counted
        out[name] = _masked_mean(ce, in_span)
        out[f"{name}_tokens"] = jnp.sum(in_span).astype(jnp.float32)
    return out


def next_token_loss(logits, labels, weights=None, *, spans=None, head=None, chunk_size: int = 0) -> dict:
    """Shifted next-token cross-entropy with transformers' conventions, in float32.

    Position t predicts labels[t + 1]; labels equal to IGNORE_INDEX (-100) are not counted; the loss is the sum over
    counted tokens of weight x cross-entropy divided by the number of counted tokens (all weights 1: transformers'
    `labels=` loss, the mean over counted tokens).

    Args:
      logits: float[B, T, V] in any dtype; with `head`, the hidden states float[B, T, D] that `head` maps to logits.
      labels: int[B, T] (the input ids with -100 where nothing is predicted).
      weights: float[B, T] per label token (aligned with `labels`), e.g. a teacher span weighted 0.5; None = 1.
      spans: {name: bool[B, T]} label tokens of named answer parts (aligned with `labels`); each adds the terms
        `<name>` (its mean cross-entropy) and `<name>_tokens`.
      head: float[..., D] -> float[..., V] (e.g. `InternVL.logits`), applied per chunk when chunk_size > 0.
      chunk_size: > 0: positions per chunk; the float32 logits of one chunk exist at a time (`lax.map` over chunks,
        each rematerialised in the backward pass), instead of [B, T, V] float32 at once, the step's largest tensor.
    Returns:
      {"loss": float32[], "tokens": float32[] counted tokens, and the span terms}.
    """
    ce, _, counted = token_cross_entropy(logits, labels, head=head, chunk_size=chunk_size)
    return weighted_token_loss(ce, counted, None if weights is None else weights[:, 1:],
                               {k: v[:, 1:] for k, v in (spans or {}).items()})
