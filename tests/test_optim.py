"""Parameter groups, freezing and per-group optimizer settings, checked against direct optax computations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from vlm_jax import optim


class Tower(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)


class Toy(nnx.Module):
    """backbone (frozen) + adapter + head: the shape of the real multitask model's state."""

    def __init__(self, rngs):
        self.backbone = Tower(rngs)
        self.adapter = nnx.Linear(6, 5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.adapter(self.backbone.norm(self.backbone.proj(x)))))


def _group(lr, weight_decay):
    return dict(lr=lr, weight_decay=weight_decay, schedule="constant", warmup_frac=0.0, end_lr_frac=0.0)


def _cfg(**groups):
    cfg = ml_collections.ConfigDict()
    cfg.rules = (("backbone/.*", "frozen"), ("adapter/.*", "adapter"), ("head/.*", "head"))
    cfg.groups = groups or {"adapter": _group(1e-2, 0.1), "head": _group(3e-3, 0.0)}
    cfg.b1, cfg.b2, cfg.eps = 0.9, 0.999, 1e-8
    cfg.grad_clip_norm = 0.0
    cfg.accum_steps = 1
    cfg.decay_vectors = True
    return cfg


def _loss(model, x):
    return jnp.mean(jnp.square(model(x) - 1.0))


def test_unmatched_parameters_are_all_listed():
    params = nnx.state(Toy(nnx.Rngs(0)), nnx.Param)
    groups = optim.ParamGroups((("backbone/.*", "frozen"),))
    with pytest.raises(ValueError) as e:
        groups.labels(params)
    msg = str(e.value)
    for name in ("adapter/kernel", "adapter/bias", "head/kernel", "head/bias"):
        assert name in msg
    assert "backbone" not in msg.split("add a rule for:")[1]


def test_group_without_settings_fails():
    cfg = _cfg(adapter={"lr": 1.0})
    with pytest.raises(ValueError, match="head"):
        optim.make_optimizer(cfg, total_steps=10)


def test_frozen_group_is_identical_and_holds_no_moments_on_full_tree():
    model = Toy(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    opt = optim.make_optimizer(_cfg(), total_steps=10)
    opt_state = opt.tx.init(params)
    x = jax.random.normal(jax.random.key(1), (8, 4))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    start = jax.tree.map(np.asarray, params)
    for _ in range(3):
        grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest), x))(params)
        updates, opt_state = opt.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["backbone"]["proj"]["kernel"][...], start["backbone"]["proj"]["kernel"])
    assert not np.array_equal(params["head"]["kernel"][...], start["head"]["kernel"])
    # Adam's moments for frozen leaves are MaskedNodes (no arrays).
    inner = opt_state[0].inner_states
    mu = inner["adapter"].inner_state[0].mu
    frozen_mu = jax.tree.leaves(mu["backbone"]) if "backbone" in mu else []
    assert frozen_mu == [] or all(isinstance(m, optax.MaskedNode) for m in frozen_mu)
    moments_bytes = optim.tree_bytes(inner)
    trainable = nnx.state(model, optim.ParamGroups.from_config(_cfg().rules).trainable_filter())
    # mu + nu for each trainable group, nothing else (counts are scalars).
    assert moments_bytes <= 2 * optim.tree_bytes(trainable) + 64


def test_trainable_split_differentiates_only_trainable_and_matches_per_group_adamw():
    cfg = _cfg()
    cfg.groups.adapter.schedule = "linear"
    cfg.groups.adapter.warmup_frac = 0.5
    model = Toy(nnx.Rngs(0))
    groups = optim.ParamGroups.from_config(cfg.rules)
    graphdef, trainable, frozen = nnx.split(model, groups.trainable_filter(), ...)
    assert {k for k in trainable} == {"adapter", "head"}
    opt = optim.make_optimizer(cfg, total_steps=4)
    opt_state = opt.tx.init(trainable)
    assert optim.tree_bytes(opt_state) <= 2 * optim.tree_bytes(trainable) + 64

    # The reference: plain optax.adamw per group on plain dicts of arrays, same schedule arithmetic written out.
    def ref_sched(lr, warm, total):
        return lambda c: jnp.where(c < warm, lr * c / warm, lr * (1 - (c - warm) / (total - warm)))

    ref = {"adapter": optax.adamw(ref_sched(1e-2, 2, 4), weight_decay=0.1),
           "head": optax.adamw(3e-3, weight_decay=0.0)}
    ref_params = {k: {n: jnp.asarray(v[...]) for n, v in trainable[k].items()} for k in ("adapter", "head")}
    ref_states = {k: ref[k].init(ref_params[k]) for k in ref}
    x = jax.random.normal(jax.random.key(2), (8, 4))

    def loss_fn(t):
        return _loss(nnx.merge(graphdef, t, frozen), x)

    def ref_loss(p):
        t = jax.tree.map(lambda a: a, trainable)
        for k in p:
            for n in p[k]:
                t[k][n] = t[k][n].replace(p[k][n])
        return loss_fn(t)

    for _ in range(4):
        grads = jax.grad(loss_fn)(trainable)
        norms = optim.group_grad_norms(grads, groups)
        assert set(norms) == {"grad_norm/adapter", "grad_norm/head"}
        updates, opt_state = opt.tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        rg = jax.grad(ref_loss)(ref_params)
        np.testing.assert_allclose(norms["grad_norm/head"], optax.tree.norm(rg["head"]), rtol=1e-6)
        for k in ref:
            u, ref_states[k] = ref[k].update(rg[k], ref_states[k], ref_params[k])
            ref_params[k] = optax.apply_updates(ref_params[k], u)
    for k in ref:
        for n in ref_params[k]:
            np.testing.assert_allclose(trainable[k][n][...], ref_params[k][n], rtol=1e-5, atol=1e-7)


def test_multisteps_accumulates_trainable_only_and_equals_mean_gradient():
    cfg = _cfg()
    cfg.accum_steps = 2
    model = Toy(nnx.Rngs(0))
    groups = optim.ParamGroups.from_config(cfg.rules)
    graphdef, trainable, frozen = nnx.split(model, groups.trainable_filter(), ...)
    opt = optim.make_optimizer(cfg, total_steps=2)
    state = opt.tx.init(trainable)
    # Accumulator + moments: a small multiple of the trainable bytes, independent of the frozen backbone.
    assert optim.tree_bytes(state) <= 3 * optim.tree_bytes(trainable) + 128
    xs = jax.random.normal(jax.random.key(3), (2, 8, 4))
    grad = jax.grad(lambda t, x: _loss(nnx.merge(graphdef, t, frozen), x))
    g0, g1 = grad(trainable, xs[0]), grad(trainable, xs[1])
    u0, state = opt.tx.update(g0, state, trainable)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(u0))
    u1, state = opt.tx.update(g1, state, trainable)
    single = optim.make_optimizer(_cfg(), total_steps=2)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    u_ref, _ = single.tx.update(mean, single.tx.init(trainable), trainable)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_warmup_then_decay(kind):
    s = optim.make_schedule({"lr": 2.0, "schedule": kind, "warmup_frac": 0.1, "end_lr_frac": 0.0}, 100)
    np.testing.assert_allclose(s(0), 0.0)
    np.testing.assert_allclose(s(5), 1.0, rtol=1e-6)
    np.testing.assert_allclose(s(10), 2.0, rtol=1e-6)
    end = {"linear": 0.0, "cosine": 0.0, "constant": 2.0}[kind]
    np.testing.assert_allclose(s(100), end, atol=1e-6)
    if kind == "cosine":
        np.testing.assert_allclose(s(55), 1.0, rtol=1e-5)  # half way through the decay: cos(pi/2) midpoint
