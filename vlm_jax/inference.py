"""Embeddings and image-text scores from a loaded InternVL, for notebooks and evaluation.

Plain functions of the model (an `InternVL` module or what `load_pretrained` returns; no session object): the
jitted programs take the model's graph definition as a static argument, so calls on the same model reuse compiled
code, and a model whose weights changed (training) is seen fresh on every call.

    img = encode_images(model, ["a.jpg", "b.png"], tokenizer=tok)   # float32[N, D], unit norm
    txt = encode_texts(model, ["a cat", "a dog"], tokenizer=tok)     # float32[M, D], unit norm
    s = score(model, images, texts, tokenizer=tok)                   # float32[N, M] cosine similarities
    inputs = prepare_inputs(model, tok, images=[pil], prompt="Describe it.")   # model(**inputs): logits

Pooling:
- images: "cls" / "mean" read the vision tower (CLS token / mean of patch tokens; D = vision width). "lm_last" /
  "lm_mean" run the image through the language model as the prompt `image_prompt` (default: the image block alone,
  then EOS) and take the last token / mean over the prompt (D = LM width, the same space as the texts).
- texts: "last" / "mean" over the language model's final hidden states of `text_prompt.format(text)` + EOS.
`score` needs both sides in one space, so it takes the LM poolings only (defaults "lm_last" and "last").

Each image is one tile at the model's image size (static shapes) unless `max_tiles` asks for InternVL's dynamic
tiling (LM poolings; the tile count is bucketed too). Batches are padded to a power-of-two batch size
(at most `batch_size`) and texts to a power-of-two length (`bucket_pow2`), so every call inside a bucket reuses
its compiled program; a progress bar appears when there are many batches.

Inputs are checked on the host before anything compiles (`check_texts`, `check_token_ids`, `check_pixel_range`,
also used by `generation`): a non-string text, a token id outside the vocabulary (which would embed as NaN or wrap
around) or pixels that were never normalised are a ValueError naming the text, position or array.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vlm_jax.data import preprocess
from vlm_jax.data.prompt import PromptBuilder
from vlm_jax.models import pooling as pool

IMAGE_POOLINGS = ("cls", "mean", "lm_last", "lm_mean")
TEXT_POOLINGS = ("last", "mean")


def bucket_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum) (for a power-of-two `minimum`): a padded size that only
    changes, and so recompiles, when n doubles."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


# ImageNet mean/std map pixels in [0, 1] to about [-2.1, 2.6]; values far beyond were never normalised.
PIXEL_LIMIT = 10.0


def check_token_ids(ids, vocab_size: int, what: str = "input_ids") -> None:
    """Refuses ids outside [0, vocab_size): the embedding lookup would give NaN (too large) or wrap (negative).

    ids: int[...] (host array or list); the error names the first offending position."""
    ids = np.asarray(ids)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}: token ids must be in [0, {vocab_size}) (the model's vocabulary), got "
                         f"{ids[pos]} at position {pos[0] if len(pos) == 1 else pos}")


def check_pixel_range(pixel_values, what: str = "pixel_values") -> None:
    """Refuses pixels that are clearly not ImageNet-normalised (e.g. raw 0..255 values) or not finite.

    pixel_values: float[N, H, W, 3] (numpy or jax; a jax array is reduced on its device)."""
    if np.size(pixel_values) == 0:
        return
    if isinstance(pixel_values, jax.Array):
        peak = float(jnp.max(jnp.abs(pixel_values)))
    else:
        peak = float(np.max(np.abs(np.asarray(pixel_values, np.float32))))
    if not peak <= PIXEL_LIMIT:  # NaN fails this too
        raise ValueError(f"{what}: values reach {peak:g}, far outside the normalised range (about -2.1..2.6 after "
                         f"ImageNet mean/std; |x| <= {PIXEL_LIMIT:g} accepted); these look like raw pixels. Make "
                         "tiles with vlm_jax.data.preprocess (single_tile / dynamic_tiles) or "
                         "`inference.load_pixels`, or pass the images themselves (paths, PIL, uint8 arrays).")


def check_texts(texts, what: str = "texts") -> None:
    """Refuses a single string and non-string entries (None would otherwise be embedded as the text "None")."""
    if isinstance(texts, str):
        raise ValueError(f"{what} must be a sequence of strings, not one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{what}[{i}] must be a string, got {type(text).__name__} {text!r}")


def module_of(model) -> nnx.Module:
    """The InternVL nnx module: `model` itself or the one inside `load_pretrained`'s wrapper."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nnx.Module) else model


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _vision_embed(graphdef, state, pixel_values, *, pooling: str):
    """float[B, S, S, 3] -> float32[B, Dv], unit norm."""
    hidden = nnx.merge(graphdef, state).vision_hidden_states(pixel_values)  # [B, 1 + P, Dv]
    return pool.l2_normalize(pool.pool_vision(hidden, pooling))


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _lm_embed(graphdef, state, pixel_values, input_ids, attention_mask, *, pooling: str):
    """Right-padded int[B, T] (+ images float[B, S, S, 3] or None) -> float32[B, D], unit norm."""
    model = nnx.merge(graphdef, state)
    if pixel_values is None:
        embeds = model.language_model.embed(input_ids)
    else:
        embeds = model.merge_image_embeddings(input_ids, model.image_embeddings(pixel_values))
    hidden, _ = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask)  # [B, T, D]
    return pool.l2_normalize(pool.pool_text(hidden, attention_mask, pooling))


def _batches(n: int, batch_size: int, progress: bool | None, desc: str):
    starts = range(0, n, batch_size)
    show = len(starts) >= 4 if progress is None else progress
    return tqdm(starts, desc=desc, disable=not show, leave=False)


def _rows(n: int, batch_size: int) -> int:
    """Rows per compiled batch: a power of two for small inputs, else batch_size (the last batch is padded)."""
    return min(batch_size, bucket_pow2(n))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Pads the leading axis to `rows` by repeating row 0 (valid input; the outputs are dropped)."""
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - x.shape[0], axis=0)])


def _builder(model, tokenizer, template: str, max_length: int | None, image_size: int | None = None) -> PromptBuilder:
    if tokenizer is None:
        raise ValueError("this pooling runs the language model: pass tokenizer=")
    tokens = model.config.num_image_tokens_for(image_size or model.config.image_size)
    return PromptBuilder(tokenizer, tokens, template, max_length, padding_side="right")


def _run_lm(model, seqs: list[list[int]], pixel_values: np.ndarray | None, tiles: list[int] | None,
            builder: PromptBuilder, pooling: str, batch_size: int, progress, desc: str) -> np.ndarray:
    """Pooled LM embeddings of id lists; pixel_values float[sum(tiles), S, S, 3] hold tiles[i] tiles for seqs[i]."""
    # A tokenizer with more ids than the model's vocabulary would otherwise give NaN embeddings.
    vocab = model.config.text.vocab_size
    for i, seq in enumerate(seqs):
        check_token_ids(seq, vocab, f"{desc}[{i}] (tokenized)")
    check_token_ids([builder.pad_id], vocab, "the tokenizer's pad id")
    graphdef, state = nnx.split(model)
    rows = _rows(len(seqs), batch_size)
    offsets = np.cumsum([0] + list(tiles or []))
    out = []
    for start in _batches(len(seqs), batch_size, progress, desc):
        chunk = seqs[start:start + batch_size]
        length = bucket_pow2(max(len(s) for s in chunk), minimum=8)
        ids, mask = builder.batch(chunk, length=length, padding_side="right")
        px = None
        if pixel_values is not None:
            # Padding rows repeat sequence 0 and come last, so their image tokens only read rows past the real
            # tiles (or clipped ones): real rows are unaffected and padded rows' outputs are dropped.
            px = pixel_values[offsets[start]:offsets[start + len(chunk)]]
            px = jnp.asarray(_pad_rows(px, max(rows, bucket_pow2(len(px)))), model.dtype)
        emb = _lm_embed(graphdef, state, px, jnp.asarray(_pad_rows(ids, rows)), jnp.asarray(_pad_rows(mask, rows)),
                        pooling=pooling)
        out.append(np.asarray(emb)[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.config.text.hidden_size), np.float32)


def load_pixels(model, images: Sequence, image_size: int | None = None) -> np.ndarray:
    """Images (paths, bytes, PIL, arrays) -> float32[N, S, S, 3], one tile each; errors name the image index."""
    size = image_size or model.config.image_size
    return np.stack([preprocess.single_tile(im, size, name=f"image {i}") for i, im in enumerate(images)]) \
        if len(images) else np.zeros((0, size, size, 3), np.float32)


def build_prompt(model, tokenizer, images=None, prompt: str = "", *, template: str = "internvl2_5",
                 system_message: str | None = None, max_tiles: int = 12,
                 use_thumbnail: bool = True) -> tuple[PromptBuilder, list[int], np.ndarray | None]:
    """One prompt about `images` as InternVL builds it: -> (builder, prompt ids, pixel_values float32[N, S, S, 3]
    or None without images).

    images: paths, bytes, PIL images or uint8 arrays; a single one or a list; None for text only. Each is tiled
    by `dynamic_tiles` (up to `max_tiles` tiles + thumbnail) at the model's image size S, and its `<image>` block
    holds num_image_tokens x tiles `<IMG_CONTEXT>` tokens (blocks go first unless the prompt places `<image>` tags).
    """
    model = module_of(model)
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__} {prompt!r}")
    if not images and not prompt.strip():
        raise ValueError("needs a prompt or an image: got no images and an empty prompt")
    size = model.config.image_size
    tiles = [preprocess.dynamic_tiles(im, size, 1, max_tiles, use_thumbnail, name=f"image {i}")
             for i, im in enumerate(images)]
    builder = PromptBuilder(tokenizer, model.config.num_image_tokens, template, system_message=system_message)
    prompt_ids = builder.prompt_ids(prompt, [len(t) for t in tiles])
    return builder, prompt_ids, (np.concatenate(tiles) if tiles else None)


def prepare_inputs(model, tokenizer, images=None, prompt: str = "", *, template: str = "internvl2_5",
                   system_message: str | None = None, max_tiles: int = 12, use_thumbnail: bool = True) -> dict:
    """The model's inputs for one prompt about `images` (built by `build_prompt`), ready for `model(**inputs)`:

    {"pixel_values": float32[N_tiles, S, S, 3] or None, "input_ids": int32[1, T], "attention_mask": int32[1, T]}
    """
    _, prompt_ids, pixel_values = build_prompt(model, tokenizer, images, prompt, template=template,
                                               system_message=system_message, max_tiles=max_tiles,
                                               use_thumbnail=use_thumbnail)
    ids = np.asarray([prompt_ids], np.int32)
    return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": np.ones_like(ids)}


def encode_images(model, images: Sequence, *, tokenizer=None, pooling: str = "lm_last",
                  image_prompt: str = "<image>", template: str = "plain", max_tiles: int | None = None,
                  batch_size: int = 16, progress: bool | None = None) -> np.ndarray:
    """float32[N, D] unit-norm image embeddings (see the module docstring for `pooling`).

    images: paths, encoded bytes, PIL images, uint8 arrays, or already preprocessed single tiles float32[N, S, S, 3].
    max_tiles: LM poolings only; None = one tile per image, else InternVL dynamic tiling (up to max_tiles tiles +
    thumbnail per image, all in the image's `<image>` block).
    """
    model = module_of(model)
    if pooling not in IMAGE_POOLINGS:
        raise ValueError(f"image pooling must be one of {IMAGE_POOLINGS}, got {pooling!r}")
    if max_tiles is not None and not pooling.startswith("lm_"):
        raise ValueError(f"max_tiles needs an LM pooling ('lm_last' / 'lm_mean'), got {pooling!r}")
    if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim == 4:
        if max_tiles is not None:
            raise ValueError("max_tiles needs raw images, not preprocessed pixel arrays")
        check_pixel_range(images, "images (preprocessed tiles)")
        pixels = images
    elif max_tiles is None:
        pixels = load_pixels(model, images)
    else:
        per_image = [preprocess.dynamic_tiles(im, model.config.image_size, 1, max_tiles, name=f"image {i}")
                     for i, im in enumerate(images)]
    if pooling in ("cls", "mean"):
        graphdef, state = nnx.split(model)
        rows = _rows(len(pixels), batch_size)
        out = []
        for start in _batches(len(pixels), batch_size, progress, "images"):
            chunk = pixels[start:start + batch_size]
            px = jnp.asarray(_pad_rows(chunk, rows), model.dtype)
            out.append(np.asarray(_vision_embed(graphdef, state, px, pooling=pooling))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, model.config.vision.hidden_size), np.float32)
    if max_tiles is None:
        tiles = [1] * len(pixels)
    else:
        tiles = [len(t) for t in per_image]
        size = model.config.image_size
        pixels = np.concatenate(per_image) if per_image else np.zeros((0, size, size, 3), np.float32)
    builder = _builder(model, tokenizer, template, None, pixels.shape[1])
    seqs = [builder.prompt_ids(image_prompt, n, index=i) for i, n in enumerate(tiles)]
    return _run_lm(model, seqs, pixels, tiles, builder, pooling[3:], batch_size, progress, "images")


def encode_texts(model, texts: Sequence[str], *, tokenizer, pooling: str = "last", text_prompt: str = "{}",
                 template: str = "plain", max_length: int | None = 512, batch_size: int = 16,
                 progress: bool | None = None) -> np.ndarray:
    """float32[M, D] unit-norm text embeddings: `text_prompt.format(text)` in `template` (no images) + EOS.

    Texts longer than max_length tokens are truncated (keeping EOS).
    """
    model = module_of(model)
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"text pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
    check_texts(texts)
    builder = _builder(model, tokenizer, template, max_length)
    seqs = [builder.prompt_ids(text_prompt.format(t), None, index=i) for i, t in enumerate(texts)]
    return _run_lm(model, seqs, None, None, builder, pooling, batch_size, progress, "texts")


def score(model, images: Sequence, texts: Sequence[str], *, tokenizer, image_pooling: str = "lm_last",
          text_pooling: str = "last", batch_size: int = 16, progress: bool | None = None,
          **prompt_kwargs) -> np.ndarray:
    """Cosine similarities float32[N, M] between `encode_images` and `encode_texts` embeddings.

    prompt_kwargs: image_prompt / max_tiles / text_prompt / template / max_length, forwarded to the encoders.
    """
    if not image_pooling.startswith("lm_"):
        # The vision tower's space is not the language model's, even where the widths happen to agree.
        raise ValueError(f"score needs image_pooling 'lm_last' or 'lm_mean' (the texts' space), got {image_pooling!r}")
    image_kw = {k: v for k, v in prompt_kwargs.items() if k in ("image_prompt", "template", "max_tiles")}
    text_kw = {k: v for k, v in prompt_kwargs.items() if k in ("text_prompt", "template", "max_length")}
    unknown = set(prompt_kwargs) - set(image_kw) - set(text_kw)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}")
    img = encode_images(model, images, tokenizer=tokenizer, pooling=image_pooling, batch_size=batch_size,
                        progress=progress, **image_kw)
    txt = encode_texts(model, texts, tokenizer=tokenizer, pooling=text_pooling, batch_size=batch_size,
                       progress=progress, **text_kw)
    return img @ txt.T
