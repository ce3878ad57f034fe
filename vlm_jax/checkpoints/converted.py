"""Converted checkpoints: an orbax parameter tree + the model config, written by `python -m vlm_jax.convert`.

The one place that reads and writes this format. Directory layout:
  vlm_jax_config.json   {"format": FORMAT, "config": InternVLConfig.to_dict(), "param_dtype": "float32",
                         "fingerprints": {"vision_tower/.../kernel": "1a2b3c4d", ...}}
  params/               orbax StandardSave of the nested parameter dict (same paths as `nnx.state(model)`)
  tokenizer files       copied from the source checkpoint when present

Integrity: `save` refuses parameters holding NaN or Inf and records one fingerprint per array (`integrity`);
`restore_params` reads every array in its stored dtype, compares it with its fingerprint, and only then casts it to
the dtype asked for. Damage (flipped bits, cut files, a lost config) is a `CheckpointError` naming the directory
and, when it can be known, the array.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from vlm_jax.checkpoints import hf, integrity
from vlm_jax.checkpoints.integrity import CheckpointError
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL

FORMAT = "vlm_jax.converted/1"
CONFIG_FILE = hf.CONVERTED_CONFIG
PARAMS_DIR = hf.CONVERTED_PARAMS
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")
_RECONVERT = "re-convert it with `python -m vlm_jax.convert`"


def is_converted(path: str) -> bool:
    return os.path.exists(os.path.join(path, CONFIG_FILE))


def save(out_dir: str, config: InternVLConfig, model: InternVL, *, source_dir: str | None = None) -> None:
    """Write `model`'s parameters (orbax) + config and fingerprints (+ tokenizer files from `source_dir`) to
    `out_dir`. Raises `CheckpointError` naming the arrays, before writing anything, when any holds NaN or Inf."""
    out_dir = os.path.abspath(out_dir)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fingerprints = integrity.check_finite(params, f"{out_dir}: the parameters to save")
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, CONFIG_FILE)
    if os.path.exists(config_path):  # the config marks a finished directory: gone until the new params are in
        os.remove(config_path)
    params_dir = os.path.join(out_dir, PARAMS_DIR)
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params)
    meta = {"format": FORMAT, "config": config.to_dict(), "param_dtype": str(jax.tree.leaves(params)[0].dtype),
            "fingerprints": fingerprints}
    with open(config_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(config_path + ".tmp", config_path)
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(source_dir, name)
            if os.path.exists(src):
                shutil.copy2(src, os.path.join(out_dir, name))


def _read_meta(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise ValueError(f"{path}: not a converted checkpoint (no {CONFIG_FILE}; write one with "
                         "`python -m vlm_jax.convert`).")
    meta = hf.read_json(config_path, error=CheckpointError, hint=f"; {_RECONVERT}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"{config_path}: unknown converted format {found!r}, expected {FORMAT!r}")
    return meta


def read_config(path: str) -> InternVLConfig:
    """The stored InternVLConfig; an image_token_id it lacks comes from the copied tokenizer files."""
    meta = _read_meta(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{config_path}: no \"config\" object (the model settings); {_RECONVERT}")
    config = InternVLConfig.from_dict(meta["config"], source=config_path)
    if config.image_token_id is None:
        found = hf.tokenizer_token_id(path)
        if found is None:
            raise ValueError(f"{path}: no image_token_id in {CONFIG_FILE} or the tokenizer files; "
                             "pass image_token_id=...")
        config = config.replace(image_token_id=found)
    return config


def restore_params(path: str, abstract_state: nnx.State) -> nnx.State:
    """The stored parameters, verified against their fingerprints, in the shardings and dtypes of
    `abstract_state` (the abstract `nnx.State` of an InternVL's parameters, e.g. from `nnx.eval_shape`).

    Raises `CheckpointError` naming the directory (and the array when known) for a damaged directory, and for
    one written without fingerprints."""
    path = os.path.abspath(path)
    what = f"converted checkpoint {path}"
    expected = _read_meta(path).get("fingerprints")
    if not isinstance(expected, dict):
        raise CheckpointError(f"{what}: {CONFIG_FILE} records no parameter fingerprints, so damage could not be "
                              f"detected; {_RECONVERT}")
    target = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_state), sep="/")
    stored = _stored_arrays(os.path.join(path, PARAMS_DIR), what)
    _check_layout(target, stored, what)
    # Read in the stored dtype: the fingerprints are over the stored bits.
    as_stored = {k: jax.ShapeDtypeStruct(t.shape, stored[k].dtype, sharding=getattr(t, "sharding", None))
                 for k, t in target.items()}
    failure = None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(path, PARAMS_DIR),
                                     traverse_util.unflatten_dict(as_stored, sep="/"))
    except Exception as err:  # noqa: BLE001 - TensorStore / orbax raise many types; one readable error instead
        array = _array_named_in(err, {m.name: k for k, m in stored.items()})
        failure = f"cannot read {f'array {array}' if array else 'its parameters'} ({_root_line(err)})"
    if failure is not None:  # outside the handler: the exception's frames, which hold the other reads, are gone
        _drop_abandoned_reads()
        raise CheckpointError(f"{what}: {failure}; if its files are damaged, {_RECONVERT}")
    integrity.verify(restored, expected, what)
    restored = _cast_like(traverse_util.flatten_dict(restored, sep="/"), target)
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy: the caller's abstract state stays abstract
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(restored, sep="/"))
    return state


def _stored_arrays(params_dir: str, what: str) -> dict:
    """{'/'-joined path: orbax ArrayMetadata (name, shape, dtype)} of the stored tree."""
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{what}: no {PARAMS_DIR}/ directory; {_RECONVERT}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{what}: cannot read the metadata of {PARAMS_DIR}/ ({_root_line(err)}); if its "
                              f"files are damaged, {_RECONVERT}") from None
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    return traverse_util.flatten_dict(tree, sep="/")


def _check_layout(target: dict, stored: dict, what: str) -> None:
    """The model's arrays and the stored ones agree in names and shapes (else one error listing the first few)."""
    missing = sorted(set(target) - set(stored))
    unexpected = sorted(set(stored) - set(target))
    shapes = [f"{k}: stored {tuple(stored[k].shape)}, model expects {tuple(target[k].shape)}"
              for k in sorted(set(target) & set(stored)) if tuple(stored[k].shape) != tuple(target[k].shape)]
    problems = ([f"missing {integrity.listed(missing)}"] if missing else []) + \
               ([f"not in the model {integrity.listed(unexpected)}"] if unexpected else []) + shapes[:5]
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))


def _cast_like(arrays: dict, target: dict) -> dict:
    """`arrays` in the dtypes (and shardings, when given) of `target`; one compiled cast for the whole tree."""
    if all(arrays[k].dtype == target[k].dtype for k in arrays):
        return arrays
    dtypes = {k: target[k].dtype for k in arrays}
    shardings = {k: getattr(target[k], "sharding", None) for k in arrays}
    out_shardings = shardings if all(s is not None for s in shardings.values()) else None
    cast = jax.jit(lambda xs: {k: x.astype(dtypes[k]) for k, x in xs.items()}, out_shardings=out_shardings)
    return cast(arrays)


def _drop_abandoned_reads(limit_s: float = 3.0) -> None:
    """orbax reads the arrays concurrently; after one read fails, the reads still in flight finish against a
    closed event loop, and each would print its error with a TensorStore spec (asyncio's "never retrieved" log,
    the unraisable hook). Let them finish quietly (until nothing more is reported, at most `limit_s`): the first
    failure is reported, once."""
    logger = logging.getLogger("asyncio")
    level, hook = logger.level, sys.unraisablehook
    dropped = []

    def quiet(unraisable):
        text = f"{unraisable.exc_value} {unraisable.object!r}"
        if any(s in text for s in ("Event loop is closed", "reading array", "TensorStore", "_read_array")):
            dropped.append(1)
        else:
            hook(unraisable)

    logger.setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = quiet
    try:
        quiet_rounds, deadline = 0, time.monotonic() + limit_s
        while quiet_rounds < 2 and time.monotonic() < deadline:
            before = len(dropped)
            time.sleep(0.1)
            gc.collect()  # abandoned tasks and coroutines report when collected
            quiet_rounds = quiet_rounds + 1 if len(dropped) == before else 0
    finally:
        logger.setLevel(level)
        sys.unraisablehook = hook


def _root_line(err: BaseException) -> str:
    """The first line of the innermost cause: what went wrong, without a TensorStore spec dump."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ if err.__cause__ is not None else err.__context__
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= 300 else line[:300] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _array_named_in(err: BaseException, names: dict[str, str]) -> str | None:
    """The parameter path whose stored (dotted) name appears in the exception chain's messages, if one does."""
    texts = []
    while err is not None:
        texts.append(str(err))
        err = err.__cause__ if err.__cause__ is not None else err.__context__
    text = "\n".join(texts)
    found = [dotted for dotted in names if re.search(rf"(?<![\w.]){re.escape(dotted)}(?![\w.])", text)]
    return names[max(found, key=len)] if found else None


def load(path: str, *, image_token_id: int | None = None, dtype="float32") -> tuple[InternVL, InternVLConfig]:
    """Restore a converted checkpoint -> (InternVL with params and compute in `dtype`, config)."""
    config = read_config(path)
    if image_token_id is not None:
        config = config.replace(image_token_id=int(image_token_id))
    jdtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: InternVL(config, dtype=jdtype, param_dtype=jdtype, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return nnx.merge(graphdef, restore_params(path, params), rest), config
