"""Text generation with the KV cache: greedy or sampled (temperature, top-k, top-p), stopping at EOS.

Two jitted programs per model: `prefill` (images + prompt -> cache and the first token's logits) and `decode`
(the whole token loop as one `lax.while_loop`, so a generation costs two dispatches and one host sync however
many tokens it makes). Prompts are left-padded to a power-of-two bucket and the cache is sized to the bucket plus
`max_new_tokens`, so new prompt lengths inside a bucket reuse the compiled programs. Sampling settings are traced
values: changing temperature, top-k or top-p does not recompile.

Positions follow transformers' `generate`: cumsum(attention_mask) - 1, so left padding does not shift them.
Token ids, pixel ranges and sampling settings are checked on the host first (a ValueError naming the argument):
inside the traced loop a bad value would silently give NaN logits or fall back to greedy decoding.

    model = vlm_jax.load_pretrained(path)          # or an InternVL module
    tokenizer = vlm_jax.tokenizer.load_tokenizer(path)
    result = generate(model, tokenizer, images=["cat.jpg"], prompt="What is this?", max_new_tokens=32)
    result.text, result.token_ids
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.inference import bucket_pow2, build_prompt, check_pixel_range, check_token_ids, module_of

# Prompts are left-padded to at least this many tokens (then to the next power of two).
MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids, EOS included when reached
    text: str  # decoded without special tokens
    prompt_ids: list[int]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off. Out-of-range values are refused (ValueError)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        # Inside the traced loop a bad value would silently mean greedy (or no filter): refuse it here.
        temperature, top_p = _real(self.temperature), _real(self.top_p)
        if not 0 <= temperature < math.inf:  # NaN fails too
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if _integer(self.top_k) is None or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if _integer(self.seed) is None:
            raise ValueError(f"SamplingParams.seed must be an integer, got {self.seed!r}")


def _real(x) -> float:
    """float(x) for a number (numpy and 0-d jax values included); NaN for anything else, which every range check
    refuses."""
    if isinstance(x, (bool, str)):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _integer(x) -> int | None:
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


# ---- sampling ---------------------------------------------------------------------------------------------------

def _filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """float[B, V]: logits outside the top-k / nucleus set to -inf (k <= 0 and p >= 1 disable each)."""
    sorted_desc = -jnp.sort(-logits, axis=-1)
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[None, None].repeat(logits.shape[0], 0), axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p (the first always).
    probs = jax.nn.softmax(-jnp.sort(-logits, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (before < top_p) | (jnp.arange(vocab) == 0)
    cutoff = jnp.min(jnp.where(keep_sorted, -jnp.sort(-logits, axis=-1), jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def _next_token(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """float[B, V] -> int32[B]: argmax when temperature == 0, else a sample from the filtered distribution."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = _filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


# ---- jitted programs ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, pixel_values, input_ids, attention_mask, *, cache_len: int):
    """-> (last-position logits float[B, V], cache, next position int32[B])."""
    model = nnx.merge(graphdef, state)
    lm = model.language_model
    if pixel_values is None:
        embeds = lm.embed(input_ids)
    else:
        embeds = model.merge_image_embeddings(input_ids, model.image_embeddings(pixel_values))
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
    cache = lm.init_cache(input_ids.shape[0], cache_len)
    hidden, cache = lm(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions, cache=cache)
    logits = model.logits(hidden[:, -1:])[:, 0]
    return logits.astype(jnp.float32), cache, positions[:, -1] + 1


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _decode(graphdef, state, cache, first_logits, next_pos, key, temperature, top_k, top_p, eos_id, pad_id,
            *, max_new_tokens: int):
    """The whole decode loop: -> (tokens int32[B, max_new_tokens] (pad after EOS), number of steps run)."""
    b = first_logits.shape[0]

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, pos, done, out = carry
        token = _next_token(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | (token == eos_id)
        # Fresh Variables at this loop's trace level: NNX transforms (the layer scan) refuse outer-level ones.
        model = nnx.merge(graphdef, state, copy=True)
        hidden, cache = model.language_model(input_ids=token[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                                             positions=pos[:, None], cache=cache)
        logits = model.logits(hidden)[:, 0].astype(jnp.float32)
        return step + 1, cache, logits, pos + 1, done, out

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    init = (jnp.int32(0), cache, first_logits, next_pos, jnp.zeros((b,), bool), out)
    steps, _, _, _, _, out = jax.lax.while_loop(cond, body, init)
    return out, steps


# ---- public API ---------------------------------------------------------------------------------------------------

def generate_ids(model, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray | None = None,
                 *, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                 sampling: SamplingParams = SamplingParams()) -> np.ndarray:
    """Batched generation from token ids.

    input_ids / attention_mask int[B, T] (left padding; right padding would put pads between prompt and answer),
    pixel_values float[N, S, S, 3] for the `<IMG_CONTEXT>` runs in row-major order (None for text only).
    Returns int32[B, max_new_tokens]: generated ids, EOS included, pad_token_id after it.
    """
    model = module_of(model)
    vocab = model.config.text.vocab_size
    check_token_ids(input_ids, vocab, "input_ids")
    check_token_ids([pad_token_id], vocab, "pad_token_id")  # pads are embedded too (then masked)
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.asarray(attention_mask, np.int32)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be equal [B, T]")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids hold no tokens (shape [B, 0]): nothing to continue from")
    if pixel_values is not None:
        check_pixel_range(pixel_values)
    if np.any(attention_mask[:, -1] == 0):
        raise ValueError("prompts must be left-padded (attention_mask[:, -1] == 0 for some row)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    image_token_id = model.config.image_token_id
    n_ctx = int(np.sum(input_ids == image_token_id)) if image_token_id is not None else 0
    n_img = 0 if pixel_values is None else pixel_values.shape[0] * model.config.num_image_tokens_for(
        pixel_values.shape[1])
    if n_ctx != n_img:
        raise ValueError(f"prompt holds {n_ctx} <IMG_CONTEXT> tokens but the images give {n_img} embeddings")
    # Left-pad to a bucket so nearby prompt lengths share one compiled prefill / decode.
    b, t = input_ids.shape
    length = bucket_pow2(t, minimum=MIN_PROMPT_BUCKET)
    ids = np.full((b, length), pad_token_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    ids[:, length - t:], mask[:, length - t:] = input_ids, attention_mask
    graphdef, state = nnx.split(model)
    px = None if pixel_values is None else jnp.asarray(pixel_values, model.dtype)
    logits, cache, next_pos = _prefill(graphdef, state, px, jnp.asarray(ids), jnp.asarray(mask),
                                       cache_len=length + max_new_tokens)
    out, _ = _decode(graphdef, state, cache, logits, next_pos, jax.random.key(sampling.seed),
                     jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
                     jnp.int32(eos_token_id), jnp.int32(pad_token_id), max_new_tokens=max_new_tokens)
    return np.asarray(out)


def generate(model, tokenizer, images=None, prompt: str = "", max_new_tokens: int = 64, *,
             template: str = "internvl2_5", system_message: str | None = None, max_tiles: int = 12,
             use_thumbnail: bool = True, sampling: SamplingParams = SamplingParams()) -> GenerationResult:
    """Ask the model about images (paths, bytes, PIL images or arrays; a single one or a list; None for text only).

    Images are tiled as in InternVL (`dynamic_tiles`, up to `max_tiles` tiles + thumbnail) at the model's image
    size; the prompt goes through the chat template with one `<image>` block per image (placed first unless the
    prompt has `<image>` tags). Stops at `<|im_end|>` or after `max_new_tokens`.
    """
    builder, prompt_ids, pixel_values = build_prompt(model, tokenizer, images, prompt, template=template,
                                                     system_message=system_message, max_tiles=max_tiles,
                                                     use_thumbnail=use_thumbnail)
    if template == "plain":
        prompt_ids = prompt_ids[:-1]  # "plain" ends sequences with EOS; here the model continues the text instead
    ids = np.asarray([prompt_ids], np.int32)
    out = generate_ids(model, ids, np.ones_like(ids), pixel_values, max_new_tokens=max_new_tokens,
                       eos_token_id=builder.eos_id, pad_token_id=builder.pad_id, sampling=sampling)[0]
    tokens = _until_eos(out.tolist(), builder.eos_id)
    return GenerationResult(token_ids=tokens, text=tokenizer.decode(tokens, skip_special_tokens=True),
                            prompt_ids=prompt_ids)


def _until_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def answer_text(tokenizer, tokens: Sequence[int], eos_id: int) -> str:
    """Generated ids up to EOS, decoded with special tokens kept: InternVL's tokenizer makes `<ref>`, `</ref>`,
    `<box>`, `</box>` special tokens, and dropping them would drop the markup `grounding.parse_boxes` reads."""
    tokens = [int(t) for t in tokens]
    if eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]
    return tokenizer.decode(tokens, skip_special_tokens=False)
