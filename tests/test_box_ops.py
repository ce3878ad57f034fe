"""box_ops against direct PyTorch formulas written here (torchvision is not a dependency)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlm_jax import box_ops


def torch_iou_giou(a, b):
    """Reference: per-pair loops over float64 torch tensors, straight from the definitions.

    Empty (inverted) sides count as 0; 0/0 is defined as 0, the module's documented policy.
    """
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    iou = torch.zeros(len(a), len(b), dtype=torch.float64)
    giou = torch.zeros_like(iou)
    for i in range(len(a)):
        for j in range(len(b)):
            ax1, ay1, ax2, ay2 = a[i]
            bx1, by1, bx2, by2 = b[j]
            area_a = torch.clamp(ax2 - ax1, min=0) * torch.clamp(ay2 - ay1, min=0)
            area_b = torch.clamp(bx2 - bx1, min=0) * torch.clamp(by2 - by1, min=0)
            iw = torch.clamp(torch.min(ax2, bx2) - torch.max(ax1, bx1), min=0)
            ih = torch.clamp(torch.min(ay2, by2) - torch.max(ay1, by1), min=0)
            inter = iw * ih
            union = area_a + area_b - inter
            cw = torch.clamp(torch.max(ax2, bx2) - torch.min(ax1, bx1), min=0)
            ch = torch.clamp(torch.max(ay2, by2) - torch.min(ay1, by1), min=0)
            hull = cw * ch
            iou[i, j] = inter / union if union > 0 else 0.0
            giou[i, j] = iou[i, j] - ((hull - union) / hull if hull > 0 else 0.0)
    return iou.numpy(), giou.numpy()


def random_boxes(rng, n):
    xy = rng.uniform(0, 0.7, size=(n, 2))
    wh = rng.uniform(0.01, 0.3, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# Named cases: identical, disjoint, nested, touching edges, zero-area, inverted (x2 < x1), both empty.
SPECIAL_A = np.array([
    [0.1, 0.1, 0.5, 0.5],   # identical to b[0]
    [0.0, 0.0, 0.2, 0.2],   # disjoint from b[1]
    [0.0, 0.0, 1.0, 1.0],   # contains b[2]
    [0.0, 0.0, 0.5, 0.5],   # touches b[3] on an edge
    [0.3, 0.3, 0.3, 0.6],   # zero width
    [0.6, 0.2, 0.4, 0.5],   # inverted x
    [0.5, 0.5, 0.5, 0.5],   # a point
], np.float32)
SPECIAL_B = np.array([
    [0.1, 0.1, 0.5, 0.5],
    [0.6, 0.6, 0.9, 0.9],
    [0.25, 0.25, 0.5, 0.75],
    [0.5, 0.0, 1.0, 0.5],
    [0.2, 0.2, 0.6, 0.6],
    [0.3, 0.1, 0.7, 0.4],
    [0.5, 0.5, 0.5, 0.5],
], np.float32)


def test_pairwise_matches_reference_random_and_special():
    rng = np.random.default_rng(0)
    a = np.concatenate([random_boxes(rng, 9), SPECIAL_A])
    b = np.concatenate([random_boxes(rng, 5), SPECIAL_B])
    iou, union = box_ops.box_iou(jnp.asarray(a), jnp.asarray(b))
    giou = box_ops.generalized_box_iou(jnp.asarray(a), jnp.asarray(b))
    ref_iou, ref_giou = torch_iou_giou(a, b)
    assert iou.shape == union.shape == giou.shape == (len(a), len(b))
    np.testing.assert_allclose(iou, ref_iou, atol=1e-6)
    np.testing.assert_allclose(giou, ref_giou, atol=1e-6)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
    inter = np.asarray(iou) * np.asarray(union)
    np.testing.assert_allclose(np.asarray(union), area(a)[:, None] + area(b)[None, :] - inter, atol=1e-6)


def test_named_cases_values():
    iou, _ = box_ops.box_iou_paired(jnp.asarray(SPECIAL_A), jnp.asarray(SPECIAL_B))
    giou = box_ops.generalized_box_iou_paired(jnp.asarray(SPECIAL_A), jnp.asarray(SPECIAL_B))
    iou, giou = np.asarray(iou), np.asarray(giou)
    assert iou[0] == pytest.approx(1.0) and giou[0] == pytest.approx(1.0)          # identical
    assert iou[1] == 0.0 and giou[1] == pytest.approx(0.0 - (0.81 - 0.04 - 0.09) / 0.81, abs=1e-6)  # disjoint
    assert iou[2] == pytest.approx(0.125) and giou[2] == pytest.approx(0.125)      # nested: hull = outer box
    assert iou[3] == 0.0 and giou[3] == pytest.approx(0.0, abs=1e-7)               # touching: hull = union
    assert iou[4] == 0.0 and iou[5] == 0.0                                         # degenerate: empty box
    assert iou[6] == 0.0 and giou[6] == 0.0                                        # two points: 0/0 -> 0
    assert np.all(np.isfinite(giou)) and np.all(giou >= -1) and np.all(giou <= 1)


def test_paired_is_diagonal_of_pairwise():
    rng = np.random.default_rng(1)
    a, b = jnp.asarray(random_boxes(rng, 6)), jnp.asarray(random_boxes(rng, 6))
    np.testing.assert_allclose(box_ops.box_iou_paired(a, b)[0], jnp.diag(box_ops.box_iou(a, b)[0]), rtol=1e-6)
    np.testing.assert_allclose(box_ops.generalized_box_iou_paired(a, b),
                               jnp.diag(box_ops.generalized_box_iou(a, b)), rtol=1e-6)


def test_format_round_trip_and_area():
    rng = np.random.default_rng(2)
    xyxy = jnp.asarray(random_boxes(rng, 8))
    cxcywh = box_ops.box_xyxy_to_cxcywh(xyxy)
    np.testing.assert_allclose(cxcywh[:, 2], xyxy[:, 2] - xyxy[:, 0], rtol=1e-6)
    np.testing.assert_allclose(cxcywh[:, 0], (xyxy[:, 0] + xyxy[:, 2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(box_ops.box_cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-6)
    np.testing.assert_allclose(box_ops.box_area(xyxy), cxcywh[:, 2] * cxcywh[:, 3], rtol=1e-5)
    assert float(box_ops.box_area(jnp.array([0.5, 0.2, 0.1, 0.9]))) == 0.0   # inverted -> 0


def test_gradients_finite_on_degenerate_boxes():
    a, b = jnp.asarray(SPECIAL_A), jnp.asarray(SPECIAL_B)

    def f(a, b):
        return (box_ops.generalized_box_iou_paired(a, b).sum() + box_ops.box_iou(a, b)[0].sum()
                + box_ops.generalized_box_iou(a, b).sum())

    ga, gb = jax.jit(jax.grad(f, argnums=(0, 1)))(a, b)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="box_iou"):
        box_ops.box_iou(jnp.zeros((3, 4)), jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="generalized_box_iou"):
        box_ops.generalized_box_iou(jnp.zeros((4,)), jnp.zeros((3, 4)))
