"""Evaluation metrics: pure numpy on host arrays.

- `retrieval_recall`: image<->text Recall@K with several captions per image (COCO / Flickr30k protocol).
- `box_metrics`: mean IoU, mean GIoU, L1 and accuracy at IoU >= 0.5 over the samples that have a box.
- `spatial_metrics`: accuracy, macro-F1 and confusion matrix of the spatial-relation head.

Letters: I images, T texts (captions), N samples, C classes.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from vlm_jax import box_ops


def retrieval_recall(sim, text_to_image, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@K in both directions.

    Image->text: image i is a hit at K if any of its captions is among its K most similar texts. Text->image: text t
    is a hit at K if its image is among its K most similar images. Ties are counted against the query (a negative
    with the same score as the best positive ranks before it), so a collapsed model with constant scores gets 0,
    not 1.

    Args:
      sim: float[I, T] similarities (row = image, column = text).
      text_to_image: int[T], the image index of each caption; every image needs at least one caption.
      ks: cut-offs.
      chunk: images scored at a time (bounds memory to chunk * T).
    Returns:
      {"i2t@k": float, "t2i@k": float} for each k (fractions in [0, 1]).
    """
    # NaN scores rank last (a broken model must not score hits).
    sim = np.nan_to_num(np.asarray(sim, np.float32), nan=-np.inf)
    t2i = np.asarray(text_to_image).astype(np.int64)
    if sim.ndim != 2 or t2i.shape != (sim.shape[1],):
        raise ValueError(f"retrieval_recall: expected sim [I, T] and text_to_image [T], got {sim.shape} and "
                         f"{t2i.shape}")
    num_images, num_texts = sim.shape
    if num_texts and (t2i.min() < 0 or t2i.max() >= num_images):
        raise ValueError(f"retrieval_recall: text_to_image values must lie in [0, {num_images}), got "
                         f"[{t2i.min()}, {t2i.max()}]")
    if np.bincount(t2i, minlength=num_images).min(initial=1) == 0:
        raise ValueError("retrieval_recall: every image needs at least one caption in text_to_image")

    # Image -> text: rank of the first caption = number of other images' captions scoring >= the best caption.
    i2t_rank = np.empty(num_images, np.int64)
    for start in range(0, num_images, chunk):
        block = sim[start:start + chunk]  # [c, T]
        own = t2i[None, :] == np.arange(start, start + len(block))[:, None]  # [c, T]
        best = np.where(own, block, -np.inf).max(axis=1)  # [c]
        i2t_rank[start:start + len(block)] = np.sum(~own & (block >= best[:, None]), axis=1)
    # Text -> image: number of other images scoring >= the caption's own image.
    own_score = sim[t2i, np.arange(num_texts)]  # [T]
    t2i_rank = np.sum(sim >= own_score[None, :], axis=0) - 1  # minus the own image itself

    out = {}
    for k in ks:
        out[f"i2t@{k}"] = float(np.mean(i2t_rank < k)) if num_images else 0.0
    for k in ks:
        out[f"t2i@{k}"] = float(np.mean(t2i_rank < k)) if num_texts else 0.0
    return out


def box_metrics(pred, target, mask=None, iou_threshold: float = 0.5) -> dict:
    """Box quality over the samples with a box.

    Args:
      pred, target: float[N, 4] xyxy; mask: optional bool[N] (True = has a box).
    Returns:
      {"iou", "giou", "l1" (mean |pred - target| per coordinate), f"acc@{iou_threshold}", "count"}; 0 when empty.
    """
    pred, target = np.asarray(pred, np.float32), np.asarray(target, np.float32)
    mask = np.ones(len(pred), bool) if mask is None else np.asarray(mask, bool)
    pred, target = pred[mask], target[mask]
    iou, _ = box_ops.box_iou_paired(jnp.asarray(pred), jnp.asarray(target))
    giou = box_ops.generalized_box_iou_paired(jnp.asarray(pred), jnp.asarray(target))
    iou, giou = np.asarray(iou), np.asarray(giou)
    n = len(pred)

    def mean(x):
        return float(np.mean(x)) if n else 0.0

    return {"iou": mean(iou), "giou": mean(giou), "l1": mean(np.abs(pred - target)),
            f"acc@{iou_threshold:g}": mean(iou >= iou_threshold), "count": n}


def confusion_matrix(pred, labels, num_classes: int):
    """int[N] predictions, int[N] labels -> int64[C, C] counts, row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def spatial_metrics(pred, labels, mask=None, num_classes: int = 6) -> dict:
    """Accuracy, macro-F1 and confusion matrix of the spatial-relation head.

    Args:
      pred: int[N] predicted classes or float[N, C] logits (argmax taken); labels: int[N]; mask: optional bool[N].
    Returns:
      {"accuracy": float, "macro_f1": float, "per_class_f1": float[C], "confusion": int64[C, C], "count": int}.
      Macro-F1 averages over the classes that occur in the labels or the predictions (a class absent from both has
      no defined F1); per_class_f1 is NaN for those.
    """
    pred = np.asarray(pred)
    if pred.ndim == 2:
        pred = pred.argmax(axis=-1)
    labels = np.asarray(labels)
    mask = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
    pred, labels = pred[mask].astype(np.int64), labels[mask].astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes or pred.min() < 0
                        or pred.max() >= num_classes):
        raise ValueError(f"spatial_metrics: classes must lie in [0, {num_classes})")
    cm = confusion_matrix(pred, labels, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * tp / (support + predicted), np.nan)
    return {
        "accuracy": float(tp.sum() / len(labels)) if len(labels) else 0.0,
        "macro_f1": float(np.nanmean(f1)) if present.any() else 0.0,
        "per_class_f1": f1,
        "confusion": cm,
        "count": int(len(labels)),
    }
