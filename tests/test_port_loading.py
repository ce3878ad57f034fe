"""Checkpoint checks, bad input, orbax round trip, compile caching and the KV cache."""

import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import fixtures  # noqa: E402
import vlm_jax  # noqa: E402
from vlm_jax import convert, pretrained  # noqa: E402
from vlm_jax.checkpoints import hf, mapping, random_hf  # noqa: E402
from vlm_jax.models import InternVLConfig  # noqa: E402


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return fixtures.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("native"), "transformers_native", seed=7)


@pytest.fixture(scope="module")
def loaded(native):
    return vlm_jax.load_pretrained(native.path)


def test_missing_unexpected_and_mismatched_tensors_listed_together(native, tmp_path):
    tensors = load_file(os.path.join(native.path, "model.safetensors"))
    del tensors["model.language_model.layers.1.mlp.up_proj.weight"]
    tensors["model.extra.weight"] = np.zeros((3,), np.float32)
    tensors["model.vision_tower.encoder.layer.0.mlp.fc1.weight"] = np.zeros((65, 32), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for fn in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / fn).write_bytes(open(os.path.join(native.path, fn), "rb").read())
    with pytest.raises(mapping.CheckpointMismatchError) as err:
        vlm_jax.load_pretrained(str(tmp_path))
    msg = str(err.value)
    assert "model.language_model.layers.1.mlp.up_proj.weight (expected (64, 32))" in msg
    assert "model.extra.weight" in msg
    assert "model.vision_tower.encoder.layer.0.mlp.fc1.weight: checkpoint (65, 32), model expects (64, 32)" in msg


def test_pickled_weights_refused(tmp_path, native):
    (tmp_path / "config.json").write_bytes(open(os.path.join(native.path, "config.json"), "rb").read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="safetensors"):
        vlm_jax.load_pretrained(str(tmp_path))


def test_image_token_id_sources(tmp_path):
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path / "ogv", "opengvlab", seed=8)
    # OpenGVLab layout: the config has no image_token_id; it comes from the tokenizer's <IMG_CONTEXT>.
    assert "image_token_id" not in json.load(open(os.path.join(ckpt.path, "config.json")))
    assert vlm_jax.load_pretrained(ckpt.path).image_token_id == ckpt.image_token_id
    assert vlm_jax.load_pretrained(ckpt.path, image_token_id=7).image_token_id == 7
    os.remove(os.path.join(ckpt.path, "tokenizer.json"))
    os.remove(os.path.join(ckpt.path, "tokenizer_config.json"))
    with pytest.raises(ValueError, match="image token id"):
        vlm_jax.load_pretrained(ckpt.path)


def test_bad_inputs(loaded, native):
    px, ids, mask = fixtures.padded_batch(native, num_images=(1, 1))
    with pytest.raises(ValueError, match="NCHW"):
        loaded(pixel_values=px.transpose(0, 3, 1, 2), input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="4-D"):
        loaded(pixel_values=px[0], input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="multiple of 16"):
        loaded(pixel_values=px[:, :24, :24], input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
        loaded(pixel_values=px[:1], input_ids=ids, attention_mask=mask)  # 8 tokens, 1 image x 4
    with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
        loaded.module.merge_image_embeddings(jnp.asarray(ids), jnp.zeros((1, 4, 32)))


def test_second_call_does_not_recompile(loaded, native):
    px, ids, mask = fixtures.padded_batch(native, num_images=(1, 1), seed=3)
    first = loaded(pixel_values=px, input_ids=ids, attention_mask=mask).logits
    cache_size = pretrained._forward.jitted_fn._cache_size  # one entry per traced (compiled) signature
    before = cache_size()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    second = loaded(pixel_values=px + 1, input_ids=ids, attention_mask=mask).logits
    assert cache_size() == before
    assert compiles == []
    assert not np.allclose(np.asarray(first), np.asarray(second))
    loaded(pixel_values=px, input_ids=ids[:, 1:], attention_mask=mask[:, 1:])  # new shape: one new trace
    assert cache_size() == before + 1
    assert compiles  # the listener does see compilations


def test_orbax_round_trip_identical(native, tmp_path):
    out = tmp_path / "converted"
    convert.main(["--checkpoint", native.path, "--output", str(out)])
    assert os.path.exists(out / "tokenizer.json")
    a, b = vlm_jax.load_pretrained(native.path), vlm_jax.load_pretrained(str(out))
    assert b.image_token_id == a.image_token_id and b.config == a.config
    for x, y in zip(jax.tree.leaves(nnx.state(a.module, nnx.Param)), jax.tree.leaves(nnx.state(b.module, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    px, ids, mask = fixtures.padded_batch(native, num_images=(2, 1), seed=4)
    np.testing.assert_array_equal(np.asarray(a(pixel_values=px, input_ids=ids, attention_mask=mask).logits),
                                  np.asarray(b(pixel_values=px, input_ids=ids, attention_mask=mask).logits))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_kv_cache_decode_equals_full_recomputation(padding):
    cfg = InternVLConfig.tiny(vocab_size=64, image_token_id=63)
    lm = random_hf.random_model(cfg, seed=0).language_model
    rng = np.random.default_rng(0)
    b, t = 2, 9
    ids = jnp.asarray(rng.integers(0, 63, (b, t)), jnp.int32)
    valid = np.ones((b, t), np.int32)
    if padding == "left":
        valid[0, :3] = 0
    else:
        valid[1, 7:] = 0  # right padding only inside the prompt part handled by the mask
    valid = jnp.asarray(valid)
    full, _ = nnx.jit(lambda lm, i, m: lm(input_ids=i, attention_mask=m))(lm, ids, valid)
    step = nnx.jit(lambda lm, c, i, m: lm(input_ids=i, attention_mask=m, cache=c))
    prefill, cache = step(lm, lm.init_cache(b, 12), ids[:, :5], valid[:, :5])
    steps = [prefill]
    for k in range(5, t):
        h, cache = step(lm, cache, ids[:, k:k + 1], valid[:, k:k + 1])
        steps.append(h)
    assert int(cache["index"]) == t
    got = jnp.concatenate(steps, axis=1)
    m = np.asarray(valid).astype(bool)
    np.testing.assert_allclose(np.asarray(got)[m], np.asarray(full)[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["transformers", "opengvlab"])
def test_save_hf_round_trip(loaded, native, tmp_path, layout):
    hf.save_hf(str(tmp_path), loaded.module, loaded.config, layout=layout)
    again = vlm_jax.load_pretrained(str(tmp_path), image_token_id=loaded.image_token_id)
    px, ids, mask = fixtures.padded_batch(native, num_images=(1, 2), seed=5)
    np.testing.assert_array_equal(np.asarray(loaded(pixel_values=px, input_ids=ids, attention_mask=mask).logits),
                                  np.asarray(again(pixel_values=px, input_ids=ids, attention_mask=mask).logits))


@pytest.mark.parametrize("policy", ["dots_with_no_batch_dims_saveable"])  # "full": the same path, no policy
def test_remat_gives_the_same_gradients(policy):
    cfg = InternVLConfig.tiny(vocab_size=64, image_token_id=63)
    model = random_hf.random_model(cfg, seed=1)
    px = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 3)), jnp.float32)

    def loss(m):  # the vision tower; the LM uses the same scan/remat code
        return jnp.mean(m.image_embeddings(px) ** 2)

    grad = nnx.jit(nnx.grad(loss))
    grads = nnx.state(grad(model), nnx.Param)

    def program(m):  # the loss's jaxpr: remat wraps the layer body in a `remat2` (jax.checkpoint) primitive
        graphdef, state = nnx.split(m)
        return str(jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s)))(state))

    assert "remat2[" not in program(model)
    model.set_remat(policy)
    assert "remat2[" in program(model)
    grads_remat = nnx.state(grad(model), nnx.Param)
    leaves = jax.tree.leaves(grads["vision_tower"])
    for a, b in zip(leaves, jax.tree.leaves(grads_remat["vision_tower"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_demo_runs_and_matches_transformers(tmp_path):
    from vlm_jax import demo

    result = demo.run(str(tmp_path))
    assert result["converted_vs_hf_max_abs"] == 0.0
    assert result["torch_max_abs"] < 1e-4


def test_mismatch_names_use_the_files_legacy_spelling(tmp_path_factory):
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("legacy"), "transformers", seed=9)
    path = os.path.join(ckpt.path, "model.safetensors")
    tensors = load_file(path)
    del tensors["language_model.model.norm.weight"]
    save_file(tensors, path)
    expected = r"language_model\.model\.norm\.weight \(expected \(32,\)\)"
    with pytest.raises(mapping.CheckpointMismatchError, match=expected):
        vlm_jax.load_pretrained(ckpt.path)


def _copy_checkpoint(src: str, dst) -> str:
    for fn in os.listdir(src):
        (dst / fn).write_bytes(open(os.path.join(src, fn), "rb").read())
    return str(dst / "model.safetensors")


def test_truncated_file_names_the_file_and_the_cut_tensors(native, tmp_path):
    path = _copy_checkpoint(native.path, tmp_path)
    with safe_open(path, framework="numpy") as f:
        last = f.offset_keys()[-1]  # the tensor stored last: the one a truncation cuts
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    with pytest.raises(ValueError) as err:
        vlm_jax.load_pretrained(str(tmp_path))
    assert path in str(err.value) and last in str(err.value)


def test_corrupt_header_length_names_the_file(native, tmp_path):
    path = _copy_checkpoint(native.path, tmp_path)
    with open(path, "r+b") as f:
        length = bytearray(f.read(8))  # little-endian u64 header length
        length[0] ^= 0x5A
        f.seek(0)
        f.write(bytes(length))
    with pytest.raises(ValueError, match=re.escape(path)):
        vlm_jax.load_pretrained(str(tmp_path))
