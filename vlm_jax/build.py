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
  dtype           the towers' compute dtype (norm statistics, softmax, logits, shared layers, heads: float32)
  frozen_param_dtype   storage dtype of the optimizer group 'frozen' (`store_params`); trained parameters are
                  float32 master copies whatever the compute dtype
  attention, remat   both towers' attention implementation and rematerialisation policy (`vlm_jax.models.layers`)
  embedding       the shared adapters / projectors / fusion (`vlm_jax.multitask`)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax import lora, optim
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


def build_model(backbone_config: InternVLConfig, model_cfg, task_cfgs, groups: optim.ParamGroups,
                rngs: nnx.Rngs, lora_cfg=None) -> MultitaskModel:
    """Backbone + shared embedding layers + the tasks named in `config.tasks`, randomly initialised, LoRA factors
    where `config.lora` asks for them, parameters stored per `store_params`, the towers' attention and remat set
    from `config.model`."""
    backbone = InternVL(backbone_config, dtype=jnp.dtype(model_cfg.dtype), param_dtype=jnp.float32, rngs=rngs)
    backbone.set_attention_implementation(model_cfg.attention)
    backbone.set_remat(model_cfg.remat)
    model = MultitaskModel(backbone, model_cfg.embedding, task_cfgs, rngs=rngs)
    if lora_cfg is not None:
        adapted = lora.attach(model, lora_cfg, rngs)
        frozen = [p for p in adapted if groups.label(f"{p}/lora_a") == optim.FROZEN]
        if frozen:
            raise ValueError(f"config.optim.rules put the LoRA factors of {frozen[:3]}{' ...' if len(frozen) > 3 else ''}"
                             " in the group 'frozen': add a rule such as ('.*/lora_(a|b)', 'lora') before the "
                             "backbone's, with its group in config.optim.groups")
    store_params(model, groups, jnp.dtype(model_cfg.frozen_param_dtype))
    return model


def store_params(model: nnx.Module, groups: optim.ParamGroups, frozen_dtype) -> None:
    """Parameters of the group 'frozen' stored in `frozen_dtype` (e.g. bf16: half the memory, nothing is lost as
    they never change), every trained parameter in float32: the optimizer updates master copies, and the towers
    cast them to the compute dtype where they are used."""
    params = nnx.state(model, nnx.Param)

    def store(path, x):
        dtype = frozen_dtype if groups.label(optim.path_to_str(path)) == optim.FROZEN else jnp.float32
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    nnx.update(model, jax.tree_util.tree_map_with_path(store, params))
