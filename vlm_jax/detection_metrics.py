"""COCO box detection metrics (AP@[.5:.95], AP50, AP75, AR100) in numpy, with pycocotools' COCOeval semantics.

Letters: I images (each once), Q predictions per image, G ground-truth boxes per image (both padded), C classes,
T = 10 IoU thresholds (.5:.05:.95), R = 101 recall thresholds (0:.01:1). Boxes are xyxy; IoU is plain
intersection / union (no +1 pixel, as pycocotools 2.x), which is scale invariant, so normalised [0, 1]
coordinates give the same numbers as pixels. Inverted sides count as 0 (the `box_ops` clamp policy).

Semantics (COCOeval, iouType "bbox", areaRng "all", no crowd boxes), checked against pycocotools in
tests/test_detection_metrics.py:

- The unit of matching is (image, class); without labels every box is one class. A detection can only match a GT
  of its own class.
- In each unit the detections are sorted by score, descending and stable (ties keep input order), and only the
  first `max_dets` are kept.
- Greedy matching, separately for every IoU threshold t: in score order, each detection takes the still-unmatched
  GT with the highest IoU, if that IoU >= t. Among GTs with equal IoU the LAST one (input order) wins, as in
  COCOeval's loop. Unmatched detections are false positives, also in images without GT.
- Per class, the kept detections of all images are pooled and sorted by score (stable: ties in image order, then
  per-image rank). Cumulative TP / FP give recall = TP / num_gt and precision = TP / (TP + FP); precision is
  replaced by its envelope (max over the same and all later points). AP at t = mean over the recall thresholds r
  of the envelope at the first point with recall >= r (0 where recall never reaches r). Recall at t = recall after
  all pooled detections (0 if there are none).
- AP = mean over the classes that have at least one GT and over t; AP50 / AP75 at one t. "AR100" = mean over the
  same classes and t of recall (with `max_dets` detections; the key keeps COCO's name for the default 100).
  Classes without GT are left out (COCOeval marks them -1); with no GT at all the metrics are NaN (COCOeval: -1).
"""

import numpy as np

# The same linspace calls as COCOeval, so the thresholds are bit-identical (0.75 must be exactly 0.75).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def _area(boxes):
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def _iou_rows(box, gts):
    """box float[N, 4], gts float[N, G, 4] -> float[N, G]: IoU of each row's box with that row's GTs."""
    box = box[:, None, :]
    wh = np.clip(np.minimum(box[..., 2:], gts[..., 2:]) - np.maximum(box[..., :2], gts[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(box) + _area(gts) - inter
    # union is 0 only for two empty boxes, where inter is 0 too: IoU 0, as pycocotools.
    return inter / np.maximum(union, np.finfo(np.float64).tiny)


def _rank_within_class(labels):
    """int[I, Q] labels in score order -> int[I, Q]: how many earlier entries of the row have the same label."""
    q = labels.shape[1]
    by_class = np.argsort(labels, axis=1, kind="stable")  # groups each class, keeping score order inside
    grouped = np.take_along_axis(labels, by_class, axis=1)
    pos = np.broadcast_to(np.arange(q), labels.shape)
    starts = np.ones(labels.shape, bool)
    starts[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    group_start = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    rank = np.empty_like(labels)
    np.put_along_axis(rank, by_class, pos - group_start, axis=1)
    return rank


def _precision_recall(hits, num_gt):
    """bool[T, N] TP flags of one class's pooled detections in score order -> (float[T, R] precision, float[T])."""
    t, n = hits.shape
    if n == 0:
        return np.zeros((t, len(RECALL_THRESHOLDS))), np.zeros(t)
    tp = np.cumsum(hits, axis=1)
    recall = tp / num_gt
    precision = tp / np.arange(1, n + 1)  # TP + FP = number of detections so far
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    # First point reaching each recall threshold; index n (never reached) reads the padding 0.
    idx = np.stack([np.searchsorted(r, RECALL_THRESHOLDS, side="left") for r in recall])
    padded = np.concatenate([envelope, np.zeros((t, 1))], axis=1)
    return np.take_along_axis(padded, idx, axis=1), recall[:, -1]


def detection_metrics(pred_boxes, pred_scores, gt_boxes, gt_valid, pred_labels=None, gt_labels=None,
                      num_classes=None, max_dets=100, pred_valid=None) -> dict:
    """COCO bbox metrics over I images (see the module docstring for the exact semantics).

    Args:
      pred_boxes: float[I, Q, 4] xyxy, normalised [0, 1] (any common scale works).
      pred_scores: float[I, Q].
      gt_boxes: float[I, G, 4] xyxy, same scale as the predictions.
      gt_valid: bool[I, G]; False marks padding.
      pred_labels, gt_labels: optional int[I, Q] / int[I, G] in [0, num_classes); both or neither.
      num_classes: C, required with labels.
      max_dets: detections kept per image (per image and class when labelled), by score.
      pred_valid: optional bool[I, Q]; False marks padding (default: every prediction counts).

    Returns:
      {"AP", "AP50", "AP75", "AR100", "num_images", "num_gt"} and, when labelled, "per_class_AP": float[C]
      (AP@[.5:.95] per class, NaN for classes without GT).
    """
    pred_boxes = np.asarray(pred_boxes, np.float64)
    pred_scores = np.asarray(pred_scores, np.float64)
    gt_boxes = np.asarray(gt_boxes, np.float64)
    gt_valid = np.asarray(gt_valid, bool)
    num_images, q = pred_scores.shape
    g = gt_valid.shape[1]
    if pred_boxes.shape != (num_images, q, 4) or gt_boxes.shape != (num_images, g, 4):
        raise ValueError(f"shapes: pred_boxes {pred_boxes.shape}, pred_scores {pred_scores.shape}, "
                         f"gt_boxes {gt_boxes.shape}, gt_valid {gt_valid.shape}")
    pred_valid = np.ones((num_images, q), bool) if pred_valid is None else np.asarray(pred_valid, bool)

    labelled = pred_labels is not None
    if labelled != (gt_labels is not None):
        raise ValueError("pass both pred_labels and gt_labels, or neither")
    if labelled:
        if num_classes is None:
            raise ValueError("num_classes is required with labels")
        pred_labels = np.asarray(pred_labels, np.int64)
        gt_labels = np.asarray(gt_labels, np.int64)
        for name, lab, valid in (("pred", pred_labels, pred_valid), ("gt", gt_labels, gt_valid)):
            if np.any(valid & ((lab < 0) | (lab >= num_classes))):
                raise ValueError(f"{name}_labels outside [0, {num_classes})")
    else:
        num_classes = 1
        pred_labels = np.zeros((num_images, q), np.int64)
        gt_labels = np.zeros((num_images, g), np.int64)
    # Padding predictions get class -1: no GT has it, and they take no place in the max_dets budget of real classes.
    pred_labels = np.where(pred_valid, pred_labels, -1)

    # 1. Score order inside each image; keep the top max_dets of each (image, class).
    order = np.argsort(-pred_scores, axis=1, kind="stable")
    boxes = np.take_along_axis(pred_boxes, order[..., None], axis=1)
    scores = np.take_along_axis(pred_scores, order, axis=1)
    labels = np.take_along_axis(pred_labels, order, axis=1)
    keep = (labels >= 0) & (_rank_within_class(labels) < max_dets)

    # 2. Greedy matching, one score rank at a time across all images and thresholds. Classes never compete for a
    # GT, so walking an image's detections in overall score order is the per-class greedy order.
    n_t = len(IOU_THRESHOLDS)
    gt_taken = np.zeros((num_images, n_t, g), bool)
    is_tp = np.zeros((num_images, q, n_t), bool)
    ranks = np.nonzero(keep.any(axis=0))[0] if g else []  # score ranks some image keeps; none without GT slots
    for j in ranks:
        rows = np.nonzero(keep[:, j])[0]
        iou = _iou_rows(boxes[rows, j], gt_boxes[rows])  # [n, G]
        same_class = gt_valid[rows] & (gt_labels[rows] == labels[rows, j][:, None])
        ok = (same_class[:, None, :] & ~gt_taken[rows]
              & (iou[:, None, :] >= IOU_THRESHOLDS[None, :, None]))  # [n, T, G]
        cand = np.where(ok, iou[:, None, :], -1.0)
        best = g - 1 - np.argmax(cand[..., ::-1], axis=-1)  # the last GT among equal best IoUs, as COCOeval
        hit = ok.any(axis=-1)  # [n, T]
        is_tp[rows, j] = hit
        r, t = np.nonzero(hit)
        gt_taken[rows[r], t, best[r, t]] = True

    # 3. Per class: pool the kept detections (image-major, then score rank), stable sort by score, PR curve.
    pooled_labels, pooled_scores, pooled_tp = labels[keep], scores[keep], is_tp[keep]  # [N], [N], [N, T]
    num_gt = np.bincount(gt_labels[gt_valid], minlength=num_classes)
    precision = np.full((num_classes, n_t, len(RECALL_THRESHOLDS)), np.nan)
    recall = np.full((num_classes, n_t), np.nan)
    for c in np.nonzero(num_gt)[0]:
        sel = pooled_labels == c
        by_score = np.argsort(-pooled_scores[sel], kind="stable")
        precision[c], recall[c] = _precision_recall(pooled_tp[sel][by_score].T, num_gt[c])

    has_gt = num_gt > 0
    per_class_ap = precision.mean(axis=(1, 2))  # NaN stays NaN for classes without GT

    def mean(x):
        return float(x[has_gt].mean()) if has_gt.any() else float("nan")

    out = {
        "AP": mean(per_class_ap),
        "AP50": mean(precision[:, 0].mean(axis=1)),
        "AP75": mean(precision[:, 5].mean(axis=1)),
        "AR100": mean(recall.mean(axis=1)),
        "num_images": int(num_images),
        "num_gt": int(gt_valid.sum()),
    }
    if labelled:
        out["per_class_AP"] = per_class_ap
    return out
