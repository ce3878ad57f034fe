"""The cache key: a digest of everything that decides a cached row, so that a cache is never read stale.

    backbone weights   sha256 of the frozen backbone's parameters as they are in the run's state (bytes of every
                       leaf's distinct local shards, with paths, shapes and dtypes)
    model              the backbone's architecture and compute settings (`config.model` without the trained
                       layers, plus the poolings whose outputs are cached) and the cached fields
    preprocessing      tile size, tiles (min / max / thumbnail), caption length, prompt template, the tokenizer's
                       vocabulary, image tokens per tile
    dataset            name, builder config and parameters, version, the split's size and shard lengths
    shard and devices  this process's shard (index, count) and the device kind (other kernels round differently)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np

FORMAT = 1
# config.model fields that cannot change a cached row (the weights are hashed; remat only changes the backward pass).
_MODEL_IGNORED = ("embedding", "converted_dir", "tokenizer", "remat", "frozen_param_dtype")


def weights_digest(params) -> str:
    """sha256 hex digest of a state of parameters (paths, shapes, dtypes and values of every leaf)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        value = getattr(leaf, "value", leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{value.shape}|{value.dtype}".encode())
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            seen = set()
            for shard in value.addressable_shards:  # each distinct piece once, with where it sits
                where = str(shard.index)
                if where not in seen:
                    seen.add(where)
                    digest.update(where.encode())
                    digest.update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
        else:
            digest.update(np.ascontiguousarray(np.asarray(value)).tobytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def cache_settings(config, builder, split: str, inputs, weights: str, fields, shard_index: int,
                   shard_count: int) -> dict[str, Any]:
    """The settings a cache of `split` for this process is keyed by (JSON-able)."""
    model = {k: v for k, v in config.model.to_dict().items() if k not in _MODEL_IGNORED}
    embedding = config.model.embedding
    data = config.data
    info = builder.info.splits[split]
    return {
        "format": FORMAT,
        "backbone_weights": weights,
        "model": model,
        "pooling": {"vision": embedding.vision_pool, "text": embedding.text_pool,
                    "tiles": embedding.get("tile_pool", "all")},
        "fields": list(fields),
        "preprocessing": {"image_size": int(inputs.image_size), "num_image_tokens": int(inputs.num_image_tokens),
                          "min_tiles": int(data.min_tiles), "max_tiles": int(data.max_tiles),
                          "use_thumbnail": bool(data.use_thumbnail), "max_text_length": int(data.max_text_length),
                          "template": data.template, "tokenizer": tokenizer_digest(inputs.tokenizer)},
        "dataset": {"name": builder.name, "config": builder.builder_config.name if builder.builder_config else "",
                    "params": data.builder_params.to_dict(), "version": str(builder.info.version),
                    "split": split, "examples": int(info.num_examples),
                    "shard_lengths": [int(n) for n in info.shard_lengths]},
        "shard": [int(shard_index), int(shard_count)],
        "device": jax.devices()[0].device_kind,
    }


def cache_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
