"""Random InternVL checkpoints in Hugging Face format, for demos and smoke tests (no PyTorch needed)."""

from __future__ import annotations

import jax
from flax import nnx

from vlm_jax.checkpoints import hf
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL


def random_model(config: InternVLConfig, *, seed: int = 0, noise: float = 0.1) -> InternVL:
    """An InternVL with every parameter perturbed by N(0, noise^2): unit norms and zero biases become random."""
    model = InternVL(config, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def write_random_checkpoint(directory: str, config: InternVLConfig, *, layout: str = "transformers", seed: int = 0,
                            dtype: str = "float32") -> InternVL:
    """Write a random checkpoint (config.json + model.safetensors) to `directory`; returns the Flax model."""
    if config.image_token_id is None:
        raise ValueError("config.image_token_id must be set for a random checkpoint")
    model = random_model(config, seed=seed)
    hf.save_hf(directory, model, config, layout=layout, dtype=dtype)
    return model


__all__ = ["random_model", "write_random_checkpoint"]
