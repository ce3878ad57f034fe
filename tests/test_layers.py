"""Building blocks against formulas written out in numpy and against PyTorch / transformers."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx
from transformers.models.internvl.modeling_internvl import InternVLModel

from vlm_jax.models import InternVLConfig, layers, pooling
from vlm_jax.models.intern_vit import patchify
from vlm_jax.models.internvl import InternVL, pixel_shuffle


def _names(variable: nnx.Variable):
    return variable.get_metadata().get("out_sharding")


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_is_x_times_kernel_plus_bias(use_bias):
    layer = layers.Linear(5, 3, ("embed", "mlp"), use_bias=use_bias, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32)
    kernel = np.asarray(layer.kernel[...])
    want = x @ kernel + (np.asarray(layer.bias[...]) if use_bias else 0)
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-6, atol=1e-6)
    assert kernel.shape == (5, 3) and layer(jnp.asarray(x)).dtype == jnp.float32
    assert _names(layer.kernel) == ("embed", "mlp")
    if use_bias:
        assert layer.bias[...].shape == (3,) and _names(layer.bias) == ("mlp",)
    else:
        assert layer.bias is None


def test_linear_computes_in_dtype_with_params_cast():
    layer = layers.Linear(4, 2, (None, None), dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    assert layer.kernel[...].dtype == jnp.float32 and _names(layer.kernel) == (None, None)
    y = layer(jnp.asarray(x))
    assert y.dtype == jnp.bfloat16
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    want = bf16(x) @ bf16(layer.kernel[...]) + bf16(layer.bias[...])
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)


def test_every_parameter_has_logical_names():
    model = nnx.eval_shape(lambda: InternVL(InternVLConfig.tiny(image_token_id=127), rngs=nnx.Rngs(0)))
    head = nnx.eval_shape(lambda: pooling.MAPHead(32, 4, rngs=nnx.Rngs(0)))
    count = 0
    for root, module in (("", model), ("map_head/", head)):
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            name = root + "/".join(map(str, path))
            names = _names(var)
            assert names is not None and len(names) == len(var.get_value().shape), (name, names)
            assert (names[0] == "layers") == ("/layers/" in f"/{name}/"), (name, names)
            count += 1
    assert count > 30


def test_patchify_linear_equals_torch_conv2d_patch_embedding():
    n, c, p, d, gh, gw = 2, 3, 4, 5, 3, 2
    rng = np.random.default_rng(2)
    pixels = rng.standard_normal((n, gh * p, gw * p, c)).astype(np.float32)
    conv = torch.nn.Conv2d(c, d, kernel_size=p, stride=p)
    with torch.no_grad():
        want = conv(torch.from_numpy(pixels).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2).numpy()  # [N, P, D]
    # Kernel rows in (row in patch, column in patch, channel) order: the OIHW weight as [kh, kw, C, D].
    kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0).reshape(p * p * c, d)
    got = np.asarray(patchify(jnp.asarray(pixels), p)) @ kernel + conv.bias.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_equals_transformers():
    n, grid, c = 2, 4, 3
    tokens = np.random.default_rng(3).standard_normal((n, grid * grid, c)).astype(np.float32)
    want = InternVLModel.pixel_shuffle(None, torch.from_numpy(tokens).reshape(n, grid, grid, c), scale_factor=0.5)
    want = want.reshape(n, -1, want.shape[-1]).numpy()
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(tokens), grid, 2)), want)


def _numpy_attention(q, k, v, mask):
    """Grouped-query attention written out per head: query head i reads kv head i // (N // K)."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros_like(q)
    for i in range(n):
        s = np.einsum("bth,bsh->bts", q[:, :, i], k[:, :, i // g]) / np.sqrt(h)
        if mask is not None:
            s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, i] = np.einsum("bts,bsh->bth", p / p.sum(-1, keepdims=True), v[:, :, i // g])
    return out


@pytest.mark.parametrize("implementation", ["map", "einsum", "xla"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_numpy(implementation, masked):
    rng = np.random.default_rng(4)
    b, t, s, n, kh, h = 2, 3, 5, 6, 2, 4
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, kh, h)).astype(np.float32) for _ in range(2))
    mask = rng.random((b, t, s)) < 0.7 if masked else None
    if masked:
        mask[:, :, 0] = True  # every query row attends somewhere
    got = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None if mask is None else jnp.asarray(mask),
                           implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_auto_attention_picks_map_on_cpu_and_unknown_names_are_refused():
    q = jnp.zeros((1, 4, 4, 8), jnp.bfloat16)
    k = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    assert layers.choose_attention("auto", q, k, masked=True) == "map"
    assert layers.choose_attention(None, q, k, masked=False) == "map"
    assert layers.choose_attention("einsum", q, k, masked=False) == "einsum"
    with pytest.raises(ValueError, match=r"attention implementation 'flash': expected one of \('auto'"):
        layers.attention(q, k, k, None, implementation="flash")
    with pytest.raises(ValueError, match=r"remat policy 'dots': expected one of"):
        layers.check_remat("dots")


def test_l2_normalize_unit_norm_and_zero_stays_zero():
    x = np.asarray([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(np.asarray(pooling.l2_normalize(jnp.asarray(x, jnp.bfloat16))),
                               [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)
    grad = jax.grad(lambda a: pooling.l2_normalize(a).sum())(jnp.asarray(x))
    assert np.isfinite(np.asarray(grad)).all()
    assert pooling.l2_normalize(jnp.asarray(x)).dtype == jnp.float32
