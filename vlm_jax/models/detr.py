"""A DETR-style decoder: learned object queries attending over a memory of image (and text) tokens.

Legend: B batch, Q object queries, M memory tokens, W decoder width, P patches, L text tokens, Dv / D the vision /
language widths.

Each layer is pre-norm: self-attention among the queries (so they spread over different objects), cross-attention
from the queries to the memory, an MLP. The memory is built by `DetectionMemory`: the ViT patch tokens projected to W
plus a Fourier embedding of each patch's centre (attention then knows where a token is), optionally followed by the
caption's tokens projected to W plus a learned "text" embedding. Every parameter carries logical axis names, so the
decoder shards with the same rules as the rest of the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.models import layers

NUM_FREQUENCIES = 8  # Fourier features per coordinate: sin and cos of 2^k pi x, k < 8 (finest: 1/256 of the image)


def fourier_positions(grid: jax.Array) -> jax.Array:
    """float32[..., 2] (x, y) in [0, 1] -> float32[..., 4 NUM_FREQUENCIES]: sin, cos of 2^k pi x and of 2^k pi y."""
    freqs = jnp.asarray(2.0 ** np.arange(NUM_FREQUENCIES) * np.pi, jnp.float32)
    angles = grid[..., None] * freqs  # [..., 2, K]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*grid.shape[:-1], -1)


def _norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, rngs=rngs, scale_metadata=layers.axes(("embed",)),
                         bias_metadata=layers.axes(("embed",)))


def _attention(width: int, num_heads: int, rngs: nnx.Rngs) -> nnx.MultiHeadAttention:
    if width % num_heads:
        raise ValueError(f"detection decoder: width {width} is not divisible by num_heads {num_heads}")
    return nnx.MultiHeadAttention(
        num_heads, width, decode=False, rngs=rngs,
        kernel_metadata=layers.axes(("embed", "heads", None)), bias_metadata=layers.axes(("heads", None)),
        out_kernel_metadata=layers.axes(("heads", None, "embed")), out_bias_metadata=layers.axes(("embed",)))


class DetectionMemory(nnx.Module):
    """float[B, P, Dv] patch tokens, float32[B, P, 2] (or [P, 2]) centres, bool[B, P] present patches
    [, float[B, L, D] text tokens, int[B, L] mask] -> (float32[B, M, W] memory, bool[B, M] mask), M = P (+ L)."""

    def __init__(self, vision_width: int, text_width: int | None, width: int, *, rngs: nnx.Rngs):
        self.vision_norm = _norm(vision_width, rngs)
        self.vision = layers.Linear(vision_width, width, ("embed", "mlp"), rngs=rngs)
        self.position = layers.Linear(4 * NUM_FREQUENCIES, width, (None, "mlp"), rngs=rngs)
        self.text_norm = _norm(text_width, rngs) if text_width else None
        self.text = layers.Linear(text_width, width, ("embed", "mlp"), rngs=rngs) if text_width else None
        self.text_type = (layers.param(rngs, nnx.initializers.normal(0.02), (width,), jnp.float32, ("mlp",))
                          if text_width else None)

    def __call__(self, patches, grid, patch_mask, text=None, text_mask=None):
        vision = self.vision(self.vision_norm(patches.astype(jnp.float32))) + self.position(fourier_positions(grid))
        mask = jnp.broadcast_to(patch_mask, vision.shape[:2])
        if self.text is None:
            return vision, mask
        words = self.text(self.text_norm(text.astype(jnp.float32))) + self.text_type[...]
        return jnp.concatenate([vision, words], axis=1), jnp.concatenate([mask, text_mask.astype(bool)], axis=1)


class DecoderLayer(nnx.Module):
    """Pre-norm self-attention, cross-attention to the memory, MLP: float32[B, Q, W] -> float32[B, Q, W]."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.self_norm, self.cross_norm, self.mlp_norm = (_norm(width, rngs) for _ in range(3))
        self.self_attention = _attention(width, num_heads, rngs)
        self.cross_attention = _attention(width, num_heads, rngs)
        self.mlp_in = layers.Linear(width, mlp_dim, ("embed", "mlp"), rngs=rngs)
        self.mlp_out = layers.Linear(mlp_dim, width, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x, query_pos, memory, memory_mask):
        normed = self.self_norm(x)
        h = normed + query_pos  # the positions tell identical queries apart
        x = x + self.self_attention(h, h, normed, deterministic=True)
        cross_mask = memory_mask[:, None, None, :]  # [B, heads, Q, M]
        x = x + self.cross_attention(self.cross_norm(x) + query_pos, memory, memory, mask=cross_mask,
                                     deterministic=True)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class DetrDecoder(nnx.Module):
    """Q learned queries through `num_layers` `DecoderLayer`s: memory float32[B, M, W], bool[B, M] ->
    float32[num_layers, B, Q, W], every layer's normalised output (the last one is the prediction; the others feed
    the auxiliary losses)."""

    def __init__(self, num_queries: int, width: int, num_layers: int, num_heads: int, mlp_dim: int, *,
                 rngs: nnx.Rngs):
        if num_layers < 1 or num_queries < 1:
            raise ValueError(f"detection decoder: need num_layers >= 1 and num_queries >= 1, got {num_layers}, "
                             f"{num_queries}")
        init = nnx.initializers.normal(1.0)
        self.query_content = layers.param(rngs, init, (num_queries, width), jnp.float32, (None, "embed"))
        self.query_pos = layers.param(rngs, init, (num_queries, width), jnp.float32, (None, "embed"))
        self.layers = nnx.List([DecoderLayer(width, num_heads, mlp_dim, rngs=rngs) for _ in range(num_layers)])
        self.out_norm = _norm(width, rngs)

    def __call__(self, memory, memory_mask):
        b = memory.shape[0]
        x = jnp.broadcast_to(self.query_content[...], (b, *self.query_content.shape))
        outputs = []
        for layer in self.layers:
            x = layer(x, self.query_pos[...], memory, memory_mask)
            outputs.append(self.out_norm(x))
        return jnp.stack(outputs)
