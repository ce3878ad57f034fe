"""Shared test fixtures: the demo config's sections on small settings, task modules built from them, XLA flags for
test subprocesses, and small random transformers InternVL checkpoints on disk.

Checkpoints: `make_tiny_hf_checkpoint(tmp_path, layout=...)` builds a tiny `InternVLForConditionalGeneration` (PyTorch, eager
attention), adds noise to EVERY tensor (so unit norms, zero biases and constant layer scales cannot hide a bug)
and writes it as
- "transformers":        `save_pretrained` (legacy on-disk names: vision_tower.*, language_model.model.*, ...)
- "transformers_native": the in-memory names (model.vision_tower.*, ..., lm_head.weight)
- "opengvlab":           the original InternVLChatModel names (fused attn.qkv, ls1/ls2, mlp1.{0,1,3}) with an
                         `internvl_chat` config.json
Every layout gets a small tokenizer whose last three ids are <img>, </img>, <IMG_CONTEXT>.
The returned `TinyCheckpoint.model` is the PyTorch reference holding exactly the saved weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib

import ml_collections
import numpy as np
from flax import nnx

from vlm_jax import config_files
from vlm_jax import tasks as tasks_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def subprocess_xla_flags(num_devices: int) -> str:
    """This session's XLA flags (set in conftest.py) with ``num_devices`` fake CPU devices, for a subprocess."""
    kept = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([f"--xla_force_host_platform_device_count={num_devices}", *kept])


def demo_config() -> ml_collections.ConfigDict:
    """`configs/tiny_synthetic.py`'s whole config (a fresh copy)."""
    return config_files.load_config_file(REPO / "configs" / "tiny_synthetic.py")


def data_config(**changes) -> ml_collections.ConfigDict:
    """The demo config's `config.data` on spatial_shapes' small "tiny" build (256 train images of 64 px), with
    `changes` applied."""
    c = demo_config().data
    c.builder_config = "tiny"
    c.builder_params = {}
    c.update(changes)
    return c


def build_tiny_data(tmp_path_factory) -> str:
    """A fresh data_dir holding spatial_shapes' "tiny" build (`data_config`), for a module's tests."""
    from vlm_jax.data import pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.make_builder(data_config(data_dir=path))
    return path


def make_tasks(settings: dict, widths: tasks_lib.Widths | None = None, seed: int = 0) -> dict:
    """Task modules {name: Task} for the tasks named in ``settings`` ({task: {field: value}}), each starting from
    the demo config's section of that task; default widths: vision 8, text 8, embeddings 16, fused 32."""
    widths = widths or tasks_lib.Widths(vision=8, text=8, embed=16, fused=32)
    sections = demo_config().tasks
    out = {}
    for name, changes in settings.items():
        cfg = sections[name]
        if name == "spatial":  # the linear-head form on the fused feature; tests of the attention head set it
            cfg.update(query="caption", head="mlp")
        cfg.update(changes)
        out[name] = tasks_lib.TASKS[name](cfg, widths, rngs=nnx.Rngs(seed))
    return out


# ---- small random transformers checkpoints ----------------------------------------------------------------------

VOCAB = 96
IMAGE_SIZE = 32  # 4x4 patches of 8 px -> 4 image tokens per tile after pixel shuffle


@dataclasses.dataclass
class TinyCheckpoint:
    path: str
    model: object  # transformers InternVLForConditionalGeneration (float32, eval, eager attention)
    image_token_id: int
    num_image_tokens: int
    vocab_size: int
    image_size: int


def hf_config(*, vocab_size=VOCAB, image_size=IMAGE_SIZE, tie_word_embeddings=False, vision=None, text=None):
    """A tiny transformers InternVLConfig (non-default rope theta, qkv bias on, untied lm_head by default)."""
    from transformers import InternVLConfig

    vision_config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         image_size=image_size, patch_size=8, attention_bias=True, layer_norm_eps=1e-6)
    vision_config.update(vision or {})
    text_config = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size, rope_theta=5000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings)
    text_config.update(text or {})
    return InternVLConfig(vision_config=vision_config, text_config=text_config, image_token_id=vocab_size - 1,
                          downsample_ratio=0.5, tie_word_embeddings=tie_word_embeddings)


def random_torch_model(config, seed=0, noise=0.1):
    """InternVLForConditionalGeneration with every parameter perturbed by N(0, noise^2)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def write_tokenizer(path, vocab_size):
    """Word-level tokenizer: words w0.. then <img>, </img>, <IMG_CONTEXT> as the last three ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 3)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<img>", "</img>", "<IMG_CONTEXT>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    fast.save_pretrained(path)


def _to_opengvlab(sd: dict, num_vision_layers: int) -> dict:
    """transformers in-memory names -> InternVLChatModel names (q/k/v fused back into attn.qkv)."""
    out = {}
    simple = [
        ("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
        ("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
        ("model.vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
        ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
        ("model.multi_modal_projector.linear_1.", "mlp1.1."),
        ("model.multi_modal_projector.linear_2.", "mlp1.3."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    layer_parts = [("attention.projection_layer.", "attn.proj."), ("attention.q_norm.", "attn.q_norm."),
                   ("attention.k_norm.", "attn.k_norm."), ("layernorm_before.", "norm1."),
                   ("layernorm_after.", "norm2."), ("lambda_1", "ls1"), ("lambda_2", "ls2"), ("mlp.", "mlp.")]
    for name, t in sd.items():
        new = None
        for old, rep in simple:
            if name.startswith(old):
                new = rep + name[len(old):]
        if name.startswith("model.vision_tower.encoder.layer."):
            i, rest = name[len("model.vision_tower.encoder.layer."):].split(".", 1)
            if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                continue  # fused below
            for old, rep in layer_parts:
                if rest.startswith(old):
                    new = f"vision_model.encoder.layers.{i}.{rep}{rest[len(old):]}"
        assert new is not None, name
        out[new] = t
    for i in range(num_vision_layers):
        p = f"model.vision_tower.encoder.layer.{i}.attention"
        for suffix in ("weight", "bias"):
            parts = [sd.get(f"{p}.{q}_proj.{suffix}") for q in "qkv"]
            if parts[0] is not None:
                out[f"vision_model.encoder.layers.{i}.attn.qkv.{suffix}"] = np.concatenate(parts, axis=0)
    return out


def _opengvlab_config(config) -> dict:
    v, t = config.vision_config, config.text_config
    llm = t.to_dict()
    llm.pop("rope_parameters", None)
    llm.update(architectures=["Qwen2ForCausalLM"], rope_theta=t.rope_parameters["rope_theta"], model_type="qwen2")
    return dict(
        architectures=["InternVLChatModel"], model_type="internvl_chat", force_image_size=v.image_size[0],
        downsample_ratio=config.downsample_ratio, ps_version="v2", select_layer=-1, template="internvl2_5",
        tie_word_embeddings=False,
        vision_config=dict(
            architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=v.hidden_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            intermediate_size=v.intermediate_size, image_size=v.image_size[0], patch_size=v.patch_size[0],
            num_channels=3, qkv_bias=v.attention_bias, qk_normalization=v.use_qk_norm, norm_type=v.norm_type,
            layer_norm_eps=v.layer_norm_eps, hidden_act="gelu", use_flash_attn=False),
        llm_config=llm,
    )


def _save_safetensors(path, tensors: dict, shards: int):
    from safetensors.numpy import save_file

    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n] for n in names}, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, os.path.join(path, fn))
        weight_map.update({n: fn for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _numpy(t, dtype):
    import ml_dtypes
    import torch

    if dtype == "bfloat16":
        return t.detach().to(torch.bfloat16).view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().float().numpy()


def make_tiny_hf_checkpoint(path, layout="transformers", *, seed=0, dtype="float32", shards=1,
                            vocab_size=VOCAB, image_size=IMAGE_SIZE, tie_word_embeddings=False,
                            vision=None, text=None) -> TinyCheckpoint:
    """Write a tiny random checkpoint to `path` (created) and return it with its PyTorch reference model.

    dtype="bfloat16" stores bf16 tensors; the reference model then holds the bf16-rounded weights in float32.
    """
    import torch

    path = str(path)
    os.makedirs(path, exist_ok=True)
    config = hf_config(vocab_size=vocab_size, image_size=image_size, tie_word_embeddings=tie_word_embeddings,
                       vision=vision, text=text)
    model = random_torch_model(config, seed=seed)
    if dtype == "bfloat16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    sd = {k: _numpy(v, dtype) for k, v in model.state_dict().items()}
    if tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if layout == "transformers":
        if dtype == "bfloat16":
            # A copy: casting the reference itself would also round its fp32 RoPE inv_freq buffer.
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
        else:
            model.save_pretrained(path)
        if shards > 1:
            raise ValueError("shards > 1 is supported for transformers_native and opengvlab layouts")
    elif layout == "transformers_native":
        config.save_pretrained(path)
        _save_safetensors(path, sd, shards)
    elif layout == "opengvlab":
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(_opengvlab_config(config), f, indent=2)
        _save_safetensors(path, _to_opengvlab(sd, config.vision_config.num_hidden_layers), shards)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    write_tokenizer(path, vocab_size)
    grid = image_size // 8
    return TinyCheckpoint(path=path, model=model, image_token_id=vocab_size - 1, num_image_tokens=(grid // 2) ** 2,
                          vocab_size=vocab_size, image_size=image_size)


def padded_batch(ckpt: TinyCheckpoint, *, num_images=(1, 2), length=16, padding="left", seed=0):
    """A padded batch with image blocks: rows hold num_images[b] tiles each.

    -> (pixel_values float32[N, S, S, 3] NHWC, input_ids int64[B, T], attention_mask int64[B, T]).
    """
    rng = np.random.default_rng(seed)
    img, img_end = ckpt.vocab_size - 3, ckpt.vocab_size - 2
    rows = []
    for n in num_images:
        text_len = int(rng.integers(2, 5))
        ids = list(rng.integers(0, ckpt.vocab_size - 3, size=text_len))
        for _ in range(n):
            ids += [img] + [ckpt.image_token_id] * ckpt.num_image_tokens + [img_end]
        ids += list(rng.integers(0, ckpt.vocab_size - 3, size=int(rng.integers(1, 4))))
        rows.append(ids)
    length = max(length, max(len(r) for r in rows))
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        if padding == "left":
            input_ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
        else:
            input_ids[b, :len(r)], mask[b, :len(r)] = r, 1
    px = rng.standard_normal((sum(num_images), ckpt.image_size, ckpt.image_size, 3)).astype(np.float32)
    return px, input_ids, mask


def torch_logits(ckpt: TinyCheckpoint, px, input_ids, mask):
    """Reference logits from transformers (pixel_values converted to NCHW)."""
    import torch

    with torch.no_grad():
        out = ckpt.model(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2).contiguous(),
                         input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask))
    return out.logits.float().numpy()
