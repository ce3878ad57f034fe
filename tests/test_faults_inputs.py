"""Damaged checkpoints and bad inputs: each one is refused with an error naming the file, tensor, field, argument or
position at fault, before any compilation."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import vlm_jax
from vlm_jax import generation, inference, tokenizer
from vlm_jax.checkpoints import converted, hf, mapping, random_hf
from vlm_jax.checkpoints.integrity import CheckpointError
from vlm_jax.models.config import InternVLConfig

WORDS = ["a", "red", "square"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.build_demo_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model(tok):
    cfg = InternVLConfig.tiny(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(tokenizer.IMG_CONTEXT))
    return random_hf.random_model(cfg, seed=0)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """{"converted": dir, "hf": dir} written once from `model`; tests damage copies."""
    root = tmp_path_factory.mktemp("saved")
    converted.save(str(root / "converted"), model.config, model)
    hf.save_hf(str(root / "hf"), model, model.config)
    return {"converted": str(root / "converted"), "hf": str(root / "hf")}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _params(module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


# ---- converted checkpoints ------------------------------------------------------------------------------------

def test_converted_round_trip_is_exact(model, saved):
    restored, config = converted.load(saved["converted"])
    assert config == model.config
    for want, got in zip(_params(model), _params(restored), strict=True):
        np.testing.assert_array_equal(got, want)
    # Another dtype: verified in the stored float32, then cast.
    bf16, _ = converted.load(saved["converted"], dtype="bfloat16")
    for want, got in zip(_params(model), _params(bf16), strict=True):
        assert got.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(got, want.astype(jax.numpy.bfloat16))


def _largest_params_file(directory: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(directory, "params")) for f in fs]
    return max(files, key=os.path.getsize)


def test_converted_byte_flips_are_found(saved, tmp_path):
    path = _copy(saved["converted"], tmp_path / "flipped")
    target = _largest_params_file(path)
    data = bytearray(open(target, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    open(target, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(path) + ".* damaged"):
        vlm_jax.load_pretrained(path)


def test_converted_truncated_params_file_is_one_short_error(saved, tmp_path):
    path = _copy(saved["converted"], tmp_path / "cut")
    target = _largest_params_file(path)
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    with pytest.raises(CheckpointError, match=re.escape(path) + r": cannot read array \S+ \(") as err:
        converted.load(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 700  # not a TensorStore spec dump


def test_nan_parameter_refused_at_save(model, tmp_path):
    broken = random_hf.random_model(model.config, seed=1)
    kernel = broken.language_model.layers.mlp.down_proj.kernel
    kernel[...] = kernel[...].at[0, 0, 0].set(np.nan)
    with pytest.raises(CheckpointError, match=r"NaN or Inf.*language_model/layers/mlp/down_proj/kernel"):
        converted.save(str(tmp_path / "out"), broken.config, broken)
    assert not os.path.exists(tmp_path / "out" / converted.CONFIG_FILE)


def test_converted_without_fingerprints_is_refused(saved, tmp_path):
    path = _copy(saved["converted"], tmp_path / "old")
    meta_path = os.path.join(path, converted.CONFIG_FILE)
    meta = json.load(open(meta_path))
    del meta["fingerprints"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*fingerprints.*re-convert"):
        converted.load(path)


def test_converted_without_its_config_names_the_config_file(saved, tmp_path):
    path = _copy(saved["converted"], tmp_path / "noconfig")
    os.remove(os.path.join(path, converted.CONFIG_FILE))
    with pytest.raises(ValueError, match=re.escape(path) + ".*no vlm_jax_config.json"):
        vlm_jax.load_pretrained(path)


def test_converted_config_with_a_wrong_type_names_the_field(saved, tmp_path):
    path = _copy(saved["converted"], tmp_path / "badtype")
    meta_path = os.path.join(path, converted.CONFIG_FILE)
    meta = json.load(open(meta_path))
    meta["config"]["text"]["num_layers"] = "2"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=re.escape(meta_path) + r": text\.num_layers must be an integer, got '2'"):
        vlm_jax.load_pretrained(path)


# ---- Hugging Face checkpoints ------------------------------------------------------------------------------------

def test_truncated_safetensors_names_file_and_cut_tensors(saved, tmp_path):
    path = _copy(saved["hf"], tmp_path / "cut")
    file = os.path.join(path, "model.safetensors")
    header_len = int.from_bytes(open(file, "rb").read(8), "little")
    header = json.loads(open(file, "rb").read(8 + header_len)[8:])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 5)
    with pytest.raises(ValueError, match=re.escape(file) + ".*cut off.*" + re.escape(last)):
        vlm_jax.load_pretrained(path)


def test_index_naming_the_wrong_shard_says_where_the_tensor_is(saved, tmp_path):
    path = _copy(saved["hf"], tmp_path / "sharded")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[0::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fn, part in shards.items():
        save_file({n: tensors[n] for n in part}, os.path.join(path, fn))
        weight_map.update({n: fn for n in part})
    holder = weight_map["lm_head.weight"]
    wrong = next(fn for fn in shards if fn != holder)
    weight_map["lm_head.weight"] = wrong
    index = os.path.join(path, "model.safetensors.index.json")
    json.dump({"metadata": {}, "weight_map": weight_map}, open(index, "w"))
    expected = (re.escape(index) + r".*lm_head\.weight \(the index names " + re.escape(wrong)
                + "; it is in " + re.escape(holder))
    with pytest.raises(ValueError, match=expected):
        vlm_jax.load_pretrained(path)


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["text_config"].update(hidden_size="64"),
     r"text_config\.hidden_size must be a positive integer, got '64' \(str\)"),
    (lambda c: c["vision_config"].update(num_hidden_layers=[2]),
     r"vision_config\.num_hidden_layers must be a positive integer, got \[2\] \(list\)"),
    (lambda c: c["text_config"].pop("vocab_size"),
     r"required field text_config\.vocab_size is missing \(expected a positive integer\)"),
    (lambda c: c.update(downsample_ratio="half"), r"downsample_ratio must be a number, got 'half'"),
], ids=["string-for-int", "list-for-int", "missing", "string-for-float"])
def test_config_json_type_errors_name_file_field_and_type(saved, tmp_path, change, expected):
    path = _copy(saved["hf"], tmp_path / "cfg")
    config_path = os.path.join(path, "config.json")
    raw = json.load(open(config_path))
    change(raw)
    json.dump(raw, open(config_path, "w"))
    with pytest.raises(ValueError, match=re.escape(config_path) + ": " + expected):
        vlm_jax.load_pretrained(path)


def test_tensor_shape_against_config_names_tensor_and_shapes(saved, tmp_path):
    path = _copy(saved["hf"], tmp_path / "shape")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.language_model.norm.weight"] = np.ones((31,), np.float32)  # config: hidden_size 32
    save_file(tensors, file)
    with pytest.raises(mapping.CheckpointMismatchError,
                       match=r"model\.language_model\.norm\.weight: checkpoint \(31,\), model expects \(32,\)"):
        vlm_jax.load_pretrained(path)


def test_non_finite_weights_are_named(saved, tmp_path):
    path = _copy(saved["hf"], tmp_path / "nan")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.vision_tower.encoder.layer.1.mlp.fc2.bias"][3] = np.inf
    tensors["lm_head.weight"][0, 0] = np.nan
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=re.escape(path) + r": 2 tensor\(s\) hold NaN or Inf.*"
                       r"(?=.*lm_head\.weight)(?=.*model\.vision_tower\.encoder\.layer\.1\.mlp\.fc2\.bias)"):
        vlm_jax.load_pretrained(path)


# ---- inference inputs --------------------------------------------------------------------------------------------

def _generate_ids(model, ids, pixel_values=None, **kw):
    ids = np.asarray(ids)
    return generation.generate_ids(model, ids, np.ones_like(ids), pixel_values, max_new_tokens=2, eos_token_id=1,
                                   pad_token_id=0, **kw)


@pytest.mark.parametrize("bad, position", [(10**6, r"\(1, 2\)"), (-1, r"\(0, 1\)")], ids=["too-large", "negative"])
def test_token_ids_outside_the_vocabulary(model, bad, position):
    vocab = model.config.text.vocab_size
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    ids[(1, 2) if bad > 0 else (0, 1)] = bad
    with pytest.raises(ValueError, match=rf"input_ids: token ids must be in \[0, {vocab}\).*got {bad} at position "
                       + position):
        _generate_ids(model, ids)


def test_tokenizer_larger_than_the_model_vocabulary(tok):
    small = random_hf.random_model(InternVLConfig.tiny(vocab_size=64, image_token_id=63))
    with pytest.raises(ValueError, match=r"texts\[0\] \(tokenized\): token ids must be in \[0, 64\)"):
        inference.encode_texts(small, ["red square"], tokenizer=tok)


@pytest.mark.parametrize("entry", [None, 3])
def test_non_string_texts_name_the_index(model, tok, entry):
    with pytest.raises(ValueError, match=rf"texts\[1\] must be a string, got {type(entry).__name__}"):
        inference.encode_texts(model, ["a red square", entry], tokenizer=tok)


def test_generate_needs_a_prompt_or_an_image(model, tok):
    with pytest.raises(ValueError, match="needs a prompt or an image"):
        generation.generate(model, tok, images=None, prompt="")
    with pytest.raises(ValueError, match="prompt must be a string, got NoneType"):
        generation.generate(model, tok, images=None, prompt=None)


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_invalid_sampling_parameters(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} must be"):
        generation.SamplingParams(**kwargs)


def test_raw_pixels_are_refused_with_the_preprocessing_hint(model, tok):
    size = model.config.image_size
    raw = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.float32)  # 0..255, not normalised
    with pytest.raises(ValueError, match=r"images \(preprocessed tiles\): values reach 2\d\d.*preprocess"):
        inference.encode_images(model, raw, pooling="cls")
    ids = [[tok.convert_tokens_to_ids(tokenizer.IMG_CONTEXT)] * model.config.num_image_tokens]
    with pytest.raises(ValueError, match=r"pixel_values: values reach 2\d\d.*load_pixels"):
        _generate_ids(model, ids, raw)
    normalised = inference.load_pixels(model, [raw[0].astype(np.uint8)])
    inference.check_pixel_range(normalised)  # what preprocessing gives passes
