"""The one name-mapping table between the Flax parameters and the Hugging Face InternVL checkpoints.

One row per Flax parameter, one column per on-disk layout:
- transformers (native names): `model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
  `lm_head.weight`, with the vision q/k/v split;
- opengvlab (`internvl_chat`): `vision_model.*` with a fused `attn.qkv`, `ls1/ls2`, `mlp1.{0,1,3}`,
  `language_model.model.*`, `language_model.lm_head.weight`.
transformers' older on-disk names (`vision_tower.*`, `language_model.model.*`, what `save_pretrained` writes) are
renamed to the native ones before the table is used (`native_name` / `legacy_name`).

The table is read both ways: `to_flax` when loading, `from_flax` when writing. `{i}` in a name is the layer index
(those Flax parameters are stacked over layers, float[L, ...]). Several names in one cell are concatenated along
the torch output axis (transformers' separate q/k/v -> the fused qkv).

Kinds (torch tensor -> Flax parameter):
  linear   Linear weight [out, in] -> kernel [in, out]
  copy     same shape
  reshape  same data, other shape (cls [1, 1, D] -> [D], position [1, P + 1, D] -> [P + 1, D])
  conv     Conv2d weight OIHW [D, C, p, p] -> patchify kernel [(p, p, C), D]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from vlm_jax.models.config import InternVLConfig


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


LAYOUTS = ("transformers", "opengvlab")


@dataclasses.dataclass(frozen=True)
class Row:
    flax: str  # path in the nnx state, '/'-joined
    transformers: str | tuple[str, ...]  # native transformers name(s), after PREFIXES[module][0]
    opengvlab: str | tuple[str, ...]  # InternVLChatModel name(s), after PREFIXES[module][1]
    kind: str = "copy"
    when: str = ""  # a key of CONDITIONS: the row exists only for such configs

    @property
    def per_layer(self) -> bool:
        """Stacked over layers: float[L, ...] in Flax, one tensor per layer (`{i}`) in the checkpoint."""
        return "/layers/" in self.flax

    def names(self, layout: str) -> tuple[str, ...]:
        """The full checkpoint name(s) in `layout` (still holding `{i}` for per-layer rows)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        cell = getattr(self, layout)
        prefix = PREFIXES[self.flax.split("/", 1)[0]][LAYOUTS.index(layout)]
        return tuple(prefix + n for n in ((cell,) if isinstance(cell, str) else cell))


# Flax top-level module -> name prefix per layout (transformers, opengvlab).
PREFIXES = {
    "vision_tower": ("model.vision_tower.", "vision_model."),
    "multi_modal_projector": ("model.multi_modal_projector.", "mlp1."),
    "language_model": ("model.language_model.", "language_model.model."),
    "lm_head": ("", "language_model."),
}

CONDITIONS = {
    "qkv_bias": lambda c: c.vision.qkv_bias,
    "layer_norm": lambda c: c.vision.norm_type == "layer_norm",
    "qk_norm": lambda c: c.vision.qk_norm,
    "untied": lambda c: not c.text.tie_word_embeddings,
}

_V, _T, _O = "vision_tower/layers", "encoder.layer.{i}.", "encoder.layers.{i}."  # vision layers: Flax, HF, OGV
_LM, _L = "language_model/layers", "layers.{i}."

TABLE = (
    # Row(flax path, transformers name(s), opengvlab name(s), kind, when)
    Row("vision_tower/embeddings/patch_embedding/kernel", "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embedding.weight", "conv"),
    Row("vision_tower/embeddings/patch_embedding/bias", "embeddings.patch_embeddings.projection.bias",
        "embeddings.patch_embedding.bias"),
    Row("vision_tower/embeddings/class_embedding", "embeddings.cls_token", "embeddings.class_embedding", "reshape"),
    Row("vision_tower/embeddings/position_embedding", "embeddings.position_embeddings",
        "embeddings.position_embedding", "reshape"),
    Row(f"{_V}/attn/qkv/kernel", tuple(f"{_T}attention.{p}_proj.weight" for p in "qkv"), f"{_O}attn.qkv.weight",
        "linear"),
    Row(f"{_V}/attn/qkv/bias", tuple(f"{_T}attention.{p}_proj.bias" for p in "qkv"), f"{_O}attn.qkv.bias",
        when="qkv_bias"),
    Row(f"{_V}/attn/proj/kernel", f"{_T}attention.projection_layer.weight", f"{_O}attn.proj.weight", "linear"),
    Row(f"{_V}/attn/proj/bias", f"{_T}attention.projection_layer.bias", f"{_O}attn.proj.bias"),
    Row(f"{_V}/attn/q_norm/scale", f"{_T}attention.q_norm.weight", f"{_O}attn.q_norm.weight", when="qk_norm"),
    Row(f"{_V}/attn/k_norm/scale", f"{_T}attention.k_norm.weight", f"{_O}attn.k_norm.weight", when="qk_norm"),
    Row(f"{_V}/ls1", f"{_T}lambda_1", f"{_O}ls1"),
    Row(f"{_V}/ls2", f"{_T}lambda_2", f"{_O}ls2"),
    Row(f"{_V}/mlp/fc1/kernel", f"{_T}mlp.fc1.weight", f"{_O}mlp.fc1.weight", "linear"),
    Row(f"{_V}/mlp/fc1/bias", f"{_T}mlp.fc1.bias", f"{_O}mlp.fc1.bias"),
    Row(f"{_V}/mlp/fc2/kernel", f"{_T}mlp.fc2.weight", f"{_O}mlp.fc2.weight", "linear"),
    Row(f"{_V}/mlp/fc2/bias", f"{_T}mlp.fc2.bias", f"{_O}mlp.fc2.bias"),
    Row(f"{_V}/norm1/scale", f"{_T}layernorm_before.weight", f"{_O}norm1.weight"),
    Row(f"{_V}/norm1/bias", f"{_T}layernorm_before.bias", f"{_O}norm1.bias", when="layer_norm"),
    Row(f"{_V}/norm2/scale", f"{_T}layernorm_after.weight", f"{_O}norm2.weight"),
    Row(f"{_V}/norm2/bias", f"{_T}layernorm_after.bias", f"{_O}norm2.bias", when="layer_norm"),
    Row("multi_modal_projector/layer_norm/scale", "layer_norm.weight", "0.weight"),
    Row("multi_modal_projector/layer_norm/bias", "layer_norm.bias", "0.bias"),
    Row("multi_modal_projector/linear_1/kernel", "linear_1.weight", "1.weight", "linear"),
    Row("multi_modal_projector/linear_1/bias", "linear_1.bias", "1.bias"),
    Row("multi_modal_projector/linear_2/kernel", "linear_2.weight", "3.weight", "linear"),
    Row("multi_modal_projector/linear_2/bias", "linear_2.bias", "3.bias"),
    Row("language_model/embed_tokens", "embed_tokens.weight", "embed_tokens.weight"),
    Row("language_model/norm/scale", "norm.weight", "norm.weight"),
    Row(f"{_LM}/input_layernorm/scale", f"{_L}input_layernorm.weight", f"{_L}input_layernorm.weight"),
    Row(f"{_LM}/post_attention_layernorm/scale", f"{_L}post_attention_layernorm.weight",
        f"{_L}post_attention_layernorm.weight"),
    *(Row(f"{_LM}/self_attn/{p}_proj/{leaf}", f"{_L}self_attn.{p}_proj.{w}", f"{_L}self_attn.{p}_proj.{w}", kind)
      for p in "qkv" for leaf, w, kind in (("kernel", "weight", "linear"), ("bias", "bias", "copy"))),
    Row(f"{_LM}/self_attn/o_proj/kernel", f"{_L}self_attn.o_proj.weight", f"{_L}self_attn.o_proj.weight", "linear"),
    *(Row(f"{_LM}/mlp/{p}/kernel", f"{_L}mlp.{p}.weight", f"{_L}mlp.{p}.weight", "linear")
      for p in ("gate_proj", "up_proj", "down_proj")),
    Row("lm_head/kernel", "lm_head.weight", "lm_head.weight", "linear", when="untied"),
)


def rows(cfg: InternVLConfig) -> list[Row]:
    """The rows that exist for `cfg` (optional biases, norms and the untied lm_head)."""
    return [r for r in TABLE if not r.when or CONDITIONS[r.when](cfg)]


def match(cfg: InternVLConfig, layout: str, ckpt_shapes: dict[str, tuple[int, ...]],
          flax_shapes: dict[str, tuple[int, ...]],
          display: Callable[[str], str] = lambda n: n) -> list[tuple[Row, list[tuple[str, ...]]]]:
    """Match the table against a checkpoint's shapes -> [(row, checkpoint names per layer)].

    Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped tensor at once.
    `display` turns a table name into the name the user's file uses (transformers' legacy names).
    """
    table = rows(cfg)
    uncovered = set(flax_shapes) - {r.flax for r in table}
    if uncovered:  # a bug in the table, not in the checkpoint
        raise RuntimeError(f"mapping table does not cover model parameters: {sorted(uncovered)}")
    missing, mismatched, used, out = [], [], set(), []
    for row in table:
        shape = flax_shapes[row.flax]
        layer_count, per_shape = (shape[0], shape[1:]) if row.per_layer else (1, shape)
        sources = row.names(layout)
        expected = checkpoint_shapes(row, tuple(per_shape), cfg, len(sources))
        names_per_layer = []
        for i in range(layer_count):
            names = tuple(s.format(i=i) for s in sources)
            for name, want in zip(names, expected):
                if name not in ckpt_shapes:
                    missing.append(f"{display(name)} (expected {want})")
                    continue
                used.add(name)
                if tuple(ckpt_shapes[name]) != want:
                    mismatched.append(f"{display(name)}: checkpoint {tuple(ckpt_shapes[name])}, model expects {want}")
            names_per_layer.append(names)
        out.append((row, names_per_layer))
    unexpected = sorted(display(n) for n in set(ckpt_shapes) - used)
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not match the model ({layout} layout):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines += [f"  {len(items)} {title}:", *(f"    {x}" for x in items)]
        raise CheckpointMismatchError("\n".join(lines))
    return out


# transformers' older on-disk names (save_pretrained in 5.x still writes them) -> the native names.
LEGACY_PREFIXES = (
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def native_name(name: str) -> str:
    for old, new in LEGACY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def legacy_name(name: str) -> str:
    for old, new in LEGACY_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


# ---- the kinds, both ways ----------------------------------------------------------------------------------------

def checkpoint_shapes(row: Row, flax_shape: tuple[int, ...], cfg: InternVLConfig,
                      parts: int = 1) -> list[tuple[int, ...]]:
    """The shape of each of the `parts` checkpoint tensors that make one (per-layer) Flax value of `flax_shape`."""
    if row.kind == "linear":  # kernel [in, out] <- `parts` weights [out / parts, in]
        return [(flax_shape[1] // parts, flax_shape[0])] * parts
    if row.kind == "copy":
        return [(flax_shape[0] // parts, *flax_shape[1:])] * parts
    if row.kind == "reshape":
        return [(1, 1, *flax_shape)] if len(flax_shape) == 1 else [(1, *flax_shape)]
    if row.kind == "conv":
        p, c = cfg.vision.patch_size, cfg.vision.num_channels
        return [(flax_shape[1], c, p, p)]
    raise ValueError(f"unknown row kind {row.kind!r}")


def to_flax(row: Row, tensors: list[np.ndarray], flax_shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint tensor(s) -> one (per-layer) Flax value of `flax_shape`."""
    x = np.concatenate(tensors, axis=0) if len(tensors) > 1 else tensors[0]
    if row.kind == "linear":
        return x.T
    if row.kind == "copy":
        return x
    if row.kind == "reshape":
        return x.reshape(flax_shape)
    if row.kind == "conv":  # [D, C, p, p] -> [(p, p, C), D]
        return x.transpose(2, 3, 1, 0).reshape(flax_shape)
    raise ValueError(f"unknown row kind {row.kind!r}")


def from_flax(row: Row, value: np.ndarray, cfg: InternVLConfig, parts: int = 1) -> list[np.ndarray]:
    """Inverse of `to_flax`: one (per-layer) Flax value -> its `parts` checkpoint tensors."""
    shapes = checkpoint_shapes(row, value.shape, cfg, parts)
    if row.kind == "linear":
        return np.split(value.T, parts, axis=0)
    if row.kind == "copy":
        return np.split(value, parts, axis=0)
    if row.kind == "reshape":
        return [value.reshape(shapes[0])]
    if row.kind == "conv":
        d, c, p, _ = shapes[0]
        return [value.reshape(p, p, c, d).transpose(3, 2, 0, 1)]
    raise ValueError(f"unknown row kind {row.kind!r}")
