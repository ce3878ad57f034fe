"""detection_metrics against pycocotools' COCOeval (bbox, areaRng "all") on synthetic detections."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlm_jax.detection_metrics import detection_metrics

W, H = 640, 480  # pixel size of every image for pycocotools; all areas lie inside areaRng "all" [0, 1e10]
SCALE = np.array([W, H, W, H], np.float64)
TOL = 1e-3  # required agreement; in practice the two agree to ~1e-16 (summation order only)


def random_boxes(rng, n):
    """float[n, 4] xyxy in [0, 1], sides 0.05..0.4."""
    xy = rng.uniform(0.0, 0.6, (n, 2))
    wh = rng.uniform(0.05, 0.4, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def synthetic(rng, num_images=40, num_classes=1, max_gt=8, q=24, score_ties=False):
    """Padded arrays: GT boxes (some duplicated, some images empty), jittered predictions + false positives."""
    gt_boxes = np.zeros((num_images, max_gt, 4))
    gt_valid = np.zeros((num_images, max_gt), bool)
    gt_labels = np.zeros((num_images, max_gt), np.int64)
    pred_boxes = np.zeros((num_images, q, 4))
    pred_scores = np.zeros((num_images, q))
    pred_labels = np.zeros((num_images, q), np.int64)
    pred_valid = np.zeros((num_images, q), bool)
    for i in range(num_images):
        n_gt = 0 if i % 7 == 3 else int(rng.integers(1, max_gt + 1))
        boxes = random_boxes(rng, n_gt)
        if n_gt >= 2 and rng.random() < 0.3:
            boxes[-1] = boxes[0]  # an exact duplicate GT: IoU ties between GTs
        gt_boxes[i, :n_gt], gt_valid[i, :n_gt] = boxes, True
        gt_labels[i, :n_gt] = rng.integers(0, num_classes, n_gt)
        if i % 5 == 1:
            continue  # an image without predictions
        preds, labels = [], []
        for b, lab in zip(boxes, gt_labels[i, :n_gt]):
            for _ in range(rng.choice([0, 1, 1, 1, 2])):  # missed, found, found twice (a duplicate is an FP)
                wh = b[2:] - b[:2]
                preds.append(b + rng.normal(0.0, 0.08, 4) * np.concatenate([wh, wh]))
                labels.append(lab if rng.random() < 0.85 else rng.integers(0, num_classes))
        n_fp = int(rng.integers(0, 6))
        preds += list(random_boxes(rng, n_fp))
        labels += list(rng.integers(0, num_classes, n_fp))
        n = min(len(preds), q)
        if n == 0:
            continue
        pred_boxes[i, :n], pred_labels[i, :n], pred_valid[i, :n] = np.array(preds)[:n], labels[:n], True
        scores = rng.uniform(0.0, 1.0, n)
        pred_scores[i, :n] = np.round(scores * 10) / 10 if score_ties else scores
    # Padding carries junk that must be ignored.
    pred_boxes[~pred_valid] = random_boxes(rng, int((~pred_valid).sum()))
    pred_scores[~pred_valid] = 2.0
    return dict(pred_boxes=pred_boxes, pred_scores=pred_scores, pred_labels=pred_labels, pred_valid=pred_valid,
                gt_boxes=gt_boxes, gt_valid=gt_valid, gt_labels=gt_labels)


def coco_eval(d, num_classes):
    """Runs COCOeval on the data in pixel xywh; returns its eval dict (precision [T,R,K,A,M], recall [T,K,A,M])."""
    to_xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
    num_images = d["gt_valid"].shape[0]
    anns, dets = [], []
    for i in range(num_images):
        for b, lab in zip(d["gt_boxes"][i][d["gt_valid"][i]] * SCALE, d["gt_labels"][i][d["gt_valid"][i]]):
            x, y, w, h = to_xywh(b)
            # ids from 1: COCOeval stores the matched GT id in dtMatches and reads 0 as "unmatched".
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(lab) + 1, bbox=[x, y, w, h],
                             area=w * h, iscrowd=0))
        valid = d["pred_valid"][i]
        for b, s, lab in zip(d["pred_boxes"][i][valid] * SCALE, d["pred_scores"][i][valid],
                             d["pred_labels"][i][valid]):
            dets.append(dict(image_id=i + 1, category_id=int(lab) + 1, bbox=to_xywh(b), score=float(s)))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dict(info={}, images=[dict(id=i + 1, width=W, height=H) for i in range(num_images)],
                          annotations=anns, categories=[dict(id=c + 1, name=str(c)) for c in range(num_classes)])
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def reference(ev, max_dets=100):
    """Our metric names from COCOeval's arrays (area "all" = index 0), the -1 entries of absent classes left out."""
    m = ev.params.maxDets.index(max_dets)
    prec = ev.eval["precision"][:, :, :, 0, m]  # [T, R, K]
    rec = ev.eval["recall"][:, :, 0, m]  # [T, K]
    mean = lambda x: x[x > -1].mean()
    per_class = np.array([prec[:, :, k].mean() if (prec[:, :, k] > -1).all() else np.nan
                          for k in range(prec.shape[2])])
    return dict(AP=mean(prec), AP50=mean(prec[0]), AP75=mean(prec[5]), AR100=mean(rec), per_class_AP=per_class)


def ours(d, labelled, **kwargs):
    labels = dict(pred_labels=d["pred_labels"], gt_labels=d["gt_labels"]) if labelled else {}
    return detection_metrics(d["pred_boxes"], d["pred_scores"], d["gt_boxes"], d["gt_valid"],
                             pred_valid=d["pred_valid"], **labels, **kwargs)


def check(got, ref):
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert got[key] == pytest.approx(ref[key], abs=TOL), key
    assert 0.02 < got["AP"] < 0.98  # the data is neither trivial nor hopeless


@pytest.mark.parametrize("score_ties", [False, True])
def test_class_agnostic_matches_pycocotools(score_ties):
    d = synthetic(np.random.default_rng(0 + score_ties), num_images=40, score_ties=score_ties)
    d["pred_labels"][:] = 0
    d["gt_labels"][:] = 0
    ev = coco_eval(d, num_classes=1)
    got = ours(d, labelled=False)
    check(got, reference(ev))
    assert got["AP"] == pytest.approx(ev.stats[0], abs=TOL) and got["AR100"] == pytest.approx(ev.stats[8], abs=TOL)
    assert got["num_images"] == 40 and got["num_gt"] == int(d["gt_valid"].sum())
    assert "per_class_AP" not in got


@pytest.mark.parametrize("score_ties", [False, True])
def test_per_class_matches_pycocotools(score_ties):
    num_classes = 5
    d = synthetic(np.random.default_rng(10 + score_ties), num_images=45, num_classes=num_classes,
                  score_ties=score_ties)
    # Class 4 has predictions but no GT: COCO leaves it out of the means (-1), we report NaN.
    d["pred_labels"][d["pred_labels"] == 4] = 3
    d["gt_labels"][d["gt_labels"] == 4] = 3
    d["pred_labels"][::3, 0] = 4
    ev = coco_eval(d, num_classes)
    got = ours(d, labelled=True, num_classes=num_classes)
    ref = reference(ev)
    check(got, ref)
    assert np.isnan(got["per_class_AP"][4]) and np.isnan(ref["per_class_AP"][4])
    np.testing.assert_allclose(got["per_class_AP"], ref["per_class_AP"], atol=TOL)
    # A smaller budget, compared with COCOeval's maxDets=10 column.
    check(ours(d, labelled=True, num_classes=num_classes, max_dets=10), reference(ev, max_dets=10))


def test_max_dets_cut():
    """An image with 140 detections: 120 confident false positives push its 20 true positives past rank 100."""
    rng = np.random.default_rng(3)
    d = synthetic(rng, num_images=30, num_classes=3, q=140)
    gt = random_boxes(rng, 8)
    d["gt_boxes"][0], d["gt_valid"][0], d["gt_labels"][0] = gt, True, [0, 1, 2, 0, 1, 2, 0, 1]
    fp = random_boxes(rng, 120) * 0.1 + 0.9 - 0.1  # small boxes in the corner region
    d["pred_boxes"][0] = np.concatenate([fp, np.repeat(gt, 3, axis=0)[:20]])
    d["pred_scores"][0] = np.concatenate([rng.uniform(0.5, 1.0, 120), rng.uniform(0.0, 0.5, 20)])
    d["pred_labels"][0] = np.concatenate([rng.integers(0, 3, 120), np.repeat(d["gt_labels"][0], 3)[:20]])
    d["pred_valid"][0] = True
    for labelled in (False, True):
        if not labelled:
            d = dict(d, pred_labels=np.zeros_like(d["pred_labels"]), gt_labels=np.zeros_like(d["gt_labels"]))
        ev = coco_eval(d, num_classes=3 if labelled else 1)
        kwargs = dict(num_classes=3) if labelled else {}
        got = ours(d, labelled, **kwargs)
        check(got, reference(ev))
        check(ours(d, labelled, max_dets=10, **kwargs), reference(ev, max_dets=10))
        if not labelled:  # per class (~40 per class) the cut bites less; class-agnostic it must change recall
            assert ours(d, labelled, max_dets=1000)["AR100"] > got["AR100"] + 0.01


def test_gt_tie_goes_to_the_last_gt():
    """A detection equally close to two GTs takes the later one (COCOeval's loop), so a second detection that
    only fits that later GT becomes a false positive. Dyadic coordinates make the two IoUs exactly equal (0.6)."""
    gt = np.array([[[0.0, 0.0, 0.25, 0.25], [0.125, 0.0, 0.375, 0.25]]])
    preds = np.array([[[0.0625, 0.0, 0.3125, 0.25], [0.125, 0.0, 0.375, 0.25]]])
    d = dict(pred_boxes=preds, pred_scores=np.array([[0.9, 0.8]]), pred_labels=np.zeros((1, 2), np.int64),
             pred_valid=np.ones((1, 2), bool), gt_boxes=gt, gt_valid=np.ones((1, 2), bool),
             gt_labels=np.zeros((1, 2), np.int64))
    got = ours(d, labelled=False)
    assert got["AP50"] == pytest.approx(51 / 101) and got["AR100"] == pytest.approx(0.5)  # 1 TP then 1 FP
    ref = reference(coco_eval(d, num_classes=1))
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert got[key] == pytest.approx(ref[key], abs=TOL), key


def test_no_gt_and_no_predictions():
    z = np.zeros
    got = detection_metrics(z((3, 0, 4)), z((3, 0)), z((3, 0, 4)), z((3, 0), bool))
    assert np.isnan(got["AP"]) and got["num_gt"] == 0 and got["num_images"] == 3
    got = detection_metrics(z((2, 0, 4)), z((2, 0)), np.full((2, 1, 4), [0.1, 0.1, 0.5, 0.5]), np.ones((2, 1), bool))
    assert got["AP"] == 0.0 and got["AR100"] == 0.0
