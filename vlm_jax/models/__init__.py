"""InternVL3 model definitions (Flax NNX)."""

from vlm_jax.models.config import InternVLConfig, TextConfig, VisionConfig
from vlm_jax.models.internvl import InternVL, InternVLOutput

__all__ = ["InternVL", "InternVLConfig", "InternVLOutput", "TextConfig", "VisionConfig"]
