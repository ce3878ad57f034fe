"""Load Hugging Face InternVL checkpoints (safetensors only) into the Flax model.

Three on-disk layouts, one explicit mapping table each way:
- transformers native: `model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
  `lm_head.weight` (split q/k/v);
- transformers legacy (what `save_pretrained` writes): `vision_tower.*`, `multi_modal_projector.*`,
  `language_model.model.*`, `language_model.lm_head.weight` -> renamed to native by `LEGACY_PREFIXES`;
- OpenGVLab original (`internvl_chat`): `vision_model.*` with fused `attn.qkv`, `ls1/ls2`, `mlp1.{0,1,3}`,
  `language_model.model.*`, `language_model.lm_head.weight`.

Every tensor is checked (missing / unexpected / wrong shape, all listed in one error) from the safetensors
headers before any data is read. Pickled weights (.bin/.pt/.pth) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


# ---- safetensors without torch ------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Memory-mapped safetensors file: header shapes without reading data, tensors as numpy views."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header.pop("__metadata__", None)
        self._offset = 8 + n
        self.header = header

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        arr = np.frombuffer(self._mm, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self._offset + start)
        return arr.reshape(info["shape"])


class SafetensorsCheckpoint:
    """All tensors of a directory: `model.safetensors` or a sharded `model.safetensors.index.json`."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {fn: SafetensorsFile(os.path.join(directory, fn)) for fn in sorted(set(weight_map.values()))}
            self._where = {name: files[fn] for name, fn in weight_map.items()}
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._where = {name: f for name in f.header}
        else:
            pickled = [fn for fn in sorted(os.listdir(directory)) if fn.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if pickled:
                raise ValueError(
                    f"{directory} holds only pickled weights ({', '.join(pickled)}); they are never unpickled here. "
                    "Convert them to safetensors first, e.g. in PyTorch: "
                    "`model.save_pretrained(dir, safe_serialization=True)`.")
            raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(f.header[name]["shape"]) for name, f in self._where.items()}

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


# ---- the mapping table ------------------------------------------------------------------------------------------
#
# Each Rule maps one Flax parameter (path in the nnx state; `layers` entries are stacked over layers) to the
# checkpoint tensor(s) it is built from. `kind` says how:
#   linear   torch [out, in] -> kernel [in, out]
#   copy     same shape
#   reshape  same data, other shape (cls [1,1,D] -> [D], pos [1,P+1,D] -> [P+1,D])
#   conv     torch Conv2d OIHW [D, C, p, p] -> patchify Dense kernel [(p, p, C), D]
#   qkv_w    three torch [D, D] (q, k, v) -> fused kernel [D, 3D]
#   qkv_b    three [D] -> [3D]
# `{i}` in a name is the layer index.


@dataclasses.dataclass(frozen=True)
class Rule:
    flax: str
    sources: tuple[str, ...]
    kind: str = "copy"
    per_layer: bool = False


def _vision_rules_transformers(cfg: InternVLConfig) -> list[Rule]:
    e, l = "model.vision_tower.embeddings", "model.vision_tower.encoder.layer.{i}"
    v = "vision_tower"
    rules = [
        Rule(f"{v}/embeddings/patch_embedding/kernel", (f"{e}.patch_embeddings.projection.weight",), "conv"),
        Rule(f"{v}/embeddings/patch_embedding/bias", (f"{e}.patch_embeddings.projection.bias",)),
        Rule(f"{v}/embeddings/class_embedding", (f"{e}.cls_token",), "reshape"),
        Rule(f"{v}/embeddings/position_embedding", (f"{e}.position_embeddings",), "reshape"),
        Rule(f"{v}/layers/attn/qkv/kernel", tuple(f"{l}.attention.{p}_proj.weight" for p in "qkv"), "qkv_w", True),
        Rule(f"{v}/layers/attn/proj/kernel", (f"{l}.attention.projection_layer.weight",), "linear", True),
        Rule(f"{v}/layers/attn/proj/bias", (f"{l}.attention.projection_layer.bias",), "copy", True),
        Rule(f"{v}/layers/ls1", (f"{l}.lambda_1",), "copy", True),
        Rule(f"{v}/layers/ls2", (f"{l}.lambda_2",), "copy", True),
        Rule(f"{v}/layers/mlp/fc1/kernel", (f"{l}.mlp.fc1.weight",), "linear", True),
        Rule(f"{v}/layers/mlp/fc1/bias", (f"{l}.mlp.fc1.bias",), "copy", True),
        Rule(f"{v}/layers/mlp/fc2/kernel", (f"{l}.mlp.fc2.weight",), "linear", True),
        Rule(f"{v}/layers/mlp/fc2/bias", (f"{l}.mlp.fc2.bias",), "copy", True),
        Rule(f"{v}/layers/norm1/scale", (f"{l}.layernorm_before.weight",), "copy", True),
        Rule(f"{v}/layers/norm2/scale", (f"{l}.layernorm_after.weight",), "copy", True),
    ]
    if cfg.vision.qkv_bias:
        rules.append(Rule(f"{v}/layers/attn/qkv/bias", tuple(f"{l}.attention.{p}_proj.bias" for p in "qkv"),
                          "qkv_b", True))
    if cfg.vision.norm_type == "layer_norm":
        rules += [Rule(f"{v}/layers/norm1/bias", (f"{l}.layernorm_before.bias",), "copy", True),
                  Rule(f"{v}/layers/norm2/bias", (f"{l}.layernorm_after.bias",), "copy", True)]
    if cfg.vision.qk_norm:
        rules += [Rule(f"{v}/layers/attn/q_norm/scale", (f"{l}.attention.q_norm.weight",), "copy", True),
                  Rule(f"{v}/layers/attn/k_norm/scale", (f"{l}.attention.k_norm.weight",), "copy", True)]
    return rules


def _vision_rules_opengvlab(cfg: InternVLConfig) -> list[Rule]:
    e, l = "vision_model.embeddings", "vision_model.encoder.layers.{i}"
    v = "vision_tower"
    rules = [
        Rule(f"{v}/embeddings/patch_embedding/kernel", (f"{e}.patch_embedding.weight",), "conv"),
        Rule(f"{v}/embeddings/patch_embedding/bias", (f"{e}.patch_embedding.bias",)),
        Rule(f"{v}/embeddings/class_embedding", (f"{e}.class_embedding",), "reshape"),
        Rule(f"{v}/embeddings/position_embedding", (f"{e}.position_embedding",), "reshape"),
        Rule(f"{v}/layers/attn/qkv/kernel", (f"{l}.attn.qkv.weight",), "linear", True),
        Rule(f"{v}/layers/attn/proj/kernel", (f"{l}.attn.proj.weight",), "linear", True),
        Rule(f"{v}/layers/attn/proj/bias", (f"{l}.attn.proj.bias",), "copy", True),
        Rule(f"{v}/layers/ls1", (f"{l}.ls1",), "copy", True),
        Rule(f"{v}/layers/ls2", (f"{l}.ls2",), "copy", True),
        Rule(f"{v}/layers/mlp/fc1/kernel", (f"{l}.mlp.fc1.weight",), "linear", True),
        Rule(f"{v}/layers/mlp/fc1/bias", (f"{l}.mlp.fc1.bias",), "copy", True),
        Rule(f"{v}/layers/mlp/fc2/kernel", (f"{l}.mlp.fc2.weight",), "linear", True),
        Rule(f"{v}/layers/mlp/fc2/bias", (f"{l}.mlp.fc2.bias",), "copy", True),
        Rule(f"{v}/layers/norm1/scale", (f"{l}.norm1.weight",), "copy", True),
        Rule(f"{v}/layers/norm2/scale", (f"{l}.norm2.weight",), "copy", True),
    ]
    if cfg.vision.qkv_bias:
        rules.append(Rule(f"{v}/layers/attn/qkv/bias", (f"{l}.attn.qkv.bias",), "copy", True))
    if cfg.vision.norm_type == "layer_norm":
        rules += [Rule(f"{v}/layers/norm1/bias", (f"{l}.norm1.bias",), "copy", True),
                  Rule(f"{v}/layers/norm2/bias", (f"{l}.norm2.bias",), "copy", True)]
    if cfg.vision.qk_norm:
        rules += [Rule(f"{v}/layers/attn/q_norm/scale", (f"{l}.attn.q_norm.weight",), "copy", True),
                  Rule(f"{v}/layers/attn/k_norm/scale", (f"{l}.attn.k_norm.weight",), "copy", True)]
    return rules


def _projector_rules(ln: str, l1: str, l2: str) -> list[Rule]:
    p = "multi_modal_projector"
    return [
        Rule(f"{p}/layer_norm/scale", (f"{ln}.weight",)),
        Rule(f"{p}/layer_norm/bias", (f"{ln}.bias",)),
        Rule(f"{p}/linear_1/kernel", (f"{l1}.weight",), "linear"),
        Rule(f"{p}/linear_1/bias", (f"{l1}.bias",)),
        Rule(f"{p}/linear_2/kernel", (f"{l2}.weight",), "linear"),
        Rule(f"{p}/linear_2/bias", (f"{l2}.bias",)),
    ]


def _lm_rules(cfg: InternVLConfig, prefix: str, lm_head: str) -> list[Rule]:
    l, t = f"{prefix}.layers.{{i}}", "language_model"
    rules = [
        Rule(f"{t}/embed_tokens", (f"{prefix}.embed_tokens.weight",)),
        Rule(f"{t}/norm/scale", (f"{prefix}.norm.weight",)),
        Rule(f"{t}/layers/input_layernorm/scale", (f"{l}.input_layernorm.weight",), "copy", True),
        Rule(f"{t}/layers/post_attention_layernorm/scale", (f"{l}.post_attention_layernorm.weight",), "copy", True),
        Rule(f"{t}/layers/self_attn/o_proj/kernel", (f"{l}.self_attn.o_proj.weight",), "linear", True),
    ]
    for p in "qkv":
        rules += [Rule(f"{t}/layers/self_attn/{p}_proj/kernel", (f"{l}.self_attn.{p}_proj.weight",), "linear", True),
                  Rule(f"{t}/layers/self_attn/{p}_proj/bias", (f"{l}.self_attn.{p}_proj.bias",), "copy", True)]
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"{t}/layers/mlp/{p}/kernel", (f"{l}.mlp.{p}.weight",), "linear", True))
    if not cfg.text.tie_word_embeddings:
        rules.append(Rule("lm_head/kernel", (lm_head,), "linear"))
    return rules


def mapping_rules(cfg: InternVLConfig, layout: str) -> list[Rule]:
    """The mapping table for `layout` in ('transformers', 'opengvlab') (legacy names are renamed first)."""
    if layout == "transformers":
        return (_vision_rules_transformers(cfg)
                + _projector_rules("model.multi_modal_projector.layer_norm", "model.multi_modal_projector.linear_1",
                                   "model.multi_modal_projector.linear_2")
                + _lm_rules(cfg, "model.language_model", "lm_head.weight"))
    if layout == "opengvlab":
        return (_vision_rules_opengvlab(cfg) + _projector_rules("mlp1.0", "mlp1.1", "mlp1.3")
                + _lm_rules(cfg, "language_model.model", "language_model.lm_head.weight"))
    raise ValueError(f"layout must be 'transformers' or 'opengvlab', got {layout!r}")


# transformers' older on-disk names (save_pretrained in 5.x still writes them) -> in-memory names.
LEGACY_PREFIXES = (
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def _native_name(name: str) -> str:
    for old, new in LEGACY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _legacy_name(name: str) -> str:
    for old, new in LEGACY_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def hf_shapes(rule: Rule, flax_shape: tuple[int, ...], cfg: InternVLConfig) -> list[tuple[int, ...]]:
    """The checkpoint shape(s) a rule expects, from the Flax (per-layer) shape."""
    if rule.kind == "linear":
        return [flax_shape[::-1]]
    if rule.kind == "copy":
        return [flax_shape]
    if rule.kind == "reshape":
        return [(1, 1, *flax_shape)] if len(flax_shape) == 1 else [(1, *flax_shape)]
    if rule.kind == "conv":
        p, c = cfg.vision.patch_size, cfg.vision.num_channels
        return [(flax_shape[1], c, p, p)]
    if rule.kind == "qkv_w":
        return [(flax_shape[1] // 3, flax_shape[0])] * 3
    if rule.kind == "qkv_b":
        return [(flax_shape[0] // 3,)] * 3
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def to_flax(rule: Rule, tensors: list[np.ndarray], flax_shape: tuple[int, ...]) -> np.ndarray:
    """Apply a rule's transform to its source tensor(s)."""
    if rule.kind == "linear":
        return tensors[0].T
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "reshape":
        return tensors[0].reshape(flax_shape)
    if rule.kind == "conv":
        w = tensors[0]  # [D, C, p, p]
        return w.transpose(2, 3, 1, 0).reshape(flax_shape)
    if rule.kind == "qkv_w":
        return np.concatenate(tensors, axis=0).T
    if rule.kind == "qkv_b":
        return np.concatenate(tensors, axis=0)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def from_flax(rule: Rule, value: np.ndarray, cfg: InternVLConfig) -> list[np.ndarray]:
    """Inverse of `to_flax` (one layer): Flax value -> checkpoint tensors. Used to write checkpoints."""
    shapes = hf_shapes(rule, value.shape, cfg)
    if rule.kind == "linear":
        return [value.T]
    if rule.kind in ("copy", "reshape"):
        return [value.reshape(shapes[0])]
    if rule.kind == "conv":
        d, c, p, _ = shapes[0]
        return [value.reshape(p, p, c, d).transpose(3, 2, 0, 1)]
    if rule.kind == "qkv_w":
        return list(np.split(value.T, 3, axis=0))
    if rule.kind == "qkv_b":
        return list(np.split(value, 3, axis=0))
    raise ValueError(f"unknown rule kind {rule.kind!r}")


# ---- config / layout / image token ----------------------------------------------------------------------------

def read_config(directory: str) -> tuple[dict, InternVLConfig, str]:
    """-> (raw config.json, InternVLConfig, layout)."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{directory}: no config.json")
    with open(path) as f:
        raw = json.load(f)
    cfg = InternVLConfig.from_hf_dict(raw)
    layout = "opengvlab" if raw.get("model_type") == "internvl_chat" else "transformers"
    return raw, cfg, layout


IMG_CONTEXT = "<IMG_CONTEXT>"


def tokenizer_token_id(directory: str, token: str = IMG_CONTEXT) -> int | None:
    """The id of `token` from the tokenizer files in `directory` (no network, no tokenizer build)."""
    path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(path):
        with open(path) as f:
            tok = json.load(f)
        for added in tok.get("added_tokens", []):
            if added.get("content") == token:
                return int(added["id"])
        vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    path = os.path.join(directory, "added_tokens.json")
    if os.path.exists(path):
        with open(path) as f:
            added = json.load(f)
        if token in added:
            return int(added[token])
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path) as f:
            decoder = json.load(f).get("added_tokens_decoder", {})
        for idx, entry in decoder.items():
            if entry.get("content") == token:
                return int(idx)
    path = os.path.join(directory, "vocab.json")
    if os.path.exists(path):
        with open(path) as f:
            vocab = json.load(f)
        if token in vocab:
            return int(vocab[token])
    return None


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
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                walk(v, path)
            else:
                flat[path] = v

    walk(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "")
    return flat


def plan(cfg: InternVLConfig, layout: str, ckpt_shapes: dict[str, tuple[int, ...]],
         flax_shapes: dict[str, tuple[int, ...]],
         display: Callable[[str], str] = lambda n: n) -> list[tuple[Rule, list[list[str]]]]:
    """Match the table against the checkpoint; raise CheckpointMismatchError listing every problem.

    `display` turns a table name into the name the user's file uses (legacy transformers names).
    """
    rules = mapping_rules(cfg, layout)
    missing, mismatched, used, out = [], [], set(), []
    uncovered = set(flax_shapes) - {r.flax for r in rules}
    for rule in rules:
        shape = flax_shapes[rule.flax]
        layer_count = shape[0] if rule.per_layer else 1
        per_shape = shape[1:] if rule.per_layer else shape
        expected = hf_shapes(rule, tuple(per_shape), cfg)
        names_per_layer = []
        for i in range(layer_count):
            names = [s.format(i=i) for s in rule.sources]
            for name, want in zip(names, expected):
                if name not in ckpt_shapes:
                    missing.append(f"{display(name)} (expected {want})")
                else:
                    used.add(name)
                    if tuple(ckpt_shapes[name]) != tuple(want):
                        mismatched.append(f"{display(name)}: checkpoint {tuple(ckpt_shapes[name])}, "
                                          f"model expects {want}")
            names_per_layer.append(names)
        out.append((rule, names_per_layer))
    unexpected = sorted(display(n) for n in set(ckpt_shapes) - used)
    if uncovered:  # a bug in the table, not in the checkpoint
        raise RuntimeError(f"mapping table does not cover model parameters: {sorted(uncovered)}")
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not match the model ({layout} layout):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {x}" for x in items]
        raise CheckpointMismatchError("\n".join(lines))
    return out


def load_flax_params(directory: str, cfg: InternVLConfig, layout: str, param_dtype, progress=None) -> dict:
    """-> {flax path: np.ndarray in param_dtype} from a checkpoint directory, after the strict check."""
    ckpt = SafetensorsCheckpoint(directory)
    return flax_params_from(ckpt.shapes(), ckpt.get, cfg, layout, param_dtype, progress)


def flax_params_from(shapes: dict[str, tuple[int, ...]], get: Callable[[str], np.ndarray], cfg: InternVLConfig,
                     layout: str, param_dtype, progress=None) -> dict:
    """Map checkpoint tensors (names -> shapes, and a getter) to {flax path: np.ndarray in param_dtype}.

    Works for files and for in-memory state dicts (e.g. a PyTorch model's, converted to numpy by `get`).
    """
    display = lambda name: name  # noqa: E731
    if layout == "transformers":
        back = {_native_name(k): k for k in shapes}
        legacy = any(k != v for k, v in back.items())
        shapes = {_native_name(k): v for k, v in shapes.items()}
        get_native = lambda name: get(back[name])  # noqa: E731
        if legacy:  # report names as the file spells them
            display = lambda name: back.get(name, _legacy_name(name))  # noqa: E731
    else:
        get_native = get
    abstract = nnx.eval_shape(lambda: InternVL(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    flax_abs = flat_params(abstract)
    steps = plan(cfg, layout, shapes, {k: tuple(v.shape) for k, v in flax_abs.items()}, display)
    np_dtype = np.dtype(param_dtype)
    out = {}
    for rule, names_per_layer in steps:
        shape = tuple(flax_abs[rule.flax].shape)
        per_shape = shape[1:] if rule.per_layer else shape
        vals = [to_flax(rule, [np.asarray(get_native(n)) for n in names], per_shape).astype(np_dtype)
                for names in names_per_layer]
        out[rule.flax] = np.stack(vals) if rule.per_layer else vals[0]
        if progress is not None:
            progress(rule.flax)
    return out


def build_model(cfg: InternVLConfig, flat_params: dict, *, dtype, param_dtype) -> InternVL:
    """An InternVL whose parameters are `flat_params` ({'a/b/c': array}); no random init is run."""
    abstract = nnx.eval_shape(lambda: InternVL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)

    def fill(d, prefix):
        for k, v in d.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                fill(v, path)
            else:
                d[k] = jnp.asarray(flat_params[path], dtype=param_dtype)

    fill(pure, "")
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)


def load_hf(directory: str, *, image_token_id: int | None = None, dtype="float32",
            progress=None) -> tuple[InternVL, InternVLConfig]:
    """Read config + safetensors from `directory` -> (InternVL with params and compute in `dtype`, config)."""
    raw, cfg, layout = read_config(directory)
    cfg = cfg.replace(image_token_id=resolve_image_token_id(directory, cfg, layout, image_token_id))
    ckpt = SafetensorsCheckpoint(directory)
    cfg = untie_if_lm_head_present(cfg, layout, ckpt.shapes())
    jdtype = jnp.dtype(dtype)
    flat = flax_params_from(ckpt.shapes(), ckpt.get, cfg, layout, jdtype, progress)
    return build_model(cfg, flat, dtype=jdtype, param_dtype=jdtype), cfg


def untie_if_lm_head_present(cfg: InternVLConfig, layout: str, shapes: dict) -> InternVLConfig:
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
            dtype="float32") -> None:
    """Write `module` as a Hugging Face checkpoint (config.json + model.safetensors) in `layout`.

    The transformers layout uses the in-memory names (`model.*`, `lm_head.weight`), which transformers loads.
    """
    from safetensors.numpy import save_file

    if layout == "opengvlab" and cfg.text.tie_word_embeddings:
        raise ValueError("the OpenGVLab layout has no tied-embedding variant")
    os.makedirs(directory, exist_ok=True)
    flat = {path: np.asarray(jnp.asarray(v, jnp.float32)) for path, v in flat_params(module).items()}
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = {}
    for rule in mapping_rules(cfg, layout):
        value = flat[rule.flax]
        layer_values = list(value) if rule.per_layer else [value]
        for i, lv in enumerate(layer_values):
            for name, arr in zip(rule.sources, from_flax(rule, lv, cfg)):
                tensors[name.format(i=i)] = np.ascontiguousarray(arr.astype(np_dtype))
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_config_dict(cfg, layout), f, indent=2)
