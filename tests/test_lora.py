"""LoRA dropout in a scanned stack: PEFT's semantics (dropout on the update's input), a mask per layer, training
only, reproducible from the step key."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vlm_jax import lora
from vlm_jax.models import layers
from vlm_jax.trainer import _fresh_rngs

L, WIDTH, RATE = 3, 16, 0.25


class Block(nnx.Module):
    def __init__(self, rngs):
        self.proj = layers.Linear(WIDTH, WIDTH, ("embed", "mlp"), use_bias=False, rngs=rngs)


class Stack(nnx.Module):
    def __init__(self, rngs):
        self.layers = layers.stacked(Block, L, rngs)


def _identity_update_model():
    """A stack whose layers compute y = x (2 I) + (dropout(x) I) I: the base path sees x, the update its dropout."""
    model = Stack(nnx.Rngs(0))
    cfg = ml_collections.ConfigDict(dict(rank=WIDTH, alpha=float(WIDTH), dropout=RATE, targets=("layers/proj",),
                                         vision_layers=(), text_layers=()))
    assert lora.attach(model, cfg, nnx.Rngs(1)) == ["layers/proj"]
    proj = model.layers.proj
    eye = jnp.broadcast_to(jnp.eye(WIDTH), (L, WIDTH, WIDTH))
    proj.kernel.set_value(2 * eye)
    proj.lora_a.set_value(eye)
    proj.lora_b.set_value(eye)
    return model


def test_lora_dropout_drops_the_update_input_with_a_mask_per_layer_in_training_only():
    model = _identity_update_model()
    graphdef, rng_state, rest = nnx.split(model, nnx.RngState, ...)
    key_shapes = [x.shape for x in jax.tree.leaves(rng_state)]
    assert key_shapes and all(s == (L,) for s in key_shapes)  # one key (and count) per stacked layer
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (64, WIDTH)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=1)
    def outputs(key, train):
        m = nnx.merge(graphdef, _fresh_rngs(rng_state, key), rest, copy=True)
        body = lambda carry, block: (carry, block.proj(carry))  # noqa: E731  every layer sees x
        return layers.scan_layers(body, x, lora.training_view(m, train).layers)[1]  # [L, 64, WIDTH]

    ys = np.asarray(outputs(jax.random.key(7), True)) - 2 * np.asarray(x)  # the update alone
    kept = np.abs(ys) > 1e-6
    np.testing.assert_allclose(ys[kept], np.broadcast_to(np.asarray(x) / (1 - RATE), ys.shape)[kept], rtol=1e-5)
    assert abs(1 - kept.mean() - RATE) < 0.04, kept.mean()
    assert not np.array_equal(kept[0], kept[1]) and not np.array_equal(kept[1], kept[2])
    np.testing.assert_array_equal(outputs(jax.random.key(7), True) - 2 * x, ys)  # same step key, same masks
    assert not np.array_equal(np.asarray(outputs(jax.random.key(8), True) - 2 * x), ys)
    np.testing.assert_allclose(outputs(jax.random.key(7), False), np.broadcast_to(3 * x, ys.shape), rtol=1e-6)

    assert lora.merge(model) == 1 and model.layers.proj.lora_dropout is None
    assert not jax.tree.leaves(nnx.state(model, nnx.RngState))
