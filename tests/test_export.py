"""LoRA and export back to PyTorch: transformers loads what vlm_jax exports and computes the same logits; converting
and exporting gives back the checkpoint's own tensors, bit for bit."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import fixtures
from vlm_jax import build, config_files, convert, export, lora, sharding
from vlm_jax import tokenizer as tokenizer_lib
from vlm_jax.checkpoints import mapping
from vlm_jax.checkpoints.safetensors_io import SafetensorsDir
from vlm_jax.trainer import make_trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import benchmark_train_step  # noqa: E402

ADDED = ("<ref>", "</ref>", "<box>", "</box>")


@pytest.mark.parametrize("layout", ["transformers", "opengvlab"])
def test_convert_then_export_gives_back_the_same_tensors(tmp_path, layout):
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path / "hf", layout, seed=3)
    convert.convert(ckpt.path, str(tmp_path / "converted"), show_progress=False)
    export.export_converted(str(tmp_path / "converted"), str(tmp_path / "out"), layout=layout)
    original, exported = SafetensorsDir(ckpt.path), SafetensorsDir(str(tmp_path / "out"))
    # transformers' save_pretrained writes the legacy prefixes (language_model.model.*); the export writes the
    # names transformers' modules have (model.language_model.*), which it loads without renaming.
    rename = mapping.native_name if layout == "transformers" else str
    native = {rename(n): n for n in original.shapes()}
    assert sorted(exported.shapes()) == sorted(native)
    for name, source_name in native.items():
        a, b = np.asarray(original.get(source_name)), np.asarray(exported.get(name))
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32)), name
    assert tokenizer_lib.load_tokenizer(str(tmp_path / "out")).get_vocab() == \
        tokenizer_lib.load_tokenizer(ckpt.path).get_vocab()
    with pytest.raises(ValueError, match=r"is not empty .* pass --overwrite"):
        export.export_converted(str(tmp_path / "converted"), str(tmp_path / "out"), layout=layout)


def _lora_config(tokenizer_dir):
    cfg = config_files.load_config_file(REPO / "configs" / "tiny_synthetic.py")
    cfg.model.tokenizer = str(tokenizer_dir)
    cfg.batch_size = 8
    cfg.lora.update(dict(rank=4, alpha=8.0, dropout=0.1, vision_layers=(1, 2), targets=(
        "backbone/language_model/layers/(self_attn/(q|v)_proj|mlp/down_proj)", "backbone/vision_tower/layers/attn/qkv")))
    cfg.optim.rules = ((".*/lora_(a|b)", "lora"), ("backbone/.*", "frozen"), (".*", "heads"))
    cfg.optim.groups = {"lora": dict(cfg.optim.groups["all"], lr=1e-2), "heads": dict(cfg.optim.groups["all"])}
    return cfg


def test_a_lora_run_exported_loads_in_transformers_with_the_same_logits(tmp_path):
    tok = tokenizer_lib.make_tokenizer("demo")
    tok.add_tokens(list(ADDED), special_tokens=True)
    tok.save_pretrained(tmp_path / "tokenizer")
    cfg = _lora_config(tmp_path / "tokenizer")
    backbone_cfg = build.resolve_backbone(cfg.model).config
    assert backbone_cfg.text.vocab_size == len(tok)  # the embedding has the added tokens' rows
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    trainer = make_trainer(cfg, mesh, 10, backbone_cfg)
    model_state = trainer.init_model_state()
    state = trainer.assemble(model_state, trainer.init_train_items(model_state))
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    for i in range(3):
        batch = sharding.global_batch(benchmark_train_step.synthetic_batch(cfg, backbone_cfg, 8, seed=i), mesh)
        state, _ = trainer.train_step(state, batch, jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), frozen_before)
    model = trainer.model(state)

    # Exactly r (in + out) per adapted linear and stacked layer.
    v, t, r = backbone_cfg.vision, backbone_cfg.text, 4
    kv = t.num_kv_heads * t.head_dim
    expected = r * (t.num_layers * ((t.hidden_size + t.num_heads * t.head_dim) + (t.hidden_size + kv)
                                    + (t.intermediate_size + t.hidden_size))
                    + v.num_layers * (v.hidden_size + 3 * v.hidden_size))
    assert lora.num_parameters(model) == expected
    qkv = model.backbone.vision_tower.layers.attn.qkv
    assert not np.any(np.asarray(qkv.lora_a[...][0])) and not np.any(np.asarray(qkv.lora_b[...][0]))  # layer 0
    assert np.any(np.asarray(qkv.lora_b[...][1]))  # layer 1 trained
    assert np.any(np.asarray(model.backbone.language_model.layers.self_attn.q_proj.lora_b[...]))

    rng = np.random.default_rng(0)
    s, q = backbone_cfg.vision.image_size, backbone_cfg.num_image_tokens
    px = rng.standard_normal((2, s, s, 3)).astype(np.float32)
    ids = rng.integers(0, len(tok) - len(ADDED), (2, q + 9))
    ids[:, 2:2 + q] = backbone_cfg.image_token_id
    ids[:, -2:] = tok.convert_tokens_to_ids(list(ADDED[:2]))
    mask = np.ones_like(ids)
    host = benchmark_train_step.synthetic_batch(cfg, backbone_cfg, 2, seed=7)
    batch = {k: jnp.asarray(host[k]) for k in ("image", "text_ids", "text_mask", "query_ids", "query_mask")}

    @nnx.jit
    def outputs(model):
        """(logits of the prompts, every head's output on `batch`): one compiled call per model structure."""
        features = model.features(batch, train=False)
        heads = {"image_emb": features.image_emb, "text_emb": features.text_emb, "logit_scale": features.logit_scale,
                 "itm_logit": model.tasks["itm"].head(features.fused)[:, 0],
                 "box": model.tasks["box"](features, batch, train=False)["box_pred"],
                 "spatial_logits": model.tasks["spatial"](features, batch, train=False)["spatial_logits"]}
        return model.backbone(jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask)).logits, heads

    unmerged, mine = jax.tree.map(np.asarray, outputs(model))

    out = tmp_path / "export"
    info = export.export_model(model, cfg, tok, str(out), max_shard_bytes=200_000)
    assert info["merged_lora_linears"] == 4 and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    merged, merged_heads = jax.tree.map(np.asarray, outputs(model))  # LoRA folded into the kernels now
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5 * np.abs(unmerged).max())
    for name, value in mine.items():
        np.testing.assert_allclose(merged_heads[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2), input_ids=torch.from_numpy(ids),
                           attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.abs(theirs - unmerged).max() <= 1e-5 * np.abs(theirs).max()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert len(loaded_tok) == reference.get_input_embeddings().weight.shape[0] == len(tok)
    assert loaded_tok.convert_tokens_to_ids(list(ADDED)) == tok.convert_tokens_to_ids(list(ADDED))

    heads = load_file(str(out / export.HEADS_FILE))
    assert heads and not any(k.startswith("backbone/") for k in heads)
    assert "tasks/itm/head/kernel" in heads and "logit_scale" in heads

    # The heads in PyTorch on transformers' outputs (attention box head, objects-query attention spatial head and
    # MLP ITM head of the demo config) give vlm_jax's outputs.
    from vlm_jax.torch_heads import TorchHeads

    t = lambda name: torch.from_numpy(np.asarray(host[name]))  # noqa: E731
    theirs = TorchHeads.from_export(str(out))(reference, t("image").permute(0, 3, 1, 2), t("text_ids").long(),
                                              t("text_mask").long(), t("query_ids").long(), t("query_mask").long())
    assert sorted(theirs) == sorted(mine)
    for name, value in mine.items():
        np.testing.assert_allclose(theirs[name].numpy(), value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_lora_factors_left_in_the_frozen_group_or_unmatched_targets_are_refused(tmp_path):
    cfg = _lora_config("demo")
    cfg.optim.rules = (("backbone/.*", "frozen"), (".*", "heads"))
    with pytest.raises(ValueError, match=r"LoRA factors of .* in the group 'frozen': add a rule such as"):
        make_trainer(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]), 10)
    cfg = _lora_config("demo")
    cfg.lora.targets = ("backbone/language_model/layers/self_attn/qkv",)
    with pytest.raises(ValueError, match=r"'backbone/language_model/layers/self_attn/qkv' matches no linear layer"):
        make_trainer(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]), 10)
