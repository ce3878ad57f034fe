"""MultitaskModel on a tiny random InternVL: shapes, pooling vs numpy, fusion pairs, determinism, sizes, gradients."""

import logging

import clu.parameter_overview
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax import losses
from vlm_jax.models import InternVL, InternVLConfig, pooling
from vlm_jax.models.multitask import MultitaskModel, box_from_logits, default_heads_config

IMG_START, IMG_END, IMG_CONTEXT = 61, 62, 63
B, L = 4, 6


def tiny_backbone():
    return InternVL(InternVLConfig.tiny(vocab_size=64, image_token_id=IMG_CONTEXT), rngs=nnx.Rngs(0))


def heads_config(**changes):
    cfg = default_heads_config()
    cfg.update(dict(adapter_dim=16, embed_dim=8, map_num_heads=4) | changes)
    return cfg


def make_batch(q, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([6, 3, 4, 1])
    text_ids = rng.integers(1, 60, size=(B, L)).astype(np.int32)
    text_mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    text_ids = np.where(text_mask == 1, text_ids, 0)
    block = np.concatenate([np.full((B, 1), IMG_START), np.full((B, q), IMG_CONTEXT), np.full((B, 1), IMG_END)], 1)
    prompt_ids = np.concatenate([block, text_ids], 1).astype(np.int32)
    prompt_mask = np.concatenate([np.ones((B, q + 2), np.int32), text_mask], 1)
    return {
        "image": jnp.asarray(rng.normal(size=(B, 32, 32, 3)), jnp.float32),
        "image_id": jnp.array([0, 1, 2, 0], jnp.int32),     # rows 0 and 3 show the same image
        "text_ids": jnp.asarray(text_ids), "text_mask": jnp.asarray(text_mask),
        "prompt_ids": jnp.asarray(prompt_ids), "prompt_mask": jnp.asarray(prompt_mask),
        "box": jnp.asarray([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.4, 0.9], [0, 0, 1, 1], [0.3, 0.3, 0.3, 0.3]],
                           jnp.float32),
        "has_box": jnp.array([True, True, False, True]),
        "relation": jnp.array([0, 3, 5, 1], jnp.int32),
        "has_relation": jnp.array([True, False, True, True]),
    }


TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("backbone")))


@nnx.jit
def train_step(model, batch):
    """Loss, gradients of the trainable part (all but the frozen backbone) and the outputs, in one compile."""
    def loss_fn(m):
        outputs = m(batch, train=True)
        return losses.total_loss(outputs, batch, {"box_giou": 1.0})[0], outputs

    (loss, outputs), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE), has_aux=True)(model)
    return loss, grads, outputs


@nnx.jit
def eval_forward(model, batch):
    return model(batch, train=False)


@pytest.fixture(scope="module")
def backbone():
    # Built under jit: one compile instead of many eager initialiser calls.
    return nnx.jit(tiny_backbone)()


@pytest.fixture(scope="module", params=["late", "lm"])
def run(request, backbone):
    """One model per fusion on a shared backbone, two train steps and (late only: eval does not depend on the
    fusion's randomness) two eval calls."""
    model = MultitaskModel(backbone, heads_config(fusion=request.param), rngs=nnx.Rngs(params=1, dropout=2, itm=3))
    batch = make_batch(backbone.config.num_image_tokens)
    steps = [train_step(model, batch) for _ in range(2)]
    outs = {"train1": steps[0][2], "train2": steps[1][2], "loss": steps[0][0], "grads": steps[0][1]}
    if request.param == "late":
        outs["eval1"], outs["eval2"] = eval_forward(model, batch), eval_forward(model, batch)
    return model, batch, outs


def test_output_shapes_and_ranges(run):
    model, batch, outs = run
    out = outs["train1"]
    e = model.config.embed_dim
    fused = 2 * e if model.config.fusion == "late" else model.backbone.config.text.hidden_size
    assert out["image_emb"].shape == out["text_emb"].shape == (B, e)
    assert out["itm_logits"].shape == (3 * B, 2) and out["itm_labels"].shape == out["itm_valid"].shape == (3 * B,)
    assert out["box_pred"].shape == (B, 4) and out["spatial_logits"].shape == (B, 6)
    assert out["fused"].shape == (B, fused) and out["logit_scale"].shape == ()
    np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=1e-5)
    box = np.asarray(out["box_pred"])
    assert (box >= 0).all() and (box <= 1).all() and (box[:, 2:] >= box[:, :2]).all()
    assert float(out["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    # ITM pairs: positives first, then negatives that never show the same image as their text.
    pairs, ids = np.asarray(out["itm_pairs"]), np.asarray(batch["image_id"])
    np.testing.assert_array_equal(pairs[:B], np.stack([np.arange(B)] * 2, 1))
    assert (ids[pairs[B:, 0]] != ids[pairs[B:, 1]]).all()
    np.testing.assert_array_equal(out["itm_labels"], [1] * B + [0] * 2 * B)


def test_eval_is_deterministic_and_train_is_not(run):
    _, _, outs = run
    if "eval1" not in outs:
        pytest.skip("checked with late fusion")
    for k in outs["eval1"]:
        np.testing.assert_array_equal(outs["eval1"][k], outs["eval2"][k], err_msg=k)
    assert not np.allclose(outs["train1"]["image_emb"], outs["train2"]["image_emb"])   # new dropout masks


def test_encoders_match_forward_in_eval(run):
    model, batch, outs = run
    if model.config.fusion != "late":
        pytest.skip("the encoders do not depend on the fusion; checked once")
    img, txt = nnx.jit(lambda m, b: (m.encode_image(b["image"]), m.encode_text(b["text_ids"], b["text_mask"])))(
        model, batch)
    np.testing.assert_allclose(img, outs["eval1"]["image_emb"], atol=1e-5)
    np.testing.assert_allclose(txt, outs["eval1"]["text_emb"], atol=1e-5)


def test_itm_pairs_are_the_fused_inputs(run):
    """Recompute each ITM row from its (image, text) pair by hand and compare the head's logits."""
    model, batch, outs = run
    out = outs["train1"]
    pairs = np.asarray(out["itm_pairs"])
    if model.config.fusion == "late":
        fused = jnp.concatenate([out["image_emb"][pairs[:, 0]], out["text_emb"][pairs[:, 1]]], -1)
    else:
        last = np.asarray(batch["prompt_mask"]).sum(1)[pairs[:, 1]] - 1   # right padding: length - 1

        @nnx.jit
        def fused_pass(model, image, ids, mask):
            bb = model.backbone
            embeds = bb.merge_image_embeddings(ids, bb.image_embeddings(image))
            hidden, _ = bb.language_model(inputs_embeds=embeds, attention_mask=mask)
            return hidden[jnp.arange(len(last)), last]

        fused = fused_pass(model, batch["image"][pairs[:, 0]], batch["prompt_ids"][pairs[:, 1]],
                           batch["prompt_mask"][pairs[:, 1]])
    np.testing.assert_allclose(model.itm_head(fused), out["itm_logits"], atol=1e-4)


def test_text_pooling_vs_numpy():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 5, 4)).astype(np.float32)
    right = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = right[:, ::-1].copy()
    for mask in (right, left):
        idx = [max(np.nonzero(m)[0]) for m in mask]
        np.testing.assert_allclose(pooling.pool_text(jnp.asarray(h), jnp.asarray(mask), "last"),
                                   h[np.arange(3), idx])
        first = [min(np.nonzero(m)[0]) for m in mask]
        np.testing.assert_allclose(pooling.pool_text(jnp.asarray(h), jnp.asarray(mask), "first"),
                                   h[np.arange(3), first])
        mean = np.stack([h[i][mask[i] == 1].mean(0) for i in range(3)])
        np.testing.assert_allclose(pooling.pool_text(jnp.asarray(h), jnp.asarray(mask), "mean"), mean, rtol=1e-6)


def test_vision_pooling_vs_numpy_and_map_is_permutation_invariant():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(pooling.pool_vision(jnp.asarray(h), "cls"), h[:, 0])
    np.testing.assert_allclose(pooling.pool_vision(jnp.asarray(h), "mean"), h[:, 1:].mean(1), rtol=1e-6)
    head = pooling.MAPHead(8, 2, rngs=nnx.Rngs(0))
    perm = np.concatenate([[0], 1 + rng.permutation(4)])
    changed, changed_cls = h.copy(), h.copy()
    changed[:, 2] += 1.0
    changed_cls[:, 0] += 1.0   # map pools the patch tokens only
    stack = jnp.asarray(np.stack([h, h[:, perm], changed, changed_cls]))   # [4, B, 1 + P, D]
    out = nnx.jit(lambda m, x: nnx.vmap(lambda y: pooling.pool_vision(y, "map", m), in_axes=0)(x))(head, stack)
    np.testing.assert_allclose(out[1], out[0], atol=1e-5)
    assert not np.allclose(out[2], out[0])
    np.testing.assert_allclose(out[3], out[0], atol=1e-6)


def test_box_from_logits_is_valid_everywhere():
    raw = jnp.asarray(np.random.default_rng(2).normal(size=(64, 4)) * 20)
    box = np.asarray(box_from_logits(raw))
    assert (box >= 0).all() and (box <= 1).all() and (box[:, 2:] >= box[:, :2]).all()
    np.testing.assert_allclose(box_from_logits(jnp.zeros(4)), [0.25, 0.25, 0.75, 0.75])
    g = jax.jit(jax.grad(lambda r: box_from_logits(r).sum()))(raw)
    assert np.isfinite(g).all()


def test_config_errors_and_first_token_warning(caplog, backbone):
    def build(**changes):
        MultitaskModel(backbone, heads_config(**changes), rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="vision_pool"):
        build(vision_pool="max")
    with pytest.raises(ValueError, match="fusion"):
        build(fusion="early")
    with pytest.raises(ValueError, match="unknown keys"):
        MultitaskModel(backbone, {"embed_width": 3}, rngs=nnx.Rngs(0))
    with caplog.at_level(logging.WARNING):
        build(text_pool="first")
    assert "first token sees only itself" in caplog.text


def test_seed_recipe_trainable_parameter_counts():
    """InternVL3-1B widths, built abstractly (nothing allocated); the heads are counted from the formulas."""
    cfg = default_heads_config()
    cfg.update(dict(vision_pool="cls", text_pool="first", fusion="late"))   # the seed recipe
    model = nnx.eval_shape(lambda: MultitaskModel(InternVL(InternVLConfig(image_token_id=151667),
                                                           rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params.pop("backbone")
    print(clu.parameter_overview.get_parameter_overview(params, include_stats=False))
    dv, d, a, e = 1024, 896, 256, 256
    expected = {
        "vision_adapter": dv * a + a, "text_adapter": d * a + a,
        "vision_proj": a * e + e, "text_proj": a * e + e, "logit_scale": 1,
        "itm_head": 2 * e * 2 + 2, "box_head": 2 * e * 4 + 4, "spatial_head": 2 * e * 6 + 6,
    }
    got = {k: clu.parameter_overview.count_parameters(v) if isinstance(v, dict) else int(np.prod(v.shape))
           for k, v in params.items()}
    assert got == expected
    assert clu.parameter_overview.count_parameters(params) == sum(expected.values())


def test_gradients_finite_through_total_loss(run):
    """Gradients of the trainable part (everything but the frozen backbone) through the total loss."""
    model, batch, outs = run
    assert np.isfinite(float(outs["loss"]))
    flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(outs["grads"]))
    assert flat and all(np.isfinite(g).all() for _, g in flat)
    assert not any(p[0].key == "backbone" for p, _ in flat)
    for head in ("vision_adapter", "text_adapter", "vision_proj", "itm_head", "box_head", "spatial_head",
                 "logit_scale"):
        assert any(np.abs(g).sum() > 0 for p, g in flat if p[0].key == head), head


def test_first_token_pooling_ignores_the_caption(backbone):
    """Why 'last' is the default: in a causal LM the first token's state cannot see the rest of the caption."""
    ids = jnp.array([[5, 7, 9, 11], [5, 20, 30, 40]], jnp.int32)
    mask = jnp.ones_like(ids)
    hidden = nnx.jit(lambda bb, i, m: bb.language_model(input_ids=i, attention_mask=m)[0])(backbone, ids, mask)
    first, last = pooling.pool_text(hidden, mask, "first"), pooling.pool_text(hidden, mask, "last")
    np.testing.assert_allclose(first[0], first[1], atol=1e-6)
    assert not np.allclose(last[0], last[1], atol=1e-3)
