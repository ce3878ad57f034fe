"""Box format conversions, IoU and generalized IoU.

Formats are named in the function names: `xyxy` = (x1, y1, x2, y2), `cxcywh` = (centre x, centre y, width, height).
Coordinates are whatever the caller uses (normalised [0, 1] in this project); nothing here assumes a range.

Degenerate boxes (clamp policy): a box with x2 < x1 (or y2 < y1) is treated as an empty box: its width/height is
clamped to 0, so its area is 0 and its intersection with anything is 0. Divisions use max(denominator, EPS), so
an IoU or GIoU that would be 0/0 (two empty boxes) is 0, never NaN. Every function is differentiable with finite
gradients for any finite input (clamps are `maximum`, whose gradient is 0 or 1; no sqrt, no log).

Pairwise functions take `[N, 4] x [M, 4] -> [N, M]`; the `_paired` variants take two arrays of the same (or
broadcastable) shape `[..., 4]` and compare row i with row i (the diagonal), as the box loss needs.
"""

import jax.numpy as jnp

# Floor for denominators: far below any real box area in normalised coordinates (a 1-pixel box at 1000 px is 1e-6).
EPS = 1e-9


def box_cxcywh_to_xyxy(boxes):
    """float[..., 4] (cx, cy, w, h) -> float[..., 4] (x1, y1, x2, y2)."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes):
    """float[..., 4] (x1, y1, x2, y2) -> float[..., 4] (cx, cy, w, h). Inverted boxes give negative w/h (no clamp)."""
    x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1], axis=-1)


def box_area(boxes):
    """float[..., 4] xyxy -> float[...]; inverted sides count as 0 (clamp policy above)."""
    x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.maximum(x2 - x1, 0.0) * jnp.maximum(y2 - y1, 0.0)


def _inter_union_enclosing(a, b):
    """Broadcasting core: a, b float[..., 4] xyxy -> (intersection, union, enclosing area), each float[...]."""
    area_a, area_b = box_area(a), box_area(b)
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    # Enclosing box; clamped so an inverted pair cannot give a negative area.
    elt = jnp.minimum(a[..., :2], b[..., :2])
    erb = jnp.maximum(a[..., 2:], b[..., 2:])
    ewh = jnp.maximum(erb - elt, 0.0)
    enclosing = ewh[..., 0] * ewh[..., 1]
    return inter, union, enclosing


def box_iou_paired(a, b):
    """Elementwise IoU. a, b: float[..., 4] xyxy (broadcastable) -> (iou float[...], union float[...])."""
    inter, union, _ = _inter_union_enclosing(a, b)
    return inter / jnp.maximum(union, EPS), union


def generalized_box_iou_paired(a, b):
    """Elementwise GIoU = IoU - (enclosing - union) / enclosing, in [-1, 1]. a, b: float[..., 4] -> float[...]."""
    inter, union, enclosing = _inter_union_enclosing(a, b)
    iou = inter / jnp.maximum(union, EPS)
    return iou - (enclosing - union) / jnp.maximum(enclosing, EPS)


def box_iou(a, b):
    """Pairwise IoU. a: float[N, 4], b: float[M, 4] xyxy -> (iou float[N, M], union float[N, M])."""
    _check_pairwise(a, b, "box_iou")
    return box_iou_paired(a[:, None, :], b[None, :, :])


def generalized_box_iou(a, b):
    """Pairwise GIoU. a: float[N, 4], b: float[M, 4] xyxy -> float[N, M]."""
    _check_pairwise(a, b, "generalized_box_iou")
    return generalized_box_iou_paired(a[:, None, :], b[None, :, :])


def _check_pairwise(a, b, name):
    if a.ndim != 2 or a.shape[-1] != 4 or b.ndim != 2 or b.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape [N, 4] and [M, 4], got {a.shape} and {b.shape}")
