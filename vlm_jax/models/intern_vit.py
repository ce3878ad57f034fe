"""InternViT encoder (InternViT-300M / 6B variants), NHWC input.

Legend: N images, T = 1 + P tokens, P patches (grid h*w), D width, F MLP width, C channels, A heads, H head dim.
The encoder layers are stacked (leading 'layers' axis) and applied with `nnx.scan`: compile time does not grow
with depth.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.models.config import VisionConfig


def patchify(pixel_values: jax.Array, patch: int) -> jax.Array:
    """float[N, H, W, C] -> float[N, P, patch*patch*C]: non-overlapping patches in row-major grid order, each
    flattened as (row in patch, column in patch, channel)."""
    return einops.rearrange(pixel_values, "N (h ph) (w pw) C -> N (h w) (ph pw C)", ph=patch, pw=patch)


class VisionEmbeddings(nnx.Module):
    """Patchify + Linear (== Conv2d with stride = kernel), CLS token, absolute position embeddings."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
        # Kernel rows ordered (kh, kw, c): torch OIHW weight -> transpose(2, 3, 1, 0).reshape(patch_dim, D).
        self.patch_embedding = layers.Linear(patch_dim, cfg.hidden_size, (None, "embed"), dtype=dtype,
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
        grid = layers.resize_bicubic_2d(einops.rearrange(pos[1:], "(h w) D -> h w D", h=g), grid_h, grid_w)
        return jnp.concatenate([pos[:1], einops.rearrange(grid, "h w D -> (h w) D")], axis=0)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values float[N, H, W, C] -> float[N, 1 + P, D] (row-major patch order, CLS first)."""
        p = self.cfg.patch_size
        gh, gw = pixel_values.shape[1] // p, pixel_values.shape[2] // p
        x = self.patch_embedding(patchify(pixel_values, p))  # [N, P, D]
        cls = einops.repeat(self.class_embedding[...].astype(self.dtype), "D -> N 1 D", N=x.shape[0])
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.positions(gh, gw).astype(self.dtype)[None]


def _norm(cfg: VisionConfig, dim: int, *, dtype, param_dtype, rngs, names=("embed",)):
    cls = layers.LayerNorm if cfg.norm_type == "layer_norm" else layers.RMSNorm
    return cls(dim, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs, names=names)


class VisionAttention(nnx.Module):
    """Bidirectional MHA with one fused qkv Linear (columns q | k | v, head-major inside each)."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.qkv = layers.Linear(d, 3 * d, ("embed", "heads"), use_bias=cfg.qkv_bias, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        if cfg.qk_norm:
            # InternViT-6B: RMSNorm over the full width (all heads together), not per head.
            self.q_norm = layers.RMSNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs, names=("heads",))
            self.k_norm = layers.RMSNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs, names=("heads",))
        else:
            self.q_norm = self.k_norm = None
        self.proj = layers.Linear(d, d, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, implementation: str | None = None) -> jax.Array:
        """x float[N, T, D] -> float[N, T, D]."""
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (einops.rearrange(y, "N T (A H) -> N T A H", A=self.cfg.num_heads) for y in (q, k, v))
        o = layers.attention(q, k, v, None, implementation=implementation)
        return self.proj(einops.rearrange(o, "N T A H -> N T (A H)"))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = layers.Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        self.fc2 = layers.Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), dtype=dtype,
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


class InternViT(nnx.Module):
    """Embeddings + scanned encoder layers; no final norm (InternVL uses the raw last layer)."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_impl = "auto"  # see layers.attention / InternVL.set_attention_implementation
        self.remat = "none"  # layers.REMAT_POLICIES; see InternVL.set_remat
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = layers.stacked(lambda r: VisionLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                                     cfg.num_layers, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values float[N, H, W, C] (NHWC, normalised) -> last hidden state float[N, 1 + P, D]."""
        impl = self.attention_impl

        def body(x, layer: VisionLayer):
            return layer(x, impl), None

        x, _ = layers.scan_layers(body, self.embeddings(pixel_values), self.layers, remat=self.remat)
        return x
