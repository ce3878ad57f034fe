"""Evaluation metrics: pure numpy on host arrays.

- `retrieval_recall`: image<->text Recall@K with several captions per image (COCO / Flickr30k protocol).
- `retrieval_recall_true`: the same where a hit is any pair marked true (a caption true of several images).
- `retrieval_ceilings`: R@1 of an oracle that knows which images each caption is true of (strict protocol).
- `matching_metrics`: balanced accuracy and ROC AUC of a matching score over positives and negatives.
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


def retrieval_recall_true(sim, true_pairs, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@K in both directions where any true pair counts as a hit.

    Image->text: image i is a hit at K when a caption true of it is among its K most similar texts; text->image:
    caption t is a hit when an image it is true of is among its K most similar images. Ties count against the query
    (as in `retrieval_recall`); with `true_pairs` = "is the caption's own image" both functions agree.

    Args:
      sim: float[I, T] similarities; true_pairs: bool[I, T] (every row and column needs one True).
    Returns:
      {"i2t@k": float, "t2i@k": float} for each k.
    """
    sim = np.nan_to_num(np.asarray(sim, np.float32), nan=-np.inf)
    true_pairs = np.asarray(true_pairs, bool)
    if sim.shape != true_pairs.shape or sim.ndim != 2:
        raise ValueError(f"retrieval_recall_true: expected sim and true_pairs of one shape [I, T], got {sim.shape} "
                         f"and {true_pairs.shape}")
    if not (true_pairs.any(axis=0).all() and true_pairs.any(axis=1).all()):
        raise ValueError("retrieval_recall_true: every image and every caption needs at least one true pair")
    best_i2t = np.where(true_pairs, sim, -np.inf).max(axis=1, keepdims=True)  # [I, 1]
    i2t_rank = np.sum(~true_pairs & (sim >= best_i2t), axis=1)
    best_t2i = np.where(true_pairs, sim, -np.inf).max(axis=0, keepdims=True)  # [1, T]
    t2i_rank = np.sum(~true_pairs & (sim >= best_t2i), axis=0)
    out = {f"i2t@{k}": float(np.mean(i2t_rank < k)) for k in ks}
    out.update({f"t2i@{k}": float(np.mean(t2i_rank < k)) for k in ks})
    return out


def retrieval_ceilings(true_pairs, text_to_image) -> dict:
    """The best expected R@1 under the strict protocol (only a caption's own image is a hit), given captions that are
    true of several images: an oracle ranks the images a caption is true of first (the captions true of an image,
    for image->text), in random order among themselves.

    Args:
      true_pairs: bool[I, T] caption t is true of image i (its own image included); text_to_image: int[T].
    Returns:
      {"t2i@1": mean over captions of 1 / #images it is true of,
       "i2t@1": mean over images of #own captions / #captions true of it}.
    """
    true_pairs = np.asarray(true_pairs, bool)
    own = np.zeros_like(true_pairs)
    own[np.asarray(text_to_image), np.arange(true_pairs.shape[1])] = True
    true_pairs = true_pairs | own
    return {"t2i@1": float(np.mean(1.0 / true_pairs.sum(axis=0))),
            "i2t@1": float(np.mean(own.sum(axis=1) / true_pairs.sum(axis=1)))}


def roc_auc(positive_scores, negative_scores) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count one half; the Mann-Whitney U statistic over n_pos * n_neg). 0.5 when either set is empty."""
    pos = np.asarray(positive_scores, np.float64).reshape(-1)
    neg = np.asarray(negative_scores, np.float64).reshape(-1)
    if not len(pos) or not len(neg):
        return 0.5
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties (1-based).
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(start + (counts + 1) / 2.0, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def matching_metrics(positive_scores, negative_scores) -> dict:
    """Binary matching quality from scores (> 0 = "matches", e.g. logit(match) - logit(no match)).

    Returns {"acc": (true-positive rate + true-negative rate) / 2 (balanced accuracy; chance 0.5 whatever the
    class counts), "auc": `roc_auc`}.
    """
    pos = np.asarray(positive_scores, np.float64).reshape(-1)
    neg = np.asarray(negative_scores, np.float64).reshape(-1)
    tpr = float(np.mean(pos > 0)) if len(pos) else 0.0
    tnr = float(np.mean(neg <= 0)) if len(neg) else 0.0
    return {"acc": 0.5 * (tpr + tnr), "auc": roc_auc(pos, neg)}


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
