"""Embeddings and scores against the same quantities computed with transformers' PyTorch InternVL."""

import numpy as np
import PIL.Image
import pytest
import torch

import fixtures
from vlm_jax import inference, tokenizer
from vlm_jax.data import preprocess
from vlm_jax.data.prompt import PromptBuilder
from vlm_jax.pretrained import load_module

WORDS = ["a", "red", "blue", "square", "circle", "left", "of", "the", "big", "small"]
TEXTS = ["a red square", "the small blue circle left of a big red square", "circle", "a big one"]
ATOL = 2e-5  # float32 on both sides; unit-norm vectors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tokenizer.build_demo_tokenizer(WORDS)
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("inf"), "transformers",
                                               vocab_size=len(tok), seed=5)
    model, _ = load_module(ckpt.path)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for w, h in [(40, 30), (32, 32), (20, 64)]]
    return tok, ckpt, model, images


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _torch_lm_last(ckpt, seqs, pixels=None, pooling="last"):
    """Final-norm hidden states from transformers, pooled per sequence (run one at a time: no padding at all)."""
    out = []
    for i, seq in enumerate(seqs):
        kwargs = dict(input_ids=torch.tensor([seq]))
        if pixels is not None:
            kwargs["pixel_values"] = torch.from_numpy(pixels[i:i + 1]).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            hidden = ckpt.model.model(**kwargs).last_hidden_state[0].numpy()
        out.append(hidden[-1] if pooling == "last" else hidden.mean(0))
    return _unit(np.stack(out))


def test_vision_pooling_matches_transformers(setup):
    tok, ckpt, model, images = setup
    pixels = np.stack([preprocess.single_tile(im, ckpt.image_size) for im in images])
    with torch.no_grad():
        hidden = ckpt.model.model.vision_tower(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()).last_hidden_state.numpy()
    got_cls = inference.encode_images(model, images, pooling="cls")
    got_mean = inference.encode_images(model, images, pooling="mean")
    np.testing.assert_allclose(got_cls, _unit(hidden[:, 0]), atol=ATOL)
    np.testing.assert_allclose(got_mean, _unit(hidden[:, 1:].mean(1)), atol=ATOL)


def test_lm_embeddings_and_score_match_transformers(setup):
    tok, ckpt, model, images = setup
    builder = PromptBuilder(tok, ckpt.num_image_tokens, "plain")
    pixels = np.stack([preprocess.single_tile(im, ckpt.image_size) for im in images])
    want_img = _torch_lm_last(ckpt, [builder.prompt_ids("<image>", 1)] * len(images), pixels)
    want_txt = _torch_lm_last(ckpt, [builder.prompt_ids(t, None) for t in TEXTS])
    # batch_size 2: several padded batches, right padding inside each.
    got_img = inference.encode_images(model, images, tokenizer=tok, batch_size=2)
    got_txt = inference.encode_texts(model, TEXTS, tokenizer=tok, batch_size=2)
    np.testing.assert_allclose(got_img, want_img, atol=ATOL)
    np.testing.assert_allclose(got_txt, want_txt, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got_txt, axis=-1), 1.0, atol=1e-6)
    scores = inference.score(model, images, TEXTS, tokenizer=tok, batch_size=2)
    assert scores.shape == (3, 4)
    np.testing.assert_allclose(scores, want_img @ want_txt.T, atol=1e-4)


def test_text_mean_pooling_matches_transformers(setup):
    tok, ckpt, model, _ = setup
    builder = PromptBuilder(tok, ckpt.num_image_tokens, "plain")
    want = _torch_lm_last(ckpt, [builder.prompt_ids(t, None) for t in TEXTS], pooling="mean")
    np.testing.assert_allclose(inference.encode_texts(model, TEXTS, tokenizer=tok, pooling="mean", batch_size=2),
                               want, atol=ATOL)


def test_one_compile_per_bucket(setup):
    tok, ckpt, model, _ = setup
    inference.encode_texts(model, TEXTS, tokenizer=tok, batch_size=4)  # rows 4, length bucket 16
    compiled = lambda: (inference._vision_embed._cache_size(), inference._lm_embed._cache_size())  # noqa: E731
    before = compiled()
    # Other lengths and counts inside the same buckets: nothing is traced again.
    inference.encode_texts(model, ["a big red square left of the circle", "red", "blue"], tokenizer=tok,
                           batch_size=4)
    inference.encode_texts(model, TEXTS[::-1], tokenizer=tok, batch_size=4, progress=True)
    assert compiled() == before


def test_errors(setup):
    tok, ckpt, model, images = setup
    with pytest.raises(ValueError, match="lm_last"):
        inference.score(model, images, TEXTS, tokenizer=tok, image_pooling="cls")
    with pytest.raises(ValueError, match="tokenizer="):
        inference.encode_images(model, images)
    with pytest.raises(ValueError, match="image 1"):
        inference.encode_images(model, [images[0], b"not an image"], pooling="cls")
    with pytest.raises(ValueError, match="pooling"):
        inference.encode_texts(model, TEXTS, tokenizer=tok, pooling="first")
    with pytest.raises(ValueError, match="sequence of strings"):
        inference.encode_texts(model, "a red square", tokenizer=tok)


def test_dynamic_tiles_match_transformers(setup):
    tok, ckpt, model, images = setup
    builder = PromptBuilder(tok, ckpt.num_image_tokens, "plain")
    tiles = [preprocess.dynamic_tiles(im, ckpt.image_size, 1, 6) for im in images]
    assert sorted({len(t) for t in tiles}) != [1]  # some images really get several tiles
    want = np.concatenate([_torch_lm_multi(ckpt, builder.prompt_ids("<image>", len(t)), t) for t in tiles])
    got = inference.encode_images(model, images, tokenizer=tok, max_tiles=6, batch_size=4)  # + 1 padding row
    np.testing.assert_allclose(got, want, atol=ATOL)


def _torch_lm_multi(ckpt, seq, tiles):
    """Last-token embedding of one sequence whose image block holds all `tiles` float[N, S, S, 3]."""
    with torch.no_grad():
        hidden = ckpt.model.model(input_ids=torch.tensor([seq]),
                                  pixel_values=torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous())
    return _unit(hidden.last_hidden_state[0, -1:].numpy())


def test_bucket_pow2():
    assert [inference.bucket_pow2(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert [inference.bucket_pow2(n, minimum=16) for n in (1, 16, 17)] == [16, 16, 32]
