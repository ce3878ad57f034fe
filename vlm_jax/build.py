"""Building the model from `config.model` and `config.tasks` alone: the one-way start of every run.

    config.model --resolve_backbone--> Backbone(InternVLConfig, tokenizer) --build_model--> MultitaskModel
                                            |
                                            +--> the data side derives tile size, image tokens per tile and the
                                                 tokenizer from it (`ModelInputs` of the input pipeline)

`config.model` fields:
  backbone        "tiny": random InternVL of `InternVLConfig.tiny(**model.tiny)`, its vocabulary sized to the
                  tokenizer; "converted": the config stored in `converted_dir` (weights are loaded from there when a
                  run starts from scratch)
  converted_dir   a directory written by `python -m vlm_jax.convert`
  tokenizer       "demo" (the demo BPE), a directory with tokenizer files, or "" = the converted checkpoint's own
  tiny            overrides of InternVLConfig.tiny()
  dtype, backbone_param_dtype   backbone compute and storage dtypes (shared layers and heads stay float32)
  embedding       the shared adapters / projectors / fusion (`vlm_jax.multitask`)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from vlm_jax import tokenizer as tokenizer_lib
from vlm_jax.checkpoints import converted
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL
from vlm_jax.multitask import MultitaskModel

BACKBONES = ("tiny", "converted")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The backbone's architecture and the tokenizer its vocabulary belongs to."""

    config: InternVLConfig
    tokenizer: object


def resolve_backbone(model_cfg) -> Backbone:
    """Backbone config and tokenizer for `config.model` (reads files, never parameters)."""
    if model_cfg.backbone not in BACKBONES:
        raise ValueError(f"config.model.backbone={model_cfg.backbone!r}: expected one of {BACKBONES}.")
    if model_cfg.backbone == "converted":
        path = model_cfg.converted_dir
        if not path or not converted.is_converted(path):
            raise ValueError(f"config.model.backbone='converted' needs config.model.converted_dir: a directory "
                             f"written by `python -m vlm_jax.convert`, got {path!r}.")
        tok = tokenizer_lib.make_tokenizer(model_cfg.tokenizer or path)
        return Backbone(converted.read_config(path), tok)
    if not model_cfg.tokenizer:
        raise ValueError("config.model.tokenizer is empty: a tiny backbone needs 'demo' or a tokenizer directory.")
    tok = tokenizer_lib.make_tokenizer(model_cfg.tokenizer)
    cfg = InternVLConfig.tiny(**model_cfg.tiny.to_dict(), vocab_size=len(tok),
                              image_token_id=tok.convert_tokens_to_ids(tokenizer_lib.IMG_CONTEXT))
    return Backbone(cfg, tok)


def build_model(backbone_config: InternVLConfig, model_cfg, task_cfgs, rngs: nnx.Rngs) -> MultitaskModel:
    """Backbone + shared embedding layers + the tasks named in `config.tasks`, randomly initialised."""
    backbone = InternVL(backbone_config, dtype=jnp.dtype(model_cfg.dtype),
                        param_dtype=jnp.dtype(model_cfg.backbone_param_dtype), rngs=rngs)
    return MultitaskModel(backbone, model_cfg.embedding, task_cfgs, rngs=rngs)
