"""Random InternVL models and Hugging Face checkpoints, for demos and tests (no PyTorch needed).

The parameters are drawn with numpy into the abstract model (`nnx.eval_shape`), so building one compiles
nothing: eager `InternVL(config, rngs=...)` compiles every initializer op separately, which takes seconds.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from vlm_jax.checkpoints import hf
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL


def random_params(config: InternVLConfig, *, seed: int = 0, noise: float = 0.1, dtype=np.float32) -> dict:
    """{flax path: array}: kernels N(0, 1/fan_in), norm scales 1 + N(0, noise^2), everything else N(0, noise^2).

    No parameter is left at a constant (unit norms, zero biases), so checks against a reference see all of them.
    """
    abstract = nnx.eval_shape(lambda: InternVL(config, rngs=nnx.Rngs(0)))
    flat = hf.flat_params(abstract)
    rng = np.random.default_rng(seed)
    out = {}
    for path in sorted(flat):
        shape = tuple(flat[path].shape)
        leaf = path.rsplit("/", 1)[-1]
        x = rng.standard_normal(shape, dtype=np.float32)
        if leaf == "kernel":
            x *= 1.0 / np.sqrt(shape[-2])
        elif leaf == "scale":
            x = 1.0 + noise * x
        else:
            x *= noise
        out[path] = x.astype(dtype)
    return out


def random_model(config: InternVLConfig, *, seed: int = 0, noise: float = 0.1, dtype="float32") -> InternVL:
    """An InternVL with random parameters (see `random_params`), params and compute in `dtype`."""
    import jax.numpy as jnp

    jdtype = jnp.dtype(dtype)
    flat = random_params(config, seed=seed, noise=noise)
    return hf.model_from_flat(config, flat, dtype=jdtype, param_dtype=jdtype)


def write_random_checkpoint(directory: str, config: InternVLConfig, *, layout: str = "transformers", seed: int = 0,
                            dtype: str = "float32", tokenizer=None) -> InternVL:
    """Write a random checkpoint (config.json + model.safetensors, + the tokenizer's files when `tokenizer` is
    given) to `directory`; returns the Flax model.

    The tokenizer must fit the model: its `<IMG_CONTEXT>` id is `config.image_token_id` and all its ids are
    below the vocabulary size.
    """
    if config.image_token_id is None:
        raise ValueError("config.image_token_id must be set for a random checkpoint")
    if tokenizer is not None:
        context_id = tokenizer.convert_tokens_to_ids(hf.IMG_CONTEXT)
        if context_id != config.image_token_id:
            raise ValueError(f"tokenizer: {hf.IMG_CONTEXT} has id {context_id}, expected config.image_token_id "
                             f"{config.image_token_id}")
        if len(tokenizer) > config.text.vocab_size:
            raise ValueError(f"tokenizer: {len(tokenizer)} ids do not fit config.text.vocab_size "
                             f"{config.text.vocab_size}")
    model = random_model(config, seed=seed)
    hf.save_hf(directory, model, config, layout=layout, dtype=dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return model
