"""Checkpoint I/O: Hugging Face safetensors (both InternVL layouts) and converted orbax checkpoints."""
