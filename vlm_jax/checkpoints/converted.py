"""Converted checkpoints: an orbax parameter tree + the model config, written by `python -m vlm_jax.convert`.

The one place that reads and writes this format. Directory layout:
  vlm_jax_config.json   {"format": FORMAT, "config": InternVLConfig.to_dict(), "param_dtype": "float32"}
  params/               orbax StandardSave of the nested parameter dict (same paths as `nnx.state(model)`)
  tokenizer files       copied from the source checkpoint when present
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from vlm_jax.checkpoints import hf
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL

FORMAT = "vlm_jax.converted/1"
CONFIG_FILE = "vlm_jax_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def is_converted(path: str) -> bool:
    return os.path.exists(os.path.join(path, CONFIG_FILE))


def save(out_dir: str, config: InternVLConfig, model: InternVL, *, source_dir: str | None = None) -> None:
    """Write `model`'s parameters (orbax) + config (+ tokenizer files from `source_dir`) to `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    param_dtype = str(jax.tree.leaves(params)[0].dtype)
    params_dir = os.path.join(out_dir, "params")
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params)
    meta = {"format": FORMAT, "config": config.to_dict(), "param_dtype": param_dtype}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(source_dir, name)
            if os.path.exists(src):
                shutil.copy2(src, os.path.join(out_dir, name))


def read_config(path: str) -> InternVLConfig:
    """The stored InternVLConfig; an image_token_id it lacks comes from the copied tokenizer files."""
    if not is_converted(path):
        raise ValueError(f"{path}: not a converted checkpoint (no {CONFIG_FILE}; write one with "
                         "`python -m vlm_jax.convert`).")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown converted format {meta.get('format')!r}, expected {FORMAT!r}")
    config = InternVLConfig.from_dict(meta["config"])
    if config.image_token_id is None:
        found = hf.tokenizer_token_id(path)
        if found is None:
            raise ValueError(f"{path}: no image_token_id in {CONFIG_FILE} or the tokenizer files; "
                             "pass image_token_id=...")
        config = config.replace(image_token_id=found)
    return config


def restore_params(path: str, abstract_state: nnx.State) -> nnx.State:
    """The stored parameters, read directly into the shardings and dtypes of `abstract_state` (the abstract
    `nnx.State` of an InternVL's parameters, e.g. from `nnx.eval_shape`)."""
    target = nnx.to_pure_dict(abstract_state)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(os.path.abspath(path), "params"), target)
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy: the caller's abstract state stays abstract
    nnx.replace_by_pure_dict(state, restored)
    return state


def load(path: str, *, image_token_id: int | None = None, dtype="float32") -> tuple[InternVL, InternVLConfig]:
    """Restore a converted checkpoint -> (InternVL with params and compute in `dtype`, config)."""
    config = read_config(path)
    if image_token_id is not None:
        config = config.replace(image_token_id=int(image_token_id))
    jdtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: InternVL(config, dtype=jdtype, param_dtype=jdtype, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return nnx.merge(graphdef, restore_params(path, params), rest), config
