"""Hugging Face InternVL checkpoints (config.json + safetensors) to and from the Flax model.

Both layouts of `mapping.TABLE` (transformers, with its legacy on-disk prefixes renamed; OpenGVLab
`internvl_chat`). Every tensor is checked (missing / unexpected / wrong shape, all listed in one error) from the
safetensors headers before any data is read; tensors holding NaN or Inf are refused by name. config.json is
type-checked field by field (`InternVLConfig.from_hf_dict`). Pickled weights (.bin/.pt/.pth) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from vlm_jax.checkpoints import mapping
from vlm_jax.checkpoints.integrity import CheckpointError
from vlm_jax.checkpoints.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsDir
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL


# The converted format's names (`converted` imports this module, so they are spelled here, not imported).
CONVERTED_CONFIG = "vlm_jax_config.json"
CONVERTED_PARAMS = "params"


# ---- config / layout / image token ----------------------------------------------------------------------------

def read_config(directory: str) -> tuple[dict, InternVLConfig, str]:
    """-> (raw config.json, InternVLConfig, layout). Errors name the file and the field."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(directory, CONVERTED_PARAMS)):
            # A converted checkpoint that lost its config file: name the file that is really missing.
            raise ValueError(f"{directory}: holds converted parameters ({CONVERTED_PARAMS}/) but no "
                             f"{CONVERTED_CONFIG}; re-convert the Hugging Face checkpoint with "
                             "`python -m vlm_jax.convert`.")
        raise ValueError(f"{directory}: no config.json (a Hugging Face checkpoint) or {CONVERTED_CONFIG} "
                         "(a converted one)")
    raw = read_json(path)
    cfg = InternVLConfig.from_hf_dict(raw, source=path)
    layout = "opengvlab" if raw.get("model_type") == "internvl_chat" else "transformers"
    return raw, cfg, layout


IMG_CONTEXT = "<IMG_CONTEXT>"


def tokenizer_token_id(directory: str, token: str = IMG_CONTEXT) -> int | None:
    """The id of `token` from the tokenizer files in `directory` (no network, no tokenizer build)."""
    for table in _token_tables(directory):
        if token in table:
            return int(table[token])
    return None


def _token_tables(directory: str):
    """{token: id} tables from the tokenizer files, most authoritative first; each file is read only if needed."""
    tok = _read_json(directory, "tokenizer.json")
    yield {added.get("content"): added.get("id") for added in tok.get("added_tokens", [])}
    vocab = (tok.get("model") or {}).get("vocab")
    yield vocab if isinstance(vocab, dict) else {}
    yield _read_json(directory, "added_tokens.json")
    decoder = _read_json(directory, "tokenizer_config.json").get("added_tokens_decoder", {})
    yield {entry.get("content"): idx for idx, entry in decoder.items()}
    yield _read_json(directory, "vocab.json")


def read_json(path: str, *, error: type[Exception] = ValueError, hint: str = ""):
    """The JSON value in ``path``; an unreadable or invalid file raises ``error`` naming it (then ``hint``)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise error(f"{path}: not a readable JSON file ({err}){hint}") from None


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    return read_json(path) if os.path.exists(path) else {}


def resolve_image_token_id(directory: str, cfg: InternVLConfig, layout: str, override: int | None) -> int:
    """Argument > config (transformers layout) > tokenizer files (<IMG_CONTEXT>)."""
    if override is not None:
        return int(override)
    if cfg.image_token_id is not None and layout == "transformers":
        return int(cfg.image_token_id)
    found = tokenizer_token_id(directory)
    if found is not None:
        return found
    if cfg.image_token_id is not None:
        return int(cfg.image_token_id)
    raise ValueError(f"{directory}: cannot find the image token id: config.json has no image_token_id and no "
                     f"tokenizer file there defines {IMG_CONTEXT}; pass image_token_id=...")


# ---- loading ----------------------------------------------------------------------------------------------------

def flat_params(model) -> dict:
    """{'/'-joined flax path: leaf} of the model's parameters (arrays or ShapeDtypeStructs)."""
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), sep="/")


def flax_params_from(shapes: dict[str, tuple[int, ...]], get: Callable[[str], np.ndarray], cfg: InternVLConfig,
                     layout: str, param_dtype, progress=None, *, source: str = "checkpoint") -> dict:
    """Map checkpoint tensors (names -> shapes, and a getter) to {flax path: np.ndarray in param_dtype}.

    Works for files and for in-memory state dicts (e.g. a PyTorch model's, converted to numpy by `get`).
    Tensors holding NaN or Inf are refused (`CheckpointError` naming them and `source`).
    """
    display = lambda name: name  # noqa: E731
    if layout == "transformers":
        back = {mapping.native_name(k): k for k in shapes}
        if any(k != v for k, v in back.items()):  # legacy names: report them as the file spells them
            display = lambda name: back.get(name, mapping.legacy_name(name))  # noqa: E731
        shapes = {mapping.native_name(k): v for k, v in shapes.items()}
        get_native = lambda name: get(back[name])  # noqa: E731
    else:
        get_native = get
    abstract = nnx.eval_shape(lambda: InternVL(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    flax_shapes = {k: tuple(v.shape) for k, v in flat_params(abstract).items()}
    np_dtype = np.dtype(param_dtype)
    out, nonfinite = {}, []
    for row, names_per_layer in mapping.match(cfg, layout, shapes, flax_shapes, display):
        shape = flax_shapes[row.flax]
        per_shape = shape[1:] if row.per_layer else shape
        values = []
        for names in names_per_layer:
            tensors = [np.asarray(get_native(n)) for n in names]
            nonfinite += [display(n) for n, t in zip(names, tensors) if not _finite(t)]
            values.append(mapping.to_flax(row, tensors, per_shape).astype(np_dtype))
        out[row.flax] = np.stack(values) if row.per_layer else values[0]
        if progress is not None:
            progress(row.flax)
    if nonfinite:
        more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
        raise CheckpointError(f"{source}: {len(nonfinite)} tensor(s) hold NaN or Inf, refusing them: "
                              f"{', '.join(nonfinite[:5])}{more}")
    return out


def _finite(x: np.ndarray) -> bool:
    """False when a floating-point tensor (bf16 included) holds NaN or Inf."""
    return x.dtype.kind in "biu" or bool(np.isfinite(x).all())


def model_from_flat(cfg: InternVLConfig, flat: dict, *, dtype, param_dtype) -> InternVL:
    """An InternVL whose parameters are `flat` ({'a/b/c': array}, every parameter); no random init is run."""
    abstract = nnx.eval_shape(lambda: InternVL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    values = {path: jnp.asarray(flat[path], dtype=param_dtype) for path in flat_params(abstract)}
    nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(values, sep="/"))
    return nnx.merge(graphdef, params, rest)


def load_hf(directory: str, *, image_token_id: int | None = None, dtype="float32",
            progress=None) -> tuple[InternVL, InternVLConfig]:
    """Read config + safetensors from `directory` -> (InternVL with params and compute in `dtype`, config)."""
    _, cfg, layout = read_config(directory)
    cfg = cfg.replace(image_token_id=resolve_image_token_id(directory, cfg, layout, image_token_id))
    files = SafetensorsDir(directory)
    shapes = files.shapes()
    cfg = untie_if_lm_head_present(cfg, shapes)
    jdtype = jnp.dtype(dtype)
    flat = flax_params_from(shapes, files.get, cfg, layout, jdtype, progress, source=directory)
    return model_from_flat(cfg, flat, dtype=jdtype, param_dtype=jdtype), cfg


def untie_if_lm_head_present(cfg: InternVLConfig, shapes: dict) -> InternVLConfig:
    """A config that says "tied" but a checkpoint that holds its own lm_head: keep the separate lm_head.

    transformers v5 defaults the top-level tie_word_embeddings to True and then loads a stored lm_head as a
    separate matrix; InternVL3 checkpoints are untied.
    """
    if not cfg.text.tie_word_embeddings:
        return cfg
    names = {"lm_head.weight", "language_model.lm_head.weight"}
    if any(n in shapes for n in names):
        return cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=False))
    return cfg


# ---- writing (Flax -> Hugging Face) -------------------------------------------------------------------------

def to_hf_config_dict(cfg: InternVLConfig, layout: str = "transformers") -> dict:
    """config.json content for `layout` ('transformers' or 'opengvlab'); inverse of `InternVLConfig.from_hf_dict`."""
    v, t = cfg.vision, cfg.text
    text = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=t.vocab_size,
                hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, hidden_act="silu",
                rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
                tie_word_embeddings=t.tie_word_embeddings, use_sliding_window=False)
    if t.head_dim != t.hidden_size // t.num_heads:
        text["head_dim"] = t.head_dim
    if layout == "transformers":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": t.rope_theta}
        out = dict(
            model_type="internvl", architectures=["InternVLForConditionalGeneration"],
            vision_config=dict(
                model_type="internvl_vision", hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
                image_size=[v.image_size, v.image_size], patch_size=[v.patch_size, v.patch_size],
                num_channels=v.num_channels, attention_bias=v.qkv_bias, use_qk_norm=v.qk_norm,
                norm_type=v.norm_type, layer_norm_eps=v.layer_norm_eps, hidden_act="gelu", use_mean_pooling=True,
                use_absolute_position_embeddings=True),
            text_config=text, downsample_ratio=cfg.downsample_ratio, projector_hidden_act="gelu",
            vision_feature_layer=cfg.select_layer, vision_feature_select_strategy="default",
            tie_word_embeddings=t.tie_word_embeddings)
        if cfg.image_token_id is not None:
            out["image_token_id"] = cfg.image_token_id
        return out
    if layout == "opengvlab":
        text["rope_theta"] = t.rope_theta
        return dict(
            model_type="internvl_chat", architectures=["InternVLChatModel"], force_image_size=v.image_size,
            downsample_ratio=cfg.downsample_ratio, ps_version=cfg.ps_version, select_layer=cfg.select_layer,
            template="internvl2_5", tie_word_embeddings=False,
            vision_config=dict(
                model_type="intern_vit_6b", architectures=["InternVisionModel"], hidden_size=v.hidden_size,
                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
                num_channels=v.num_channels, qkv_bias=v.qkv_bias, qk_normalization=v.qk_norm,
                norm_type=v.norm_type, layer_norm_eps=v.layer_norm_eps, hidden_act="gelu"),
            llm_config=text)
    raise ValueError(f"layout must be 'transformers' or 'opengvlab', got {layout!r}")


def save_hf(directory: str, module: InternVL, cfg: InternVLConfig, layout: str = "transformers",
            dtype="float32", max_shard_bytes: int = 5 * 10 ** 9) -> None:
    """Write `module` as a Hugging Face checkpoint (config.json + safetensors) in `layout`.

    The transformers layout uses the native names (`model.*`, `lm_head.weight`), which transformers loads. Tensors
    go to `model.safetensors`, or, above `max_shard_bytes`, to `model-0000k-of-0000n.safetensors` shards with a
    `model.safetensors.index.json` (the layout `from_pretrained` and `SafetensorsDir` read), in mapping order.
    """
    if layout == "opengvlab" and cfg.text.tie_word_embeddings:
        raise ValueError("the OpenGVLab layout has no tied-embedding variant")
    os.makedirs(directory, exist_ok=True)
    flat = {path: np.asarray(jnp.asarray(v, jnp.float32)) for path, v in flat_params(module).items()}
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = {}
    for row in mapping.rows(cfg):
        names = row.names(layout)
        for i, value in enumerate(flat[row.flax] if row.per_layer else [flat[row.flax]]):
            for name, arr in zip(names, mapping.from_flax(row, value, cfg, len(names))):
                tensors[name.format(i=i)] = np.ascontiguousarray(arr.astype(np_dtype))
    shards: list[dict] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(tensors, os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_config_dict(cfg, layout), f, indent=2)
