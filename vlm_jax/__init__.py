"""vlm_jax: InternVL3 vision-language models in JAX/Flax.

The top-level names are imported lazily so that `import vlm_jax` stays cheap
(data workers and CLI entry points import submodules directly).
"""

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": ("vlm_jax.pretrained", "load_pretrained"),
    "load_tokenizer": ("vlm_jax.tokenizer", "load_tokenizer"),
    "dynamic_tiles": ("vlm_jax.data.preprocess", "dynamic_tiles"),
    "encode_images": ("vlm_jax.inference", "encode_images"),
    "encode_texts": ("vlm_jax.inference", "encode_texts"),
    "score": ("vlm_jax.inference", "score"),
    "prepare_inputs": ("vlm_jax.inference", "prepare_inputs"),
    "generate": ("vlm_jax.generation", "generate"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'vlm_jax' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
