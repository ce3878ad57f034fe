"""Metrics against brute force, hand-computed cases and direct formulas."""

import numpy as np
import pytest

from vlm_jax import metrics


def brute_force_recall(sim, text_to_image, ks):
    """Sort every row / column and look at the top k, one query at a time."""
    num_images, num_texts = sim.shape
    out = {}
    for k in ks:
        hits = 0
        for i in range(num_images):
            top = np.argsort(-sim[i], kind="stable")[:k]
            hits += any(text_to_image[t] == i for t in top)
        out[f"i2t@{k}"] = hits / num_images
    for k in ks:
        hits = 0
        for t in range(num_texts):
            top = np.argsort(-sim[:, t], kind="stable")[:k]
            hits += text_to_image[t] in top
        out[f"t2i@{k}"] = hits / num_texts
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_recall_vs_brute_force_five_captions(seed):
    rng = np.random.default_rng(seed)
    num_images = 40
    text_to_image = rng.permutation(np.repeat(np.arange(num_images), 5))   # 5 captions each, shuffled
    sim = rng.normal(size=(num_images, len(text_to_image))).astype(np.float32)
    # Make it non-trivial: boost the true pairs a little so recalls are spread out.
    sim[text_to_image, np.arange(len(text_to_image))] += 1.5
    ks = (1, 5, 10)
    got = metrics.retrieval_recall(sim, text_to_image, ks, chunk=7)   # small chunk exercises the loop
    assert got == pytest.approx(brute_force_recall(sim, text_to_image, ks))
    assert set(got) == {"i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10"}


def test_retrieval_recall_hand_computed():
    # 2 images, 3 texts: texts 0, 1 describe image 0, text 2 describes image 1.
    sim = np.array([[0.1, 0.9, 0.5],
                    [0.8, 0.2, 0.3]])
    got = metrics.retrieval_recall(sim, [0, 0, 1], ks=(1, 2))
    # i2t: image 0 top-1 is text 1 (its own) -> hit; image 1 ranks texts 0 (0.8), 2 (0.3): own at rank 2.
    # t2i: text 0 -> image 1 first (miss@1); text 1 -> image 0 (hit); text 2 -> image 0 first (miss@1).
    assert got == pytest.approx({"i2t@1": 0.5, "i2t@2": 1.0, "t2i@1": 1 / 3, "t2i@2": 1.0})


def test_retrieval_ties_count_against_the_query_and_bad_input():
    got = metrics.retrieval_recall(np.zeros((3, 3)), [0, 1, 2], ks=(1, 3))
    assert got == {"i2t@1": 0.0, "i2t@3": 1.0, "t2i@1": 0.0, "t2i@3": 1.0}
    nan = metrics.retrieval_recall(np.full((2, 2), np.nan), [0, 1], ks=(1,))
    assert nan == {"i2t@1": 0.0, "t2i@1": 0.0}
    with pytest.raises(ValueError, match="at least one caption"):
        metrics.retrieval_recall(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="text_to_image"):
        metrics.retrieval_recall(np.zeros((3, 2)), [0, 1, 2])


def test_box_metrics_hand_computed_with_mask():
    pred = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.4, 0.4], [0.2, 0.2, 0.3, 0.3], [9, 9, 9, 9]])
    tgt = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.4, 0.2], [0.5, 0.5, 0.6, 0.6], [0, 0, 1, 1]])
    got = metrics.box_metrics(pred, tgt, mask=[True, True, True, False])
    ious = [1.0, 0.5, 0.0]
    # Third pair: hull 0.4 x 0.4 = 0.16, union 0.02 -> giou = -(0.14 / 0.16).
    gious = [1.0, 0.5, -(0.16 - 0.02) / 0.16]
    l1 = np.mean(np.abs(pred[:3] - tgt[:3]))
    assert got["iou"] == pytest.approx(np.mean(ious))
    assert got["giou"] == pytest.approx(np.mean(gious))
    assert got["l1"] == pytest.approx(l1)
    assert got["acc@0.5"] == pytest.approx(2 / 3)
    assert got["count"] == 3
    assert metrics.box_metrics(pred, tgt, mask=np.zeros(4, bool))["iou"] == 0.0


def test_spatial_metrics_vs_direct_formula():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=200)          # class 5 never appears in labels ...
    pred = np.where(rng.uniform(size=200) < 0.6, labels, rng.integers(0, 5, size=200))
    pred[:3] = 5                                   # ... but is predicted 3 times
    mask = rng.uniform(size=200) < 0.9
    got = metrics.spatial_metrics(pred, labels, mask, num_classes=6)
    p, y = pred[mask], labels[mask]
    f1s = []
    for c in range(6):
        tp = np.sum((p == c) & (y == c))
        fp = np.sum((p == c) & (y != c))
        fn = np.sum((p != c) & (y == c))
        if tp + fp + fn == 0:
            continue
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    assert got["macro_f1"] == pytest.approx(np.mean(f1s))
    assert got["accuracy"] == pytest.approx(np.mean(p == y))
    cm = np.zeros((6, 6), int)
    for a, b in zip(y, p):
        cm[a, b] += 1
    np.testing.assert_array_equal(got["confusion"], cm)
    # Logits give the same as their argmax.
    logits = np.eye(6)[pred] * 3.0
    assert metrics.spatial_metrics(logits, labels, mask)["macro_f1"] == pytest.approx(got["macro_f1"])


def test_spatial_metrics_class_absent_everywhere_is_excluded():
    got = metrics.spatial_metrics([0, 1, 1], [0, 1, 0], num_classes=6)
    # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 1, fp 1, fn 0 -> 2/3; classes 2..5 absent.
    assert got["macro_f1"] == pytest.approx(2 / 3)
    assert np.isnan(got["per_class_f1"][3])
    with pytest.raises(ValueError, match="spatial_metrics"):
        metrics.spatial_metrics([0, 7], [0, 1])
