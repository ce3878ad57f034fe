"""Building blocks shared by InternViT and Qwen2.

Shape legend: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query heads per kv
head, H head dim, D model width, F MLP width.

Every parameter carries logical axis names (`out_sharding` metadata via `nnx.with_partitioning`); stacked layers
get a leading 'layers' axis from the `nnx.vmap` that builds them. Parameters are stored in `param_dtype` and
cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Names = Sequence[str | None]

# Large negative instead of -inf: a fully padded query row then gives a uniform (finite) softmax, not NaN.
_MASK_VALUE = -1e30


def param(rngs: nnx.Rngs, init, shape, dtype, names: Names) -> nnx.Param:
    """A parameter with logical axis names; no eager sharding (sharding is applied by the trainer)."""
    init = nnx.with_partitioning(init, tuple(names), eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, dtype))


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel float[in, out] (torch Linear weight transposed)."""

    def __init__(self, in_features: int, out_features: int, names: Names, *, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = param(rngs, nnx.initializers.lecun_normal(), (in_features, out_features), param_dtype, names)
        self.bias = (param(rngs, nnx.initializers.zeros_init(), (out_features,), param_dtype, names[-1:])
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """torch nn.LayerNorm: statistics in float32, then scale and bias."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 names: Names = ("embed",)):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), param_dtype, names)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), param_dtype, names)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """Qwen2 / InternRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back, THEN times the weight."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 names: Names = ("embed",)):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), param_dtype, names)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch nn.GELU() / ACT2FN['gelu']."""
    return jax.nn.gelu(x, approximate=False)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
              implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped kv heads; softmax in float32.

    q float[B, T, N, H], k/v float[B, S, K, H], mask bool[B, T, S] (True = attend) or None -> float[B, T, N, H].
    implementation: 'map' (2-D GEMMs mapped over (batch, kv head) with lax.map; fastest on CPU), 'einsum'
    (batched einsum), 'xla'/'cudnn' (jax.nn.dot_product_attention). None picks 'map' on CPU, 'xla' elsewhere.
    """
    if implementation is None:
        implementation = "map" if jax.default_backend() == "cpu" else "xla"
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = h ** -0.5
    if implementation in ("xla", "cudnn"):
        bias_mask = None if mask is None else mask[:, None, :, :]
        return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, scale=scale, implementation=implementation)

    # Queries of one kv group stacked into one matrix: [B, K, G*T, H] against [B, K, S, H].
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    kt = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    vt = v.transpose(0, 2, 1, 3)

    def one(qi, ki, vi, mi):
        # qi [G*T, H], ki/vi [S, H], mi [T, S] or None
        sc = jnp.dot(qi, ki.T, preferred_element_type=jnp.float32) * scale  # [G*T, S]
        if mi is not None:
            sc = jnp.where(jnp.tile(mi, (g, 1)), sc, _MASK_VALUE)
        p = jax.nn.softmax(sc, axis=-1).astype(vi.dtype)
        return jnp.dot(p, vi)  # [G*T, H]

    if implementation == "map":
        qf = qg.reshape(b * kh, g * t, h)
        kf = kt.reshape(b * kh, s, h)
        vf = vt.reshape(b * kh, s, h)
        if mask is None:
            out = jax.lax.map(lambda a: one(*a, None), (qf, kf, vf))
        else:
            mf = jnp.broadcast_to(mask[:, None], (b, kh, t, s)).reshape(b * kh, t, s)
            out = jax.lax.map(lambda a: one(*a), (qf, kf, vf, mf))
    elif implementation == "einsum":
        sc = jnp.einsum("bkqh,bksh->bkqs", qg, kt, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            sc = jnp.where(jnp.tile(mask[:, None], (1, 1, g, 1)), sc, _MASK_VALUE)
        p = jax.nn.softmax(sc, axis=-1).astype(vt.dtype)
        out = jnp.einsum("bkqs,bksh->bkqh", p, vt)
    else:
        raise ValueError(f"attention implementation must be map|einsum|xla|cudnn, got {implementation!r}")
    out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)


# ---- bicubic resize matching torch F.interpolate(mode="bicubic", align_corners=False) -------------------------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(src); t float[n] in [0, 1)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float64[out, in] with resize(x) = M @ x along one axis, as torch bicubic (A=-0.75, no antialias).

    torch: src = (dst + 0.5) * in/out - 0.5 (not clamped for cubic), taps floor(src)-1 .. floor(src)+2 clamped
    to the border.
    """
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size))
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, tap])
    return m


def resize_bicubic_2d(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """x float[h, w, C] -> float[out_h, out_w, C], computed in float32."""
    mh = jnp.asarray(bicubic_matrix(x.shape[0], out_h), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(x.shape[1], out_w), jnp.float32)
    y = jnp.einsum("oh,hwc->owc", mh, x.astype(jnp.float32), precision="highest")
    return jnp.einsum("pw,owc->opc", mw, y, precision="highest").astype(x.dtype)
