"""`vlm_jax.load_pretrained`: a converted or Hugging Face InternVL checkpoint behind a compiled forward.

    model = vlm_jax.load_pretrained(path, image_token_id=None, dtype="float32", attention="auto")
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask)   # px float[N, H, W, 3] NHWC normalised
    out.logits                                                           # float[B, T, V]

Image size: H and W must be multiples of patch_size * (1 / downsample_ratio) (28 for InternVL3). A size other
than the checkpoint's (448) is allowed: the position embeddings are then bicubic-interpolated exactly as
transformers does, and each tile gives (H/28)*(W/28) image tokens instead of 256.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax import inference
from vlm_jax.checkpoints import converted, hf
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL, InternVLOutput, count_image_tokens


# Module-level jitted functions: wrappers around equal configs share the compiled code (the cache key is the
# module's graph definition, which holds the config, plus the input shapes).
@nnx.jit
def _forward(module: InternVL, pixel_values, input_ids, attention_mask) -> InternVLOutput:
    return module(pixel_values, input_ids, attention_mask)


@nnx.jit
def _forward_text(module: InternVL, input_ids, attention_mask) -> InternVLOutput:
    hidden, _ = module.language_model(input_ids=input_ids, attention_mask=attention_mask)
    return InternVLOutput(logits=module.logits(hidden), hidden=hidden)


class PretrainedInternVL:
    """Callable wrapper: input checks on the host, then a jitted forward (compiled once per input shape)."""

    def __init__(self, module: InternVL, config: InternVLConfig):
        self.module = module
        self.config = config
        self.image_token_id = config.image_token_id

    def check_pixel_values(self, pixel_values) -> tuple[int, int, int]:
        """Validate float[N, H, W, C] -> (N, H, W)."""
        shape = tuple(np.shape(pixel_values))
        v = self.config.vision
        if len(shape) != 4:
            raise ValueError(f"pixel_values must be 4-D [N, H, W, {v.num_channels}] (NHWC), got shape {shape}")
        if shape[-1] != v.num_channels:
            hint = " (this looks like NCHW: transpose to NHWC)" if shape[1] == v.num_channels else ""
            raise ValueError(f"pixel_values must be NHWC with {v.num_channels} channels last, got shape {shape}{hint}")
        step = v.patch_size * self.config.shuffle_factor
        n, h, w = shape[:3]
        if h % step or w % step or h == 0 or w == 0:
            raise ValueError(f"pixel_values image size {h}x{w} must be a positive multiple of {step} "
                             f"(patch {v.patch_size} x pixel-shuffle {self.config.shuffle_factor}); "
                             f"the checkpoint's size is {v.image_size}x{v.image_size}")
        return n, h, w

    def __call__(self, pixel_values=None, input_ids=None, attention_mask=None) -> InternVLOutput:
        if input_ids is None:
            raise ValueError("input_ids is required")
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be int[B, T], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}")
        inference.check_token_ids(ids, self.config.text.vocab_size)
        found = count_image_tokens(ids, self.image_token_id)
        ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
        if pixel_values is None:
            if found:
                raise ValueError(f"input_ids hold {found} <IMG_CONTEXT> tokens (id {self.image_token_id}) "
                                 "but no pixel_values were given")
            return _forward_text(self.module, ids, mask)
        n, h, w = self.check_pixel_values(pixel_values)
        inference.check_pixel_range(pixel_values)
        per_tile = (h // self.config.vision.patch_size // self.config.shuffle_factor) * (
            w // self.config.vision.patch_size // self.config.shuffle_factor)
        if found != n * per_tile:
            raise ValueError(f"input_ids hold {found} <IMG_CONTEXT> tokens (id {self.image_token_id}) but "
                             f"{n} image(s) of {h}x{w} need {n} x {per_tile} = {n * per_tile}")
        px = jnp.asarray(pixel_values, self.module.dtype)
        return _forward(self.module, px, ids, mask)


def load_module(path: str, *, image_token_id: int | None = None, dtype="float32") -> tuple[InternVL, InternVLConfig]:
    """(InternVL, config) from a converted directory or a Hugging Face checkpoint directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is not a directory")
    if converted.is_converted(path):
        return converted.load(path, image_token_id=image_token_id, dtype=dtype)
    return hf.load_hf(path, image_token_id=image_token_id, dtype=dtype)


def load_pretrained(path, image_token_id: int | None = None, dtype="float32",
                    attention: str = "auto") -> PretrainedInternVL:
    """Load a converted (`python -m vlm_jax.convert`) or Hugging Face InternVL checkpoint.

    image_token_id: overrides the config's (transformers layout) / the tokenizer's `<IMG_CONTEXT>` id.
    dtype: parameter and compute dtype ("float32" or "bfloat16"); bf16 checkpoints are cast on load.
    attention: both towers' implementation (`vlm_jax.models.layers.ATTENTION_IMPLEMENTATIONS`; 'auto': 'map' on
    CPU, cuDNN flash attention on NVIDIA GPUs in bf16 where it compiles, else 'xla').
    """
    module, config = load_module(path, image_token_id=image_token_id, dtype=dtype)
    module.set_attention_implementation(attention)
    return PretrainedInternVL(module, config)
