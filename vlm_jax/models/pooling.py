"""Pooling of backbone hidden states into one vector per sample.

Legend: B batch, T tokens, D width, N attention heads.

Vision (`pool_vision`, over the ViT output float[B, 1 + P, Dv] with CLS at index 0):
  cls   the CLS token (seed recipe);
  mean  the mean of the patch tokens (CLS excluded);
  map   multi-head attention pooling with a learned query over the patch tokens (`MAPHead`).
Tiles (`pool_tiles`, over each row's tiles float[B, T, 1 + P, Dv] with a presence mask): 'all' pools every tile
  (cls: the mean of their CLS tokens; mean: the mean of all their patches; map: attention over all their patches),
  'thumbnail' pools the row's last tile (InternVL's thumbnail of the whole image when there are several tiles).
  With one tile per row both equal `pool_vision`.
Text (`pool_text`, over LM hidden states float[B, T, D] with a 0/1 mask, right or left padding):
  last  the last valid token (the data pipeline appends EOS, so it has seen the whole caption; default);
  mean  the mean over valid tokens;
  first the first valid token. In a causal LM it has seen only itself, so it carries no caption meaning; kept to
        reproduce the seed recipe, and a warning is logged when chosen.
`l2_normalize` puts pooled vectors on the unit sphere.
"""

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers

VISION_POOLING = ("cls", "mean", "map")
TEXT_POOLING = ("last", "mean", "first")


def check_pooling(vision: str, text: str) -> None:
    """ValueError for unknown names; a warning for text 'first'."""
    if vision not in VISION_POOLING:
        raise ValueError(f"vision_pool must be one of {VISION_POOLING}, got {vision!r}")
    if text not in TEXT_POOLING:
        raise ValueError(f"text_pool must be one of {TEXT_POOLING}, got {text!r}")
    if text == "first":
        logging.warning("text_pool='first': in a causal LM the first token sees only itself, so the text embedding "
                        "does not depend on the caption. Use 'last' or 'mean' unless reproducing the seed recipe.")


def l2_normalize(x, axis=-1, eps=1e-6):
    """x / max(||x||, eps) along `axis`, in float32; a zero vector stays zero with a finite gradient."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def last_valid_index(mask):
    """int[B, T] 0/1 mask -> int32[B] index of the last 1 (works for left and right padding; 0 for empty rows)."""
    mask = mask.astype(bool)
    t = mask.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.where(jnp.any(mask, axis=1), last, 0).astype(jnp.int32)


def first_valid_index(mask):
    """int[B, T] 0/1 mask -> int32[B] index of the first 1 (0 for empty rows)."""
    return jnp.argmax(mask.astype(bool), axis=1).astype(jnp.int32)


def gather_positions(hidden, index):
    """float[B, T, D], int[B] -> float[B, D]: hidden[b, index[b]]."""
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def masked_mean(hidden, mask):
    """float[B, T, D], int[B, T] -> float32[B, D] mean over valid tokens (0 for rows with none)."""
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def pool_text(hidden, mask, method: str):
    """float[B, T, D] LM hidden states, int[B, T] mask -> float32[B, D]."""
    if method == "last":
        return gather_positions(hidden, last_valid_index(mask)).astype(jnp.float32)
    if method == "mean":
        return masked_mean(hidden, mask)
    if method == "first":
        return gather_positions(hidden, first_valid_index(mask)).astype(jnp.float32)
    raise ValueError(f"text_pool must be one of {TEXT_POOLING}, got {method!r}")


class MAPHead(nnx.Module):
    """Multi-head attention pooling: a learned query attends over the tokens, then a residual MLP.

    float[B, T, D] -> float32[B, D]. Parameters: probe [1, 1, D], attention (q, k, v, out: 4 D^2 + 4 D),
    LayerNorm (2 D), MLP D -> mlp_ratio D -> D.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4, *, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"map pooling: vision width {width} is not divisible by map_num_heads {num_heads}")
        self.probe = layers.param(rngs, nnx.initializers.xavier_uniform(), (1, 1, width), jnp.float32,
                                  (None, None, "embed"))
        # q/k/v kernels float[D, N, D/N], output kernel float[N, D/N, D].
        self.attention = nnx.MultiHeadAttention(
            num_heads, width, decode=False, rngs=rngs,
            kernel_metadata=layers.axes(("embed", "heads", None)), bias_metadata=layers.axes(("heads", None)),
            out_kernel_metadata=layers.axes(("heads", None, "embed")), out_bias_metadata=layers.axes(("embed",)))
        self.norm = nnx.LayerNorm(width, rngs=rngs, scale_metadata=layers.axes(("embed",)),
                                  bias_metadata=layers.axes(("embed",)))
        self.mlp_in = layers.Linear(width, mlp_ratio * width, ("embed", "mlp"), rngs=rngs)
        self.mlp_out = layers.Linear(mlp_ratio * width, width, ("mlp", "embed"), rngs=rngs)

    def __call__(self, tokens, mask=None):
        """float[B, T, D] tokens [, bool[B, T]: False = not attended] -> float32[B, D]."""
        tokens = tokens.astype(jnp.float32)
        probe = jnp.broadcast_to(self.probe[...], (tokens.shape[0], 1, tokens.shape[-1]))
        mask = None if mask is None else mask[:, None, None, :]  # [B, heads, 1, T]
        x = self.attention(probe, tokens, tokens, mask=mask, deterministic=True)  # [B, 1, D]
        x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm(x))))
        return x[:, 0]


def pool_vision(hidden, method: str, map_head: MAPHead | None = None):
    """float[B, 1 + P, Dv] ViT output (CLS first) -> float32[B, Dv]."""
    if method == "cls":
        return hidden[:, 0].astype(jnp.float32)
    if method == "mean":
        return jnp.mean(hidden[:, 1:].astype(jnp.float32), axis=1)
    if method == "map":
        if map_head is None:
            raise ValueError("vision_pool='map' needs a MAPHead")
        return map_head(hidden[:, 1:])
    raise ValueError(f"vision_pool must be one of {VISION_POOLING}, got {method!r}")


def pool_tiles(row_hidden, present, method: str, tile_pool: str, map_head: MAPHead | None = None):
    """float[B, T, 1 + P, Dv] each row's tiles (CLS first), bool[B, T] present -> float32[B, Dv]."""
    if tile_pool == "thumbnail":
        last = jnp.maximum(jnp.sum(present, axis=1) - 1, 0)  # [B]
        return pool_vision(jnp.take_along_axis(row_hidden, last[:, None, None, None], axis=1)[:, 0], method, map_head)
    if tile_pool != "all":
        raise ValueError(f"tile_pool must be 'all' or 'thumbnail', got {tile_pool!r}")
    b, t, tokens, width = row_hidden.shape
    if method == "cls":
        return masked_mean(row_hidden[:, :, 0], present)
    patches = row_hidden[:, :, 1:].reshape(b, t * (tokens - 1), width)
    patch_mask = jnp.repeat(present, tokens - 1, axis=1)
    if method == "mean":
        return masked_mean(patches, patch_mask)
    if method == "map":
        if map_head is None:
            raise ValueError("vision_pool='map' needs a MAPHead")
        return map_head(patches, patch_mask)
    raise ValueError(f"vision_pool must be one of {VISION_POOLING}, got {method!r}")
