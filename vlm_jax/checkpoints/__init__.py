"""Checkpoints, one module each: `safetensors_io` (reading safetensors files), `mapping` (the Flax <-> Hugging Face
name table), `hf` (Hugging Face checkpoints, both InternVL layouts), `converted` (the orbax format written by
`python -m vlm_jax.convert`), `random_hf` (random models for demos and tests) and `run` (training-run checkpoints
and the resume order)."""
