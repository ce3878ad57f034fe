"""Model configuration: frozen dataclasses for InternViT, Qwen2 and the InternVL glue.

`InternVLConfig.from_hf_dict` reads both checkpoint layouts:
- transformers (`model_type: internvl`, `vision_config` + `text_config`),
- OpenGVLab original (`model_type: internvl_chat`, `vision_config` + `llm_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _pair_to_int(value: Any, name: str) -> int:
    """HF stores sizes as int or [h, w]; the port supports square sizes only."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be square, got {value!r}")
        return int(value[0])
    return int(value)


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
    def from_dict(cls, d: dict) -> "InternVLConfig":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision"))
        text = TextConfig(**d.pop("text"))
        return cls(vision=vision, text=text, **d)

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
    def from_hf_dict(cls, d: dict) -> "InternVLConfig":
        """Build from a checkpoint's config.json (transformers `internvl` or OpenGVLab `internvl_chat`)."""
        model_type = d.get("model_type")
        if model_type == "internvl":
            return cls._from_transformers(d)
        if model_type == "internvl_chat":
            return cls._from_opengvlab(d)
        raise ValueError(f"config.json: model_type must be 'internvl' or 'internvl_chat', got {model_type!r}")

    @classmethod
    def _from_transformers(cls, d: dict) -> "InternVLConfig":
        v = d.get("vision_config") or {}
        t = d.get("text_config") or {}
        if v.get("use_mean_pooling", True) is False:
            raise ValueError("vision_config.use_mean_pooling=False (a final vision LayerNorm) is not supported")
        if v.get("use_absolute_position_embeddings", True) is False:
            raise ValueError("vision_config.use_absolute_position_embeddings=False is not supported")
        if d.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError("only vision_feature_select_strategy='default' (drop CLS) is supported")
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"projector_hidden_act must be 'gelu', got {d.get('projector_hidden_act')!r}")
        vision = VisionConfig(
                hidden_size=v.get("hidden_size", 1024),
                num_layers=v.get("num_hidden_layers", 24),
                num_heads=v.get("num_attention_heads", 16),
                intermediate_size=v.get("intermediate_size", 4096),
                image_size=_pair_to_int(v.get("image_size", 448), "vision_config.image_size"),
                patch_size=_pair_to_int(v.get("patch_size", 14), "vision_config.patch_size"),
                num_channels=v.get("num_channels", 3),
                qkv_bias=v.get("attention_bias", False),
                qk_norm=v.get("use_qk_norm", False),
                norm_type=v.get("norm_type", "layer_norm"),
                layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        )
        _check_act(v.get("hidden_act", "gelu"), "gelu", "vision_config.hidden_act")
        # transformers v5 ties by the top-level flag (default True); older files only had text_config's.
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", True))
        feature_layer = d.get("vision_feature_layer", -1)
        return cls(
                vision=vision,
                text=_text_from_qwen2(t, tie),
                downsample_ratio=d.get("downsample_ratio", 0.5),
                image_token_id=d.get("image_token_id"),
                select_layer=feature_layer,
        )

    @classmethod
    def _from_opengvlab(cls, d: dict) -> "InternVLConfig":
        v = d.get("vision_config") or {}
        t = d.get("llm_config") or {}
        image_size = d.get("force_image_size") or v.get("image_size", 448)
        vision = VisionConfig(
                hidden_size=v.get("hidden_size", 1024),
                num_layers=v.get("num_hidden_layers", 24),
                num_heads=v.get("num_attention_heads", 16),
                intermediate_size=v.get("intermediate_size", 4096),
                image_size=_pair_to_int(image_size, "force_image_size"),
                patch_size=_pair_to_int(v.get("patch_size", 14), "vision_config.patch_size"),
                num_channels=v.get("num_channels", 3),
                qkv_bias=v.get("qkv_bias", True),
                qk_norm=v.get("qk_normalization", False),
                norm_type=v.get("norm_type", "layer_norm"),
                layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        )
        _check_act(v.get("hidden_act", "gelu"), "gelu", "vision_config.hidden_act")
        llm_arch = (t.get("architectures") or ["Qwen2ForCausalLM"])[0]
        if llm_arch != "Qwen2ForCausalLM":
            raise ValueError(f"llm_config.architectures: only Qwen2ForCausalLM is supported, got {llm_arch!r}")
        # InternVLChatConfig forces tie_word_embeddings=False for every size.
        tie = d.get("tie_word_embeddings", False)
        return cls(
                vision=vision,
                text=_text_from_qwen2(t, tie),
                downsample_ratio=d.get("downsample_ratio", 0.5),
                image_token_id=d.get("image_token_id"),
                select_layer=d.get("select_layer", -1),
                ps_version=d.get("ps_version", "v2"),
        )


def _check_act(value: str, expected: str, name: str) -> None:
    if value != expected:
        raise ValueError(f"{name} must be {expected!r}, got {value!r}")


def _text_from_qwen2(t: dict, tie: bool) -> TextConfig:
    """Qwen2Config dict (v4 `rope_theta` or v5 `rope_parameters`) -> TextConfig."""
    rope = t.get("rope_parameters") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 1_000_000.0))
    scaling = t.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "dynamic"):
        # Dynamic NTK only changes anything beyond max_position_embeddings; others are not implemented.
        raise ValueError(f"rope type {rope_type!r} is not supported (default or dynamic only)")
    if t.get("use_sliding_window", False):
        raise ValueError("Qwen2 sliding-window attention is not supported")
    _check_act(t.get("hidden_act", "silu"), "silu", "text hidden_act")
    hidden = t.get("hidden_size", 896)
    heads = t.get("num_attention_heads", 14)
    return TextConfig(
            vocab_size=t.get("vocab_size", 151674),
            hidden_size=hidden,
            intermediate_size=t.get("intermediate_size", 4864),
            num_layers=t.get("num_hidden_layers", 24),
            num_heads=heads,
            num_kv_heads=t.get("num_key_value_heads", heads),
            head_dim=t.get("head_dim") or hidden // heads,
            rope_theta=float(theta),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            max_position_embeddings=t.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(tie),
    )
