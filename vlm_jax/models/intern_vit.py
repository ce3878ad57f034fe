"""InternViT encoder (InternViT-300M / 6B variants), NHWC input.

Legend: N images, P patches (grid h*w), D width, F MLP width, C channels.
The encoder layers are stacked (leading 'layers' axis) and applied with `lax.scan`: compile time does not grow
with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.models.config import VisionConfig


class VisionEmbeddings(nnx.Module):
    """Patchify + Dense (== Conv2d with stride = kernel), CLS token, absolute position embeddings."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
        # Kernel rows ordered (kh, kw, c): torch OIHW weight -> transpose(2, 3, 1, 0).reshape(patch_dim, D).
        self.patch_embedding = layers.Dense(patch_dim, cfg.hidden_size, (None, "embed"), dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.class_embedding = layers.param(rngs, init, (cfg.hidden_size,), param_dtype, ("embed",))
        self.position_embedding = layers.param(rngs, init, (cfg.grid_size ** 2 + 1, cfg.hidden_size), param_dtype,
                                               (None, "embed"))

    def positions(self, grid_h: int, grid_w: int) -> jax.Array:
        """float[1 + grid_h*grid_w, D]; bicubic-resized (as torch) when the grid differs from the checkpoint's."""
        pos = self.position_embedding[...]
        g = self.cfg.grid_size
        if (grid_h, grid_w) == (g, g):
            return pos
        grid = layers.resize_bicubic_2d(pos[1:].reshape(g, g, -1), grid_h, grid_w)
        return jnp.concatenate([pos[:1], grid.reshape(grid_h * grid_w, -1)], axis=0)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values float[N, H, W, C] -> float[N, 1 + P, D] (row-major patch order, CLS first)."""
        n, h, w, c = pixel_values.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        x = pixel_values.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, p * p * c)
        x = self.patch_embedding(x)  # [N, P, D]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.positions(gh, gw).astype(self.dtype)[None]


def _norm(cfg: VisionConfig, dim: int, *, dtype, param_dtype, rngs, names=("embed",)):
    cls = layers.LayerNorm if cfg.norm_type == "layer_norm" else layers.RMSNorm
    return cls(dim, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs, names=names)


class VisionAttention(nnx.Module):
    """Bidirectional MHA with one fused qkv Dense (columns q | k | v, head-major inside each)."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.qkv = layers.Dense(d, 3 * d, ("embed", "heads"), use_bias=cfg.qkv_bias, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        if cfg.qk_norm:
            # InternViT-6B: RMSNorm over the full width (all heads together), not per head.
            self.q_norm = layers.RMSNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs, names=("heads",))
            self.k_norm = layers.RMSNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs, names=("heads",))
        else:
            self.q_norm = self.k_norm = None
        self.proj = layers.Dense(d, d, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, implementation: str | None = None) -> jax.Array:
        """x float[N, T, D] -> float[N, T, D]."""
        n, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (n, t, self.cfg.num_heads, self.cfg.head_dim)
        o = layers.attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), None,
                             implementation=implementation)
        return self.proj(o.reshape(n, t, d))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = layers.Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.fc2 = layers.Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(layers.gelu(self.fc1(x)))


class VisionLayer(nnx.Module):
    """Pre-norm block with layer scale: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _norm(cfg, cfg.hidden_size, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.norm2 = _norm(cfg, cfg.hidden_size, **kw)
        self.mlp = VisionMLP(cfg, **kw)
        ls_init = nnx.initializers.constant(0.1)
        self.ls1 = layers.param(rngs, ls_init, (cfg.hidden_size,), param_dtype, ("embed",))
        self.ls2 = layers.param(rngs, ls_init, (cfg.hidden_size,), param_dtype, ("embed",))

    def __call__(self, x: jax.Array, implementation: str | None = None) -> jax.Array:
        x = x + self.ls1[...].astype(self.dtype) * self.attn(self.norm1(x), implementation)
        return x + self.ls2[...].astype(self.dtype) * self.mlp(self.norm2(x))


def stacked(make, num_layers: int, rngs: nnx.Rngs):
    """Build `num_layers` copies of a module with parameters stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


class InternViT(nnx.Module):
    """Embeddings + scanned encoder layers; no final norm (InternVL uses the raw last layer)."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_impl: str | None = None  # None: chosen by backend (see layers.attention).
        self.remat = False  # True: recompute each layer's activations in the backward pass (saves memory).
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = stacked(lambda r: VisionLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                              cfg.num_layers, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values float[N, H, W, C] (NHWC, normalised) -> last hidden state float[N, 1 + P, D]."""
        x = self.embeddings(pixel_values)
        graphdef, state = nnx.split(self.layers)
        impl = self.attention_impl

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, impl), None

        x, _ = jax.lax.scan(jax.checkpoint(body) if self.remat else body, x, state)
        return x
