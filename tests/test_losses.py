"""Losses against direct PyTorch formulas, the sampling rules of ITM negatives, the weighted total over the tasks,
and bad-input behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm_jax import losses
from vlm_jax import tasks as tasks_lib
from vlm_jax.tasks import itm
from fixtures import make_tasks


def torch_clip_loss(img, txt, scale, image_ids=None):
    img = F.normalize(torch.as_tensor(img, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.as_tensor(txt, dtype=torch.float64), dim=-1)
    logits = scale * img @ txt.T
    if image_ids is not None:
        ids = torch.as_tensor(image_ids)
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)).item() / 2


def test_contrastive_matches_torch_cross_entropy():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 16)).astype(np.float32), rng.normal(size=(6, 16)).astype(np.float32)
    out = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 14.3)
    assert float(out["loss"]) == pytest.approx(torch_clip_loss(img, txt, 14.3), rel=1e-5)
    # Unnormalised inputs: the loss normalises inside, so scaling rows changes nothing.
    out2 = losses.contrastive_loss(jnp.asarray(img) * 7.0, jnp.asarray(txt) * 0.1, 14.3)
    assert float(out2["loss"]) == pytest.approx(float(out["loss"]), rel=1e-5)


def test_contrastive_masks_duplicate_images():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    ids = np.array([0, 1, 0, 2, 1, 3])
    out = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, jnp.asarray(ids))
    assert float(out["loss"]) == pytest.approx(torch_clip_loss(img, txt, 10.0, ids), rel=1e-5)
    plain = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 10.0)
    assert float(plain["loss"]) != pytest.approx(float(out["loss"]), rel=1e-3)


def test_matryoshka_is_mean_over_prefixes():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(5, 32)).astype(np.float32), rng.normal(size=(5, 32)).astype(np.float32)
    out = losses.matryoshka_contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 5.0, (8, 16, 32))
    ref = [torch_clip_loss(img[:, :d], txt[:, :d], 5.0) for d in (8, 16, 32)]
    assert float(out["d8"]) == pytest.approx(ref[0], rel=1e-5)
    assert float(out["loss"]) == pytest.approx(np.mean(ref), rel=1e-5)
    with pytest.raises(ValueError, match="matryoshka_dims"):
        losses.matryoshka_contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 5.0, (8, 64))


def test_hard_negatives_exclude_same_image_and_follow_softmax():
    rng = np.random.default_rng(3)
    sim = jnp.asarray(rng.normal(size=(6, 6)).astype(np.float32) * 2)
    ids = jnp.array([0, 1, 0, 2, 3, 3])
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.jit(jax.vmap(lambda k: itm.sample_hard_negatives(sim, ids, k)))(keys)
    same = np.asarray(ids)[:, None] == np.asarray(ids)[None, :]
    rows = np.arange(6)
    neg_t, neg_i = np.asarray(draws["neg_text"]), np.asarray(draws["neg_image"])
    assert not same[rows[None, :], neg_t].any()   # image i never gets a text of its own image
    assert not same[neg_i, rows[None, :]].any()   # text j never gets its own image
    assert np.asarray(draws["neg_text_valid"]).all() and np.asarray(draws["neg_image_valid"]).all()
    # Empirical frequencies vs softmax over the allowed entries (row 0 of i2t, column 0 for t2i).
    s = np.asarray(sim, np.float64)
    p = np.where(~same[0], np.exp(s[0]), 0.0)
    p /= p.sum()
    freq = np.bincount(neg_t[:, 0], minlength=6) / len(keys)
    np.testing.assert_allclose(freq, p, atol=0.03)
    q = np.where(~same[:, 0], np.exp(s[:, 0]), 0.0)
    q /= q.sum()
    np.testing.assert_allclose(np.bincount(neg_i[:, 0], minlength=6) / len(keys), q, atol=0.03)
    # rng=None: the hardest allowed negative.
    hard = itm.sample_hard_negatives(sim, ids, None)
    np.testing.assert_array_equal(hard["neg_text"], np.argmax(np.where(same, -np.inf, s), axis=1))
    np.testing.assert_array_equal(hard["neg_image"], np.argmax(np.where(same, -np.inf, s), axis=0))


def test_hard_negatives_when_no_negative_exists():
    out = itm.sample_hard_negatives(jnp.zeros((3, 3)), jnp.array([5, 5, 5]), jax.random.key(1))
    assert not np.asarray(out["neg_text_valid"]).any() and not np.asarray(out["neg_image_valid"]).any()
    np.testing.assert_array_equal(out["neg_text"], [0, 1, 2])


def test_itm_loss_is_class_balanced():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(9, 2)).astype(np.float32)
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0])
    valid = np.array([1, 1, 1, 1, 1, 0, 1, 1, 1], bool)
    out = losses.itm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    ce = F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels), reduction="none").numpy()
    expect = 0.5 * (ce[:3].mean() + ce[[3, 4, 6, 7, 8]].mean())
    assert float(out["loss"]) == pytest.approx(expect, rel=1e-5)
    acc = (logits.argmax(-1) == labels)[valid].mean()
    assert float(out["acc"]) == pytest.approx(acc)


def test_box_loss_matches_direct_formula_and_masks():
    pred = np.array([[0.1, 0.1, 0.4, 0.5], [0.2, 0.3, 0.6, 0.9], [np.nan, 0, 1, 1]], np.float32)
    tgt = np.array([[0.0, 0.2, 0.5, 0.5], [0.5, 0.5, 0.7, 0.8], [np.inf, 0, 0, 0]], np.float32)
    has = np.array([True, True, False])
    out = losses.box_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(has), 1.0, 2.0)

    def giou(a, b):
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
        return inter / union - (hull - union) / hull

    l1 = np.abs(pred[:2] - tgt[:2]).mean()
    g = np.mean([giou(pred[0], tgt[0]), giou(pred[1], tgt[1])])
    assert float(out["l1"]) == pytest.approx(l1, rel=1e-5)
    assert float(out["giou"]) == pytest.approx(g, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(l1 + 2.0 * (1 - g), rel=1e-5)
    assert float(out["num_boxes"]) == 2.0


def test_spatial_loss_masks_and_matches_torch():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(5, 6)).astype(np.float32)
    labels = np.array([0, 3, -1, 5, 99])     # garbage labels where there is no relation
    has = np.array([True, True, False, True, False])
    out = losses.spatial_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(has))
    ref = F.cross_entropy(torch.as_tensor(logits[has]), torch.as_tensor(labels[has])).item()
    assert float(out["loss"]) == pytest.approx(ref, rel=1e-5)


def make_case(b=4, e=16, seed=0):
    rng = np.random.default_rng(seed)
    outputs = {
        "image_emb": jnp.asarray(rng.normal(size=(b, e)), jnp.float32),
        "text_emb": jnp.asarray(rng.normal(size=(b, e)), jnp.float32),
        "logit_scale": jnp.float32(1 / 0.07),
        "itm_logits": jnp.asarray(rng.normal(size=(3 * b, 2)), jnp.float32),
        "itm_labels": jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)]),
        "box_pred": jnp.asarray(rng.uniform(0, 1, size=(b, 4)), jnp.float32),
        "spatial_logits": jnp.asarray(rng.normal(size=(b, 6)), jnp.float32),
        "itm_valid": jnp.ones(3 * b, bool),
        # (image row, caption row): positives, then (i, i+1) and (i+1, i) as negatives
        "itm_pairs": jnp.asarray(np.concatenate([np.stack([np.arange(b)] * 2, 1),
                                                 np.stack([np.arange(b), (np.arange(b) + 1) % max(b, 1)], 1),
                                                 np.stack([(np.arange(b) + 1) % max(b, 1), np.arange(b)], 1)]),
                                 jnp.int32).reshape(3 * b, 2),
    }
    batch = {
        "image_id": jnp.arange(b, dtype=jnp.int32),
        "box": jnp.asarray(np.sort(rng.uniform(0, 1, size=(b, 2, 2)), axis=1).transpose(0, 2, 1).reshape(b, 4),
                           jnp.float32),
        "has_box": jnp.asarray(np.arange(b) % 2 == 0),
        "relation": jnp.asarray(rng.integers(0, 6, size=b), jnp.int32),
        "has_relation": jnp.asarray(np.arange(b) % 2 == 1),
    }
    return outputs, batch


FLOAT_KEYS = ("image_emb", "text_emb", "logit_scale", "itm_logits", "box_pred", "spatial_logits")


# The seed recipe's task settings: ITC + ITM + 0.1 L1(box) + 0.1 CE(spatial).
SEED = dict(itc=dict(weight=1.0, matryoshka=0.0), itm=dict(weight=1.0), box=dict(weight=0.1, l1=1.0, giou=0.0),
            spatial=dict(weight=0.1))


def seed_tasks(**changes):
    """Task modules with the seed recipe's weights, updated by ``changes`` ({task: {field: value}})."""
    return make_tasks({name: dict(SEED[name], **changes.get(name, {})) for name in SEED})


def jit_total(outputs, batch, tasks=None):
    """Jitted total loss over the tasks (eager dispatch of its many small ops is slow on a busy CPU)."""
    tasks = seed_tasks() if tasks is None else tasks
    return jax.jit(lambda o, b: tasks_lib.total_loss(tasks, o, b))(outputs, batch)


def total_and_grads(outputs, batch, tasks=None):
    """Jitted total loss and its gradient with respect to the float model outputs."""
    tasks = seed_tasks() if tasks is None else tasks
    ints = {k: v for k, v in outputs.items() if k not in FLOAT_KEYS}

    def f(floats):
        return tasks_lib.total_loss(tasks, {**floats, **ints}, batch)[0]

    floats = {k: outputs[k] for k in FLOAT_KEYS}
    return jax.jit(jax.value_and_grad(f))(floats)


def test_total_is_weighted_sum_of_the_tasks():
    outputs, batch = make_case()
    total, terms = jit_total(outputs, batch)
    expect = terms["itc"] + terms["itm"] + 0.1 * terms["box_l1"] + 0.1 * terms["spatial"]
    assert float(total) == pytest.approx(float(expect), rel=1e-6)
    ref_itc = torch_clip_loss(outputs["image_emb"], outputs["text_emb"], 1 / 0.07)
    assert float(terms["itc"]) == pytest.approx(ref_itc, rel=1e-5)
    tasks = seed_tasks(box=dict(giou=1.0), itc=dict(matryoshka=0.5, matryoshka_dims=(4, 8, 16)))
    total2, terms2 = jit_total(outputs, batch, tasks)
    mrl = np.mean([torch_clip_loss(outputs["image_emb"][:, :d], outputs["text_emb"][:, :d], 1 / 0.07)
                   for d in (4, 8, 16)])
    expect2 = ref_itc + 0.5 * mrl + terms["itm"] + 0.1 * (terms["box_l1"] + 1 - terms2["box_giou"]) \
        + 0.1 * terms["spatial"]
    assert float(total2) == pytest.approx(float(expect2), rel=1e-5)
    assert set(terms2) >= {"itc_matryoshka_d4", "itc_matryoshka_d16", "itc_contrastive", "total"}
    # A task left out of config.tasks adds nothing.
    no_box = {k: v for k, v in seed_tasks().items() if k != "box"}
    total3, terms3 = jit_total(outputs, batch, no_box)
    assert float(total3) == pytest.approx(float(expect - 0.1 * terms["box_l1"]), rel=1e-6)
    assert "box" not in terms3


def test_nan_policy_masked_ignored_valid_propagates():
    outputs, batch = make_case()
    # NaN in rows without box / relation: ignored, finite loss and finite gradients.
    batch_nan = dict(batch, box=batch["box"].at[1].set(jnp.nan), relation=batch["relation"].at[0].set(-7))
    outputs_nan = dict(outputs, box_pred=outputs["box_pred"].at[1].set(jnp.nan),
                       spatial_logits=outputs["spatial_logits"].at[0].set(jnp.inf))
    total, grads = total_and_grads(outputs_nan, batch_nan, seed_tasks(box=dict(giou=1.0)))
    assert np.isfinite(float(total))
    for name in ("box_pred", "spatial_logits", "image_emb", "itm_logits"):
        assert np.all(np.isfinite(grads[name])), name
    np.testing.assert_array_equal(grads["box_pred"][1], 0.0)
    # NaN where a label is valid: the total is non-finite (the train step's finite check sees it).
    bad = dict(outputs, box_pred=outputs["box_pred"].at[0].set(jnp.nan))
    assert not np.isfinite(float(jit_total(bad, batch)[0]))
    bad = dict(outputs, image_emb=outputs["image_emb"].at[2, 3].set(jnp.inf))
    assert not np.isfinite(float(jit_total(bad, batch)[0]))


def test_empty_batch_and_nothing_valid_give_zero_with_finite_grads():
    outputs, batch = make_case(b=0)
    total, terms = jit_total(outputs, batch, seed_tasks(box=dict(giou=1.0)))
    assert float(total) == 0.0 and all(np.isfinite(float(v)) for v in terms.values())
    outputs, batch = make_case(b=3)
    batch = dict(batch, has_box=jnp.zeros(3, bool), has_relation=jnp.zeros(3, bool))
    total, terms = jit_total(outputs, batch, seed_tasks(box=dict(giou=1.0)))
    assert float(terms["box"]) == 0.0 and float(terms["spatial"]) == 0.0
    _, grads = total_and_grads(outputs, batch, seed_tasks(box=dict(giou=1.0)))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(grads["box_pred"], 0.0)


def test_gradients_finite_on_edge_cases():
    # Zero embeddings, identical embeddings, degenerate and inverted boxes, a batch of one.
    b = 3
    outputs, batch = make_case(b=b)
    outputs = dict(outputs, image_emb=jnp.zeros((b, 16)), text_emb=jnp.ones((b, 16)),
                   box_pred=jnp.array([[0.5, 0.5, 0.5, 0.5], [0.7, 0.2, 0.1, 0.9], [0, 0, 1, 1.0]]))
    batch = dict(batch, has_box=jnp.ones(b, bool),
                 box=jnp.array([[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]))
    total, grads = total_and_grads(outputs, batch, seed_tasks(box=dict(giou=1.0), itc=dict(matryoshka=1.0, matryoshka_dims=(8, 16))))
    assert np.isfinite(float(total))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    one, one_batch = make_case(b=1)
    _, g1 = total_and_grads(one, one_batch)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g1))


def test_padding_rows_count_nowhere():
    rng = np.random.default_rng(6)
    img, txt = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    ids = np.array([0, 1, 0, 2, 3, 4])
    valid = np.array([True, True, True, False, True, False])
    out = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, jnp.asarray(ids), jnp.asarray(valid))
    assert float(out["loss"]) == pytest.approx(torch_clip_loss(img[valid], txt[valid], 10.0, ids[valid]), rel=1e-5)
    neg = jax.jit(jax.vmap(lambda k: itm.sample_hard_negatives(jnp.asarray(img @ txt.T), jnp.asarray(ids), k,
                                                                  jnp.asarray(valid))))(
        jax.random.split(jax.random.key(2), 200))
    assert valid[np.asarray(neg["neg_text"])[:, valid]].all() and valid[np.asarray(neg["neg_image"])[:, valid]].all()
    assert not np.asarray(neg["neg_text_valid"])[:, ~valid].any()
    # The total with `valid` equals the total on the valid rows alone (ITM rows checked through itm_pairs).
    outputs, batch = make_case(b=6, seed=7)
    keep = np.flatnonzero(valid)
    pairs = np.concatenate([np.stack([np.arange(6)] * 2, 1), np.array([[0, 1], [1, 2], [2, 4], [3, 0], [4, 0],
                                                                         [5, 1]])])
    outputs = dict(outputs, itm_logits=outputs["itm_logits"][:12], itm_labels=outputs["itm_labels"][:12],
                   itm_valid=outputs["itm_valid"][:12], itm_pairs=jnp.asarray(pairs))
    full_batch = dict(batch, image_id=jnp.asarray(ids), valid=jnp.asarray(valid))
    _, terms = jit_total(outputs, full_batch, seed_tasks(box=dict(giou=1.0)))
    itm_keys = ("itm_logits", "itm_labels", "itm_valid", "itm_pairs")
    sub_out = {k: v[keep] for k, v in outputs.items() if k not in ("logit_scale", *itm_keys)}
    pair_ok = valid[pairs[:, 0]] & valid[pairs[:, 1]]
    # The valid pairs, re-indexed to the valid rows (an ITM pair's rows must exist in the smaller batch).
    new_row = np.cumsum(valid) - 1
    sub_out.update(logit_scale=outputs["logit_scale"], itm_logits=outputs["itm_logits"][pair_ok],
                   itm_labels=outputs["itm_labels"][pair_ok], itm_valid=outputs["itm_valid"][pair_ok],
                   itm_pairs=jnp.asarray(new_row[pairs[pair_ok]]))
    sub_batch = {k: v[keep] for k, v in full_batch.items() if k != "valid"}
    _, sub_terms = jit_total(sub_out, sub_batch, seed_tasks(box=dict(giou=1.0)))
    for k in ("itc", "itm", "box", "spatial", "total"):
        assert float(terms[k]) == pytest.approx(float(sub_terms[k]), rel=1e-5), k


def test_locate_loss_is_the_mean_l1_to_the_box_centres_over_valid_rows():
    centres = jnp.asarray([[[0.5, 0.5], [0.1, 0.2]], [[jnp.nan, 0.0], [0.0, 0.0]]], jnp.float32)
    boxes = jnp.asarray([[[0.4, 0.4, 0.8, 0.8], [0.0, 0.0, 0.2, 0.2]], [[0, 0, 1, 1], [0, 0, 1, 1]]], jnp.float32)
    valid = jnp.array([True, False])
    # Row 0: |0.5-0.6| + |0.5-0.6| + |0.1-0.1| + |0.2-0.1| over 4 coordinates; row 1 (NaN) is masked out.
    assert float(losses.locate_loss(centres, boxes, valid)) == pytest.approx((0.1 + 0.1 + 0.0 + 0.1) / 4, abs=1e-6)
    grad = jax.grad(lambda c: losses.locate_loss(c, boxes, valid))(centres)
    assert np.isfinite(np.asarray(grad)).all()
