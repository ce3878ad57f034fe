"""Model configuration: frozen dataclasses for InternViT, Qwen2 and the InternVL glue.

`InternVLConfig.from_hf_dict` reads both checkpoint layouts:
- transformers (`model_type: internvl`, `vision_config` + `text_config`),
- OpenGVLab original (`model_type: internvl_chat`, `vision_config` + `llm_config`).

Reading a config file checks every field it uses: a wrong type, a missing size or an unknown field is a ValueError
naming the file, the field and what was expected (a malformed file never reaches the model code).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pair(v) -> bool:
    return (_is_int(v) and v > 0) or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v))


# kind -> (check, what the message says is expected). "pair": HF stores image / patch sizes as int or [h, w].
_KINDS = {
    "int": (_is_int, "an integer"),
    "positive": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "float": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer or null"),
    "pair": (_is_pair, "a positive integer or a list [h, w] of them"),
    "dict": (lambda v: isinstance(v, dict), "an object ({...})"),
}
_REQUIRED = object()


class _Section:
    """Typed reads from one object of a config file; errors name the file (`source`) and the dotted field."""

    def __init__(self, d: Any, source: str, prefix: str = ""):
        if not isinstance(d, dict):
            where = f"{prefix.rstrip('.')} " if prefix else ""
            raise ValueError(f"{source}: {where}must be an object ({{...}}), got {_show(d)}")
        self.d, self.source, self.prefix = d, source, prefix

    def get(self, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        """The value of `key` checked against `kind`; `default` when absent or null (required if none given)."""
        check, expected = _KINDS[kind]
        value = self.d.get(key)
        if value is None and kind != "int | None":
            if default is _REQUIRED:
                raise ValueError(f"{self.source}: required field {self.prefix}{key} is missing (expected {expected})")
            return default
        if not check(value):
            raise ValueError(f"{self.source}: {self.prefix}{key} must be {expected}, got {_show(value)}")
        if kind == "float":
            return float(value)
        if kind == "pair":
            return _pair_to_int(value, f"{self.source}: {self.prefix}{key}")
        return value

    def section(self, key: str, default: Any = _REQUIRED) -> "_Section":
        """The object under `key` (an empty one when absent and `default` is given)."""
        return _Section(self.get(key, "dict", default), self.source, f"{self.prefix}{key}.")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"


def _pair_to_int(value: Any, name: str) -> int:
    """HF stores sizes as int or [h, w]; the port supports square sizes only."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be square, got {value!r}")
        return int(value[0])
    return int(value)


def _dataclass_fields(cls, d: Any, source: str, prefix: str) -> dict:
    """`d`'s entries checked against the field types of dataclass `cls` (unknown fields refused; absent ones take
    their defaults)."""
    section = _Section(d, source, prefix)
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(kinds))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(prefix + k for k in unknown)} "
                         f"(known: {', '.join(sorted(kinds))})")
    return {k: section.get(k, kinds[k]) for k in d}


def _with_source(source: str, build):
    """`build()`, its ValueErrors (e.g. from a config's own checks) prefixed with `source` when they lack it."""
    try:
        return build()
    except ValueError as err:
        if str(err).startswith(source):
            raise
        raise ValueError(f"{source}: {err}") from None


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT encoder (defaults: InternViT-300M-448px-V2_5)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    qk_norm: bool = False  # RMSNorm over the full q/k width (InternViT-6B).
    norm_type: str = "layer_norm"  # or "rms_norm" (InternViT-6B).
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"norm_type must be 'layer_norm' or 'rms_norm', got {self.norm_type!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side at the checkpoint's image size."""
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder (defaults: the Qwen2.5-0.5B LM inside InternVL3-1B)."""

    vocab_size: int = 151674
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads.
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """The whole model. `image_token_id` is the id of `<IMG_CONTEXT>` (None until known)."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    downsample_ratio: float = 0.5
    image_token_id: int | None = None
    select_layer: int = -1
    ps_version: str = "v2"
    projector_ln_eps: float = 1e-5  # torch nn.LayerNorm default, not the ViT's 1e-6.

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", TextConfig(**self.text))
        if self.select_layer != -1:
            raise ValueError(f"only select_layer / vision_feature_layer -1 is supported, got {self.select_layer}")
        if self.ps_version != "v2":
            raise ValueError(f"only pixel-shuffle ps_version 'v2' is supported, got {self.ps_version!r}")
        scale = round(1 / self.downsample_ratio)
        if abs(scale * self.downsample_ratio - 1) > 1e-9:
            raise ValueError(f"downsample_ratio must be 1/k for an integer k, got {self.downsample_ratio}")
        if self.vision.grid_size % scale:
            raise ValueError(f"patch grid {self.vision.grid_size} not divisible by the pixel-shuffle factor {scale}")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def shuffle_factor(self) -> int:
        """Pixel shuffle merges shuffle_factor x shuffle_factor patches into one token."""
        return round(1 / self.downsample_ratio)

    @property
    def num_image_tokens(self) -> int:
        """LM tokens per image tile (256 for InternVL3 at 448px)."""
        return (self.vision.grid_size // self.shuffle_factor) ** 2

    def num_image_tokens_for(self, image_size: int) -> int:
        """LM tokens per tile for a (square) input size other than the checkpoint's."""
        return (image_size // self.vision.patch_size // self.shuffle_factor) ** 2

    # ---- serialisation -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "InternVLConfig":
        """Inverse of `to_dict`; every field is type-checked, errors name `source` (the file read) and the field."""
        top = _Section(d, source)
        vision = _dataclass_fields(VisionConfig, top.get("vision", "dict"), source, "vision.")
        text = _dataclass_fields(TextConfig, top.get("text", "dict"), source, "text.")
        rest = _dataclass_fields(cls, {k: v for k, v in d.items() if k not in ("vision", "text")}, source, "")
        return _with_source(source, lambda: cls(vision=VisionConfig(**vision), text=TextConfig(**text), **rest))

    def replace(self, **changes) -> "InternVLConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides) -> "InternVLConfig":
        """A tiny random-weight model for tests and demos (32px image, 4 tokens per tile).

        `overrides` may name fields of InternVLConfig, or of TextConfig / VisionConfig when unambiguous
        (`vocab_size=...`, `num_kv_heads=...`); `vision=`/`text=` take dicts of changes.
        """
        vision = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=32, patch_size=8)
        text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                rope_theta=10000.0)
        top = {}
        vision.update(overrides.pop("vision", {}) or {})
        text.update(overrides.pop("text", {}) or {})
        top_fields = {f.name for f in dataclasses.fields(cls)}
        text_fields = {f.name for f in dataclasses.fields(TextConfig)}
        vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
        for key, value in overrides.items():
            if key == "image_size":
                vision[key] = value
            elif key in top_fields:
                top[key] = value
            elif key in text_fields and key in vision_fields:
                raise ValueError(f"tiny(): {key!r} is ambiguous; pass it inside vision={{...}} or text={{...}}")
            elif key in text_fields:
                text[key] = value
            elif key in vision_fields:
                vision[key] = value
            else:
                raise ValueError(f"tiny(): unknown config field {key!r}")
        return cls(vision=VisionConfig(**vision), text=TextConfig(**text), **top)

    # ---- Hugging Face config.json ---------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "InternVLConfig":
        """Build from a checkpoint's config.json (transformers `internvl` or OpenGVLab `internvl_chat`).

        `source` (the file's path) starts every error message. The encoders' sizes (hidden_size,
        num_hidden_layers, num_attention_heads, intermediate_size; vocab_size) are required."""
        top = _Section(d, source)
        model_type = top.get("model_type", "str", None)
        if model_type == "internvl":
            return _with_source(source, lambda: cls._from_transformers(top))
        if model_type == "internvl_chat":
            return _with_source(source, lambda: cls._from_opengvlab(top))
        raise ValueError(f"{source}: model_type must be 'internvl' or 'internvl_chat', got {model_type!r}")

    @classmethod
    def _from_transformers(cls, top: "_Section") -> "InternVLConfig":
        v = top.section("vision_config")
        t = top.section("text_config")
        if v.get("use_mean_pooling", "bool", True) is False:
            raise ValueError("vision_config.use_mean_pooling=False (a final vision LayerNorm) is not supported")
        if v.get("use_absolute_position_embeddings", "bool", True) is False:
            raise ValueError("vision_config.use_absolute_position_embeddings=False is not supported")
        if top.get("vision_feature_select_strategy", "str", "default") != "default":
            raise ValueError("only vision_feature_select_strategy='default' (drop CLS) is supported")
        _check_act(top.get("projector_hidden_act", "str", "gelu"), "gelu", "projector_hidden_act")
        vision = VisionConfig(
                **_vision_sizes(v),
                image_size=v.get("image_size", "pair", 448),
                patch_size=v.get("patch_size", "pair", 14),
                qkv_bias=v.get("attention_bias", "bool", False),
                qk_norm=v.get("use_qk_norm", "bool", False),
        )
        # transformers v5 ties by the top-level flag (default True); older files only had text_config's.
        tie = top.get("tie_word_embeddings", "bool", t.get("tie_word_embeddings", "bool", True))
        return cls(
                vision=vision,
                text=_text_from_qwen2(t, tie),
                downsample_ratio=top.get("downsample_ratio", "float", 0.5),
                image_token_id=top.get("image_token_id", "int | None"),
                select_layer=top.get("vision_feature_layer", "int", -1),
        )

    @classmethod
    def _from_opengvlab(cls, top: "_Section") -> "InternVLConfig":
        v = top.section("vision_config")
        t = top.section("llm_config")
        if top.d.get("force_image_size") is not None:
            image_size = top.get("force_image_size", "pair")
        else:
            image_size = v.get("image_size", "pair", 448)
        vision = VisionConfig(
                **_vision_sizes(v),
                image_size=image_size,
                patch_size=v.get("patch_size", "pair", 14),
                qkv_bias=v.get("qkv_bias", "bool", True),
                qk_norm=v.get("qk_normalization", "bool", False),
        )
        architectures = t.d.get("architectures") or ["Qwen2ForCausalLM"]
        if not isinstance(architectures, list) or architectures[0] != "Qwen2ForCausalLM":
            raise ValueError(f"llm_config.architectures: only Qwen2ForCausalLM is supported, got {architectures!r}")
        # InternVLChatConfig forces tie_word_embeddings=False for every size.
        tie = top.get("tie_word_embeddings", "bool", False)
        return cls(
                vision=vision,
                text=_text_from_qwen2(t, tie),
                downsample_ratio=top.get("downsample_ratio", "float", 0.5),
                image_token_id=top.get("image_token_id", "int | None"),
                select_layer=top.get("select_layer", "int", -1),
                ps_version=top.get("ps_version", "str", "v2"),
        )


def _check_act(value: str, expected: str, name: str) -> None:
    if value != expected:
        raise ValueError(f"{name} must be {expected!r}, got {value!r}")


def _vision_sizes(v: _Section) -> dict:
    """The VisionConfig fields both layouts spell alike."""
    _check_act(v.get("hidden_act", "str", "gelu"), "gelu", "vision_config.hidden_act")
    return dict(
            hidden_size=v.get("hidden_size", "positive"),
            num_layers=v.get("num_hidden_layers", "positive"),
            num_heads=v.get("num_attention_heads", "positive"),
            intermediate_size=v.get("intermediate_size", "positive"),
            num_channels=v.get("num_channels", "positive", 3),
            norm_type=v.get("norm_type", "str", "layer_norm"),
            layer_norm_eps=v.get("layer_norm_eps", "float", 1e-6),
    )


def _text_from_qwen2(t: _Section, tie: bool) -> TextConfig:
    """Qwen2Config section (v4 `rope_theta` or v5 `rope_parameters`) -> TextConfig."""
    rope = t.section("rope_parameters", {})
    theta = rope.get("rope_theta", "float", t.get("rope_theta", "float", 1_000_000.0))
    scaling = t.section("rope_scaling", {}) if t.d.get("rope_scaling") is not None else rope
    rope_type = scaling.get("rope_type", "str", scaling.get("type", "str", "default"))
    if rope_type not in ("default", "dynamic"):
        # Dynamic NTK only changes anything beyond max_position_embeddings; others are not implemented.
        raise ValueError(f"rope type {rope_type!r} is not supported (default or dynamic only)")
    if t.get("use_sliding_window", "bool", False):
        raise ValueError("Qwen2 sliding-window attention is not supported")
    _check_act(t.get("hidden_act", "str", "silu"), "silu", f"{t.prefix}hidden_act")
    hidden = t.get("hidden_size", "positive")
    heads = t.get("num_attention_heads", "positive")
    return TextConfig(
            vocab_size=t.get("vocab_size", "positive"),
            hidden_size=hidden,
            intermediate_size=t.get("intermediate_size", "positive"),
            num_layers=t.get("num_hidden_layers", "positive"),
            num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads", "positive", heads),
            head_dim=t.get("head_dim", "int | None") or hidden // heads,
            rope_theta=theta,
            rms_norm_eps=t.get("rms_norm_eps", "float", 1e-6),
            max_position_embeddings=t.get("max_position_embeddings", "int", 32768),
            tie_word_embeddings=tie,
    )
