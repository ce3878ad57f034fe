"""Building blocks shared by InternViT, Qwen2 and the task heads.

Shape legend: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query heads per kv
head, H head dim, D model width, F MLP width.

Every parameter carries logical axis names (`out_sharding` metadata, see `axes`); stacked layers get a leading
'layers' axis from the `nnx.vmap` that builds them (`stacked`) and run under `nnx.scan` (`scan_layers`).
Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

import functools
from typing import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Names = Sequence[str | None]

# Large negative instead of -inf: a fully padded query row then gives a uniform (finite) softmax, not NaN.
_MASK_VALUE = -1e30


def axes(names: Names) -> dict:
    """Variable metadata naming a parameter's logical axes; no eager sharding (the trainer shards)."""
    return dict(out_sharding=tuple(names), eager_sharding=False)


def param(rngs: nnx.Rngs, init, shape, dtype, names: Names) -> nnx.Param:
    """A parameter `init(key, shape, dtype)` with logical axis names."""
    return nnx.Param(init(rngs.params(), shape, dtype), **axes(names))


class Linear(nnx.Linear):
    """`nnx.Linear` with logical axis names: y = x @ kernel + bias, computed in `dtype`.

    kernel float[in, out] (the torch Linear weight transposed) named `names`, bias float[out] named `names[-1]`.
    preferred_element_type: the product's output dtype (float32 for logits computed from bf16 inputs).
    """

    def __init__(self, in_features: int, out_features: int, names: Names, *, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, preferred_element_type=None, rngs: nnx.Rngs):
        names = tuple(names)
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                         preferred_element_type=preferred_element_type, rngs=rngs, kernel_metadata=axes(names),
                         bias_metadata=axes(names[-1:]))
        # LoRA factors, attached after construction by `vlm_jax.lora.attach` (None: a plain linear). nnx.data:
        # attributes that will hold Variables.
        self.lora_a: nnx.Param | None = nnx.data(None)  # float32[in, r]
        self.lora_b: nnx.Param | None = nnx.data(None)  # float32[r, out]
        self.lora_scale = 0.0  # alpha / r
        self.lora_dropout: nnx.Dropout | None = nnx.data(None)  # on x before A; inactive unless training

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.lora_a is None:
            return y
        # x A B in the compute dtype, added to x W + b: the base weights are never touched (merge folds it in).
        # Dropout acts on the update's input only (as PEFT's), so the base path stays the pretrained function.
        a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        update = (x.astype(self.dtype) @ a) @ b
        return y + (update * self.lora_scale).astype(y.dtype)


class LayerNorm(nnx.Module):
    """torch nn.LayerNorm: statistics in float32, then scale and bias.

    (Not `nnx.LayerNorm`: that one folds the scale into rsqrt(var + eps) before multiplying, a different rounding.)
    """

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
    """Qwen2 / InternRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back, THEN times the weight.

    (Not `nnx.RMSNorm`: that one multiplies by the weight before casting back.)
    """

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 names: Names = ("embed",)):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), param_dtype, names)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def stacked(make, num_layers: int, rngs: nnx.Rngs):
    """`num_layers` copies of the module `make(rngs)`, parameters stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


# config.model.remat: 'none', 'full' (keep nothing, recompute every layer) or a `jax.checkpoint_policies` policy
# that takes no arguments (what it names is kept, the rest recomputed).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                  "checkpoint_dots_with_no_batch_dims", "nothing_saveable", "everything_saveable")


def check_remat(remat: str) -> str:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r}: expected one of {REMAT_POLICIES}")
    return remat


def scan_layers(body, carry, stack: nnx.Module, *xs, remat: str = "none"):
    """Runs the layers of a `stacked` module in order with `nnx.scan`.

    body(carry, layer, *x) -> (carry, y), called with each layer and its slices of `xs` (leading axis L).
    Returns (final carry, the y's stacked on L). remat (`REMAT_POLICIES`): which of each layer's activations the
    backward pass recomputes instead of keeping ('none' keeps all; less memory for more compute otherwise). As
    every NNX transform, it needs the module's Variables from the current trace: inside a `jax.lax` loop or
    `jax.vmap`, merge the model in the body (`nnx.merge(..., copy=True)`), not outside it.
    """
    if check_remat(remat) != "none":
        policy = None if remat == "full" else getattr(jax.checkpoint_policies, remat)
        body = nnx.remat(body, policy=policy)
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0) + (0,) * len(xs), out_axes=(nnx.Carry, 0),
                    transform_metadata={nnx.PARTITION_NAME: "layers"})
    return scan(carry, stack, *xs)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch nn.GELU() / ACT2FN['gelu']."""
    return jax.nn.gelu(x, approximate=False)


# config.model.attention. 'auto' picks per call (`choose_attention`).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "map", "einsum")


def check_attention(implementation: str) -> str:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    return implementation


@functools.cache
def cudnn_attention_compiles(q_shape: tuple, kv_shape: tuple, dtype: str, masked: bool) -> bool:
    """Whether cuDNN flash attention compiles for these shapes, forward and backward (it supports a subset of
    head dims, dtypes and masked sequence lengths, and raises otherwise). Compiled once per shape, on the host."""
    q = jax.ShapeDtypeStruct(q_shape, dtype)
    kv = jax.ShapeDtypeStruct(kv_shape, dtype)
    mask = jax.ShapeDtypeStruct((q_shape[0], 1, q_shape[1], kv_shape[1]), bool) if masked else None

    def loss(q, k, v, m):
        out = jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")
        return jnp.sum(out.astype(jnp.float32))

    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask).compile()
    except Exception:  # noqa: BLE001 - NotImplementedError, ValueError, XlaRuntimeError: all mean "not here"
        return False
    return True


def choose_attention(implementation: str | None, q: jax.Array, k: jax.Array, masked: bool) -> str:
    """The implementation `attention` runs: `implementation` itself unless it is 'auto' (or None). 'auto' picks the
    fastest that applies: 'map' on CPU; on GPUs cuDNN flash attention for bf16/fp16 when it compiles for these
    shapes (`cudnn_attention_compiles`), else 'xla'; 'xla' elsewhere (TPU)."""
    implementation = check_attention(implementation or "auto")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "cpu":
        return "map"
    if backend in ("gpu", "cuda", "rocm") and q.dtype in (jnp.bfloat16, jnp.float16):
        if cudnn_attention_compiles(tuple(q.shape), tuple(k.shape), str(q.dtype), masked):
            return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
              implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped kv heads; softmax in float32.

    q float[B, T, N, H], k/v float[B, S, K, H], mask bool[B, T, S] (True = attend) or None -> float[B, T, N, H].
    Query head n uses kv head n // G (heads grouped as N = (K G)).
    implementation: 'map' (2-D GEMMs mapped over (batch, kv head) with lax.map; fastest on CPU), 'einsum'
    (batched einsum), 'xla' / 'cudnn' (jax.nn.dot_product_attention; cuDNN's flash attention needs an NVIDIA GPU
    and bf16/fp16), 'auto' or None: see `choose_attention`.
    """
    implementation = choose_attention(implementation, q, k, mask is not None)
    kh = k.shape[2]
    g = q.shape[2] // kh
    scale = q.shape[-1] ** -0.5
    if implementation in ("xla", "cudnn"):
        bias_mask = None if mask is None else mask[:, None, :, :]
        return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, scale=scale, implementation=implementation)

    # The G query heads of one kv head are stacked into one matrix of Q = G*T rows: one [Q, H] x [H, S] product
    # per (batch, kv head).
    qg = einops.rearrange(q, "B T (K G) H -> B K (G T) H", K=kh)
    kt = einops.rearrange(k, "B S K H -> B K S H")
    vt = einops.rearrange(v, "B S K H -> B K S H")

    def one(qi, ki, vi, mi):
        # qi [Q, H], ki/vi [S, H], mi bool[T, S] or None
        sc = jnp.einsum("QH,SH->QS", qi, ki, preferred_element_type=jnp.float32) * scale
        if mi is not None:
            sc = jnp.where(einops.repeat(mi, "T S -> (G T) S", G=g), sc, _MASK_VALUE)
        p = jax.nn.softmax(sc, axis=-1).astype(vi.dtype)
        return jnp.einsum("QS,SH->QH", p, vi)

    if implementation == "map":
        flat = lambda x: einops.rearrange(x, "B K R H -> (B K) R H")  # noqa: E731
        if mask is None:
            out = jax.lax.map(lambda a: one(*a, None), (flat(qg), flat(kt), flat(vt)))
        else:
            mf = einops.repeat(mask, "B T S -> (B K) T S", K=kh)
            out = jax.lax.map(lambda a: one(*a), (flat(qg), flat(kt), flat(vt), mf))
        out = einops.rearrange(out, "(B K) Q H -> B K Q H", K=kh)
    else:  # einsum (choose_attention has checked the name)
        sc = jnp.einsum("BKQH,BKSH->BKQS", qg, kt, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            sc = jnp.where(einops.repeat(mask, "B T S -> B () (G T) S", G=g), sc, _MASK_VALUE)
        p = jax.nn.softmax(sc, axis=-1).astype(vt.dtype)
        out = jnp.einsum("BKQS,BKSH->BKQH", p, vt)
    return einops.rearrange(out, "B K (G T) H -> B T (K G) H", G=g)


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
