"""MultitaskModel and its tasks on a tiny random InternVL: shapes, pooling vs numpy, fusion pairs, determinism,
sizes, gradients, config errors."""

import logging

import clu.parameter_overview
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fixtures import demo_config
from vlm_jax import box_ops, evaluate, losses
from vlm_jax import tasks as tasks_lib
from vlm_jax.models import InternVL, InternVLConfig, pooling
from vlm_jax.multitask import MultitaskModel, late_fusion_features
from vlm_jax.tasks import Task
from vlm_jax.tasks.heads import AttentionBoxHead, box_from_logits, patch_grid

IMG_START, IMG_END, IMG_CONTEXT = 61, 62, 63
B, L = 4, 6


def tiny_backbone():
    return InternVL(InternVLConfig.tiny(vocab_size=64, image_token_id=IMG_CONTEXT), rngs=nnx.Rngs(0))


def embedding_config(**changes):
    cfg = demo_config().model.embedding
    cfg.update(dict(adapter_dim=16, embed_dim=8, map_num_heads=4) | changes)
    return cfg


def task_configs(hidden_dim=12, seed_heads=False, **changes):
    """The demo's tasks with small heads; `seed_heads`: the seed recipe's linear heads."""
    cfg = demo_config().tasks
    cfg.spatial.update(query="caption", head="mlp")  # the form every fusion supports; 'objects' is tested apart
    for name in ("itm", "spatial", "box"):
        cfg[name].hidden_dim = 0 if seed_heads and name != "box" else hidden_dim
    if seed_heads:
        cfg.box.head = "linear"
    for name, fields in changes.items():
        cfg[name].update(fields)
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
        "reference_box": jnp.asarray([[0.6, 0.1, 0.9, 0.6], [0, 0, 0, 0], [0.2, 0.2, 0.3, 0.3], [0.5, 0.5, 0.7, 0.9]],
                                     jnp.float32),
        "relation": jnp.array([0, 3, 5, 1], jnp.int32),
        "has_relation": jnp.array([True, False, True, True]),
        "query_ids": jnp.asarray(text_ids[::-1]), "query_mask": jnp.asarray(text_mask[::-1]),
    }


TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("backbone")))


@nnx.jit
def train_step(model, batch):
    """Loss, gradients of the trainable part (all but the frozen backbone) and the outputs, in one compile."""
    def loss_fn(m):
        outputs = m(batch, train=True)
        return m.loss(outputs, batch)[0], outputs

    (loss, outputs), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE), has_aux=True)(model)
    return loss, grads, outputs


@nnx.jit
def eval_forward(model, batch):
    return model(batch, train=False)


@pytest.fixture(scope="module")
def backbone():
    # Built under jit: one compile instead of many eager initialiser calls.
    return nnx.jit(tiny_backbone)()


@pytest.fixture(scope="module", params=["late", "lm", "late-seed"])
def run(request, backbone):
    """One model per fusion (and the seed recipe's heads on late fusion) on a shared backbone, two train steps and
    (late only: eval does not depend on the fusion's randomness) two eval calls."""
    fusion, _, heads = request.param.partition("-")
    seed = heads == "seed"
    embedding = embedding_config(fusion=fusion, fusion_features="concat" if seed else "interact")
    model = MultitaskModel(backbone, embedding, task_configs(seed_heads=seed),
                           rngs=nnx.Rngs(params=1, dropout=2, itm=3))
    batch = make_batch(backbone.config.num_image_tokens)
    steps = [train_step(model, batch) for _ in range(2)]
    outs = {"train1": steps[0][2], "train2": steps[1][2], "loss": steps[0][0], "grads": steps[0][1]}
    if request.param == "late":
        outs["eval1"], outs["eval2"] = eval_forward(model, batch), eval_forward(model, batch)
    return model, batch, outs


def seed_heads(model):
    return model.config.fusion_features == "concat"


def test_output_shapes_and_ranges(run):
    model, batch, outs = run
    out = outs["train1"]
    e = model.config.embed_dim
    if model.config.fusion == "late":
        fused = (4 if model.config.fusion_features == "interact" else 2) * e
    else:
        fused = model.backbone.config.text.hidden_size
    assert out["image_emb"].shape == out["text_emb"].shape == (B, e)
    assert out["itm_logits"].shape == (3 * B, 2) and out["itm_labels"].shape == out["itm_valid"].shape == (3 * B,)
    assert out["box_pred"].shape == (B, 4) and out["spatial_logits"].shape == (B, 6)
    assert model.tasks["itm"].head.kernel.shape[0] == fused if seed_heads(model) else \
        model.tasks["itm"].head.hidden.kernel.shape[0] == fused
    assert out["logit_scale"].shape == ()
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
    if "eval1" not in outs:
        pytest.skip("the encoders do not depend on the fusion or the heads; checked once")
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
        u, v = out["image_emb"][pairs[:, 0]], out["text_emb"][pairs[:, 1]]
        parts = [u, v] if model.config.fusion_features == "concat" else [u, v, u * v, jnp.abs(u - v)]
        fused = jnp.concatenate(parts, -1)
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
    np.testing.assert_allclose(model.tasks["itm"].head(fused), out["itm_logits"], atol=1e-4)


def test_itm_eval_scores_are_the_heads_log_odds_on_hard_and_random_true_negatives(run):
    model, batch, outs = run
    if "eval1" not in outs:
        pytest.skip("checked with late fusion")
    out = outs["eval1"]
    scores, found = np.asarray(out["itm_scores"]), np.asarray(out["itm_found"])
    assert scores.shape == found.shape == (B, 5)
    logits = np.asarray(out["itm_logits"])
    # Columns 0-2: the positive and the two hard negatives of itm_logits (rows i, B + i, 2B + i).
    np.testing.assert_allclose(scores[:, :3], (logits[:, 1] - logits[:, 0]).reshape(3, B).T, rtol=1e-6)
    np.testing.assert_array_equal(found[:, :3], np.asarray(out["itm_valid"]).reshape(3, B).T)
    # Random negatives exist where a hard one does (same candidate set); rows 0 and 3 show the same image, so
    # each has the two other images' rows as candidates.
    np.testing.assert_array_equal(found[:, 3:], found[:, 1:3])
    assert found.all()


def test_spatial_objects_query_reads_the_image_and_the_query_not_the_caption(backbone):
    """query='objects': the relation comes from (image, "the A and the B"); the caption does not enter."""
    model = MultitaskModel(backbone, embedding_config(), task_configs(spatial=dict(query="objects", head="attention")),
                           rngs=nnx.Rngs(params=1, dropout=2, itm=3))
    batch = make_batch(backbone.config.num_image_tokens)
    base = np.asarray(eval_forward(model, batch)["spatial_logits"])
    assert base.shape == (B, 6) and np.isfinite(base).all()
    other_caption = dict(batch, text_ids=jnp.roll(batch["text_ids"], 1, axis=0),
                         text_mask=jnp.roll(batch["text_mask"], 1, axis=0))
    np.testing.assert_array_equal(eval_forward(model, other_caption)["spatial_logits"], base)
    other_query = dict(batch, query_ids=jnp.roll(batch["query_ids"], 1, axis=0),
                       query_mask=jnp.roll(batch["query_mask"], 1, axis=0))
    other_image = dict(batch, image=batch["image"][::-1])
    for changed in (other_query, other_image):
        assert not np.allclose(eval_forward(model, changed)["spatial_logits"], base)
    missing = {k: v for k, v in batch.items() if not k.startswith("query")}
    with pytest.raises(ValueError, match="query_ids"):
        eval_forward(model, missing)


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
    def build(tasks=None, **changes):
        MultitaskModel(backbone, embedding_config(**changes), tasks or task_configs(), rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="vision_pool"):
        build(vision_pool="max")
    with pytest.raises(ValueError, match="fusion"):
        build(fusion="early")
    with pytest.raises(ValueError, match="fusion_features"):
        build(fusion_features="sum")
    with pytest.raises(ValueError, match="tasks.box.head"):
        build(task_configs(box=dict(head="detr")))
    with pytest.raises(ValueError, match="hidden_dim"):
        build(task_configs(itm=dict(hidden_dim=-1)))
    with pytest.raises(ValueError, match="tasks.spatial.query"):
        build(task_configs(spatial=dict(query="relation")))
    with pytest.raises(ValueError, match="tasks.spatial.head"):
        build(task_configs(spatial=dict(head="conv")))
    with pytest.raises(ValueError, match="fusion='late'"):
        build(task_configs(spatial=dict(query="objects")), fusion="lm")
    unknown = task_configs()
    unknown.detr = dict(weight=1.0)
    with pytest.raises(ValueError, match="unknown tasks"):
        build(unknown)
    with caplog.at_level(logging.WARNING):
        build(text_pool="first")
    assert "first token sees only itself" in caplog.text


def test_seed_recipe_trainable_parameter_counts():
    """InternVL3-1B widths, built abstractly (nothing allocated); the heads are counted from the formulas."""
    cfg = embedding_config(adapter_dim=256, embed_dim=256, vision_pool="cls", text_pool="first", fusion="late",
                           fusion_features="concat")   # the seed recipe
    model = nnx.eval_shape(lambda: MultitaskModel(InternVL(InternVLConfig(image_token_id=151667),
                                                           rngs=nnx.Rngs(0)), cfg, task_configs(seed_heads=True),
                                                  rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params.pop("backbone")
    params.update({f"{name}_head": p["head"] for name, p in params.pop("tasks").items()})
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
    def key(path):  # top-level module, or tasks/<name>
        return "/".join(str(k.key) for k in path[:2]) if path[0].key == "tasks" else path[0].key

    for module in ("vision_adapter", "text_adapter", "vision_proj", "tasks/itm", "tasks/box", "tasks/spatial",
                   "logit_scale"):
        assert any(np.abs(g).sum() > 0 for p, g in flat if key(p) == module), module


def test_first_token_pooling_ignores_the_caption(backbone):
    """Why 'last' is the default: in a causal LM the first token's state cannot see the rest of the caption."""
    ids = jnp.array([[5, 7, 9, 11], [5, 20, 30, 40]], jnp.int32)
    mask = jnp.ones_like(ids)
    hidden = nnx.jit(lambda bb, i, m: bb.language_model(input_ids=i, attention_mask=m)[0])(backbone, ids, mask)
    first, last = pooling.pool_text(hidden, mask, "first"), pooling.pool_text(hidden, mask, "last")
    np.testing.assert_allclose(first[0], first[1], atol=1e-6)
    assert not np.allclose(last[0], last[1], atol=1e-3)


def test_interact_features_separate_matched_pairs_where_concat_cannot():
    """A linear head on [u, v] scores logit(a, b) = w1.a + w2.b + c, so for any weights
    logit(a, a) + logit(b, b) = logit(a, b) + logit(b, a): matched and swapped pairs cannot be told apart. With
    [u, v, u*v, |u-v|], weights 1 on the u*v block score the cosine similarity, which separates them."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j = np.triu_indices(8, 1)
    rows = [(i, i), (j, j), (i, j), (j, i)]   # matched (a, a), (b, b); unmatched (a, b), (b, a)

    concat = [np.asarray(late_fusion_features(jnp.asarray(x[p]), jnp.asarray(x[q]), "concat")) for p, q in rows]
    np.testing.assert_allclose(concat[0], np.concatenate([x[i], x[i]], 1), rtol=1e-6)
    for _ in range(5):   # any linear head
        w, c = rng.normal(size=32), rng.normal()
        s = [f @ w + c for f in concat]
        np.testing.assert_allclose(s[0] + s[1], s[2] + s[3], atol=1e-4)

    inter = [np.asarray(late_fusion_features(jnp.asarray(x[p]), jnp.asarray(x[q]), "interact")) for p, q in rows]
    np.testing.assert_allclose(inter[2], np.concatenate([x[i], x[j], x[i] * x[j], np.abs(x[i] - x[j])], 1),
                               rtol=1e-6, atol=1e-7)
    w = np.zeros(64)
    w[32:48] = 1.0   # the u*v block: the cosine similarity
    threshold = 0.5 * (1.0 + max(np.max(inter[k] @ w) for k in (2, 3)))
    assert all((inter[k] @ w > threshold).all() for k in (0, 1))
    assert all((inter[k] @ w < threshold).all() for k in (2, 3))


def test_patch_grid_and_box_head_position_equivariance():
    """The box head sees where each patch is: moving the patches changes the box, moving them together with their
    grid positions does not (otherwise the head is invariant to the patch order)."""
    np.testing.assert_allclose(patch_grid(2, 3), [[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25],
                                                  [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]], rtol=1e-6)
    head = AttentionBoxHead(6, 8, 2, 16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    query = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    patches = jnp.asarray(rng.normal(size=(3, 6, 8)), jnp.float32)
    grid = patch_grid(2, 3)
    perm = rng.permutation(6)

    @nnx.jit
    def outputs(head, q, p, g):
        return head(q, p, g), head(q, p[:, perm], g), head(q, p[:, perm], g[perm])

    base, moved, moved_with_grid = outputs(head, query, patches, grid)
    assert base.shape == (3, 4) and np.isfinite(base).all()
    assert not np.allclose(moved, base, atol=1e-4)
    np.testing.assert_allclose(moved_with_grid, base, atol=1e-5)


def test_attention_box_head_learns_to_find_the_named_object():
    """Two objects (feature vectors) on a 4x4 patch grid; the query names one of them. A short fit of the box head
    must find the named object's cell (the other object is a distractor; the mean box scores about 0.035 IoU)."""
    side, width, kinds = 4, 16, 4
    codes = np.random.default_rng(5).normal(size=(kinds, width)).astype(np.float32)
    grid = patch_grid(side, side)

    def sample(key, n=64):
        rng = np.random.default_rng(key)
        kind = np.stack([rng.choice(kinds, 2, replace=False) for _ in range(n)])   # [n, 2] target, distractor
        cell = np.stack([rng.choice(side * side, 2, replace=False) for _ in range(n)])
        patches = 0.1 * rng.normal(size=(n, side * side, width)).astype(np.float32)
        patches[np.arange(n)[:, None], cell] += codes[kind]
        query = np.eye(kinds, dtype=np.float32)[kind[:, 0]]
        r, c = np.divmod(cell[:, 0], side)
        box = np.stack([c, r, c + 1, r + 1], 1).astype(np.float32) / side
        return jnp.asarray(query), jnp.asarray(patches), jnp.asarray(box)

    graphdef, params = nnx.split(AttentionBoxHead(kinds, width, 2, 32, rngs=nnx.Rngs(0)))
    tx = optax.adam(1e-2)

    def predict(params, query, patches):
        return box_from_logits(nnx.merge(graphdef, params)(query, patches, grid))

    @jax.jit
    def fit(params, data):
        def step(carry, batch):
            params, opt_state = carry
            def loss_fn(p):
                pred = predict(p, batch[0], batch[1])
                return losses.box_loss(pred, batch[2], jnp.ones(pred.shape[0], bool), 1.0, 1.0)["loss"]
            grads = jax.grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None
        return jax.lax.scan(step, (params, tx.init(params)), data)[0][0]

    data = [sample(k) for k in range(300)]
    params = fit(params, jax.tree.map(lambda *a: jnp.stack(a), *data))
    query, patches, box = sample(1000, 256)
    pred = jax.jit(predict)(params, query, patches)
    iou = np.asarray(box_ops.box_iou_paired(pred, box)[0])
    constant = np.asarray(box_ops.box_iou_paired(jnp.broadcast_to(box.mean(0), box.shape), box)[0])
    # Measured: 0.43 vs 0.035 (a head that ignores the query cannot beat a box between both objects).
    assert iou.mean() > 0.3 > 6 * constant.mean(), (iou.mean(), constant.mean())


class CaptionLengthTask(Task):
    """A task written outside the package: regress each caption's token count from the text embedding."""

    name = "length"
    batch_fields = ("text_mask",)
    eval_outputs = ("length_pred",)
    metric_names = ("length_mae",)

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        self.head = nnx.Linear(widths.embed, 1, rngs=rngs)

    def __call__(self, features, batch, *, train):
        return {"length_pred": self.head(features.text_emb)[:, 0]}

    def loss(self, outputs, batch, valid):
        err = outputs["length_pred"] - batch["text_mask"].sum(-1)
        return {"loss": jnp.sum(jnp.where(valid, err * err, 0.0)) / jnp.maximum(valid.sum(), 1)}

    def metrics(self, collected):
        return {"length_mae": float(np.mean(np.abs(collected["length_pred"] - collected["text_mask"].sum(-1))))}


def test_a_new_task_is_one_class_and_one_config_section(monkeypatch, backbone):
    """The extension point: a Task subclass in TASKS plus its config section; nothing else changes."""
    monkeypatch.setitem(tasks_lib.TASKS, "length", CaptionLengthTask)
    cfg = task_configs()
    cfg.length = dict(weight=0.5)
    model = MultitaskModel(backbone, embedding_config(), cfg, rngs=nnx.Rngs(0))
    batch = make_batch(backbone.config.num_image_tokens)
    outputs, (total, terms) = nnx.jit(lambda m, b: (m(b, train=False), m.loss(m(b, train=False), b)))(model, batch)
    lengths = np.asarray(batch["text_mask"]).sum(-1)
    expected_mse = np.mean((np.asarray(outputs["length_pred"]) - lengths) ** 2)
    assert float(terms["length"]) == pytest.approx(expected_mse, rel=1e-5)
    others = sum(model.tasks[n].weight * float(terms[n]) for n in ("itc", "itm", "box", "spatial"))
    assert float(total) == pytest.approx(others + 0.5 * expected_mse, rel=1e-5)
    collected = {k: np.asarray(v) for k, v in {**outputs, **batch}.items()} | {"loss_terms": {}}
    metrics = evaluate.compute_metrics(model.tasks.values(), collected)
    assert metrics["length_mae"] == pytest.approx(np.mean(np.abs(np.asarray(outputs["length_pred"]) - lengths)))
    assert {"t2i_r1", "box_iou", "spatial_acc"} <= set(metrics)
    for task in model.tasks.values():  # the declared names (checked against best_metric) are the produced ones
        assert set(task.metrics(collected)) == set(task.metric_names), task.name
