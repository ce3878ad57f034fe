"""Qwen2 decoder (the LM of InternVL3) with a KV cache for decoding.

Legend: B batch, T new tokens, S cache slots, L layers, N query heads, K kv heads, H head dim, D width, V vocab.

Cache: a dict of arrays (a pytree, so it can cross `jax.jit`):
  k, v   float[L, B, S, K, H]   keys / values per slot (RoPE already applied to k)
  mask   bool[B, S]             slot holds a real (non-padding) token
  index  int32[]                next slot to write (the same for every row)
A call with `cache` writes its T tokens at slots index .. index+T-1 and attends causally over all filled slots.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.models.config import TextConfig


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions int[B, T] -> cos, sin float32[B, T, H]; angle table concat(freqs, freqs) (rotate_half form)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x float[B, T, heads, H]; x*cos + rotate_half(x)*sin with cos/sin cast to x's dtype first (as transformers)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rot * sin


class Qwen2Attention(nnx.Module):
    """GQA attention; biases on q/k/v only."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = layers.Linear(d, n * h, ("embed", "heads"), **kw)
        self.k_proj = layers.Linear(d, k * h, ("embed", "kv"), **kw)
        self.v_proj = layers.Linear(d, k * h, ("embed", "kv"), **kw)
        self.o_proj = layers.Linear(n * h, d, ("heads", "embed"), use_bias=False, **kw)

    def __call__(self, x, cos, sin, mask, cache_kv=None, index=None, implementation=None):
        """x float[B, T, D]; mask bool[B, T, S]; cache_kv (k, v) float[B, S, K, H] or None.

        Returns (float[B, T, D], updated (k, v) or None).
        """
        heads = lambda y: einops.rearrange(y, "B T (heads H) -> B T heads H", H=self.cfg.head_dim)  # noqa: E731
        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            new_kv = (ck, cv)
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        o = layers.attention(q, k, v, mask, implementation=implementation)
        return self.o_proj(einops.rearrange(o, "B T N H -> B T (N H)")), new_kv


class Qwen2MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = layers.Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = layers.Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = layers.Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Layer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Qwen2Attention(cfg, **kw)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = Qwen2MLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask, cache_kv=None, index=None, implementation=None):
        a, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, index, implementation)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv


class Qwen2(nnx.Module):
    """Token embedding + scanned decoder layers + final RMSNorm (the lm_head lives in InternVL)."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        self.attention_impl = "auto"  # see layers.attention / InternVL.set_attention_implementation
        self.remat = "none"  # layers.REMAT_POLICIES; see InternVL.set_remat
        self.embed_tokens = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                                         param_dtype, ("vocab", "embed"))
        self.layers = layers.stacked(lambda r: Qwen2Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                                     cfg.num_layers, rngs)
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, T] -> float[B, T, D]."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """An empty cache with `max_len` slots (all masked, index 0)."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or self.dtype
        return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None, cache=None):
        """Run the decoder.

        input_ids int[B, T] or inputs_embeds float[B, T, D]; attention_mask int[B, T] (1 real, 0 padding;
        None = all real); positions int[B, T] (default: slot index, i.e. 0..T-1 without a cache, like
        transformers' forward, also with left padding).
        Returns (hidden float[B, T, D] after the final norm, updated cache or None).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t, _ = x.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        slots = start + jnp.arange(t, dtype=jnp.int32)  # [T]
        if positions is None:
            positions = jnp.broadcast_to(slots, (b, t))
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)

        if cache is None:
            key_valid = valid
            key_slots = slots
        else:
            key_valid = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, start))
            key_slots = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
        # Causal over slots + key padding.
        mask = (key_slots[None, None, :] <= slots[None, :, None]) & key_valid[:, None, :]  # [B, T, S]

        impl = self.attention_impl
        if cache is None:
            def body(h, layer: Qwen2Layer):
                h, _ = layer(h, cos, sin, mask, implementation=impl)
                return h, None

            x, _ = layers.scan_layers(body, x, self.layers, remat=self.remat)
            new_cache = None
        else:
            def body(h, layer: Qwen2Layer, ck, cv):
                return layer(h, cos, sin, mask, (ck, cv), start, impl)

            x, (nk, nv) = layers.scan_layers(body, x, self.layers, cache["k"], cache["v"])
            new_cache = dict(k=nk, v=nv, mask=key_valid, index=start + t)
        return self.norm(x), new_cache
