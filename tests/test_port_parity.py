"""The Flax port against transformers' PyTorch InternVL on the same (randomly perturbed) weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

import fixtures  # noqa: E402
import vlm_jax  # noqa: E402
from vlm_jax.models import layers  # noqa: E402

RTOL = 1e-5


def rel_err(ours, ref, mask=None):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One reference model saved in all three layouts (same seed -> same weights)."""
    out = {}
    for layout in ("transformers", "transformers_native", "opengvlab"):
        out[layout] = fixtures.make_tiny_hf_checkpoint(tmp_path_factory.mktemp(layout), layout, seed=0)
    return out


@pytest.mark.parametrize("layout", ["transformers", "transformers_native", "opengvlab"])
def test_logits_match_transformers_padded_batch(ckpts, layout):
    ckpt = ckpts[layout]
    model = vlm_jax.load_pretrained(ckpt.path)
    assert model.image_token_id == ckpt.image_token_id
    for padding in ("left", "right"):
        px, ids, mask = fixtures.padded_batch(ckpt, num_images=(1, 2), padding=padding, seed=1)
        ref = fixtures.torch_logits(ckpt, px, ids, mask)
        out = model(pixel_values=px, input_ids=ids, attention_mask=mask)
        assert out.logits.shape == ref.shape
        assert rel_err(out.logits, ref, mask) <= RTOL, (layout, padding)


def test_vision_tower_matches_with_and_without_interpolation(ckpts):
    ckpt = ckpts["transformers"]
    model = vlm_jax.load_pretrained(ckpt.path)
    rng = np.random.default_rng(0)
    for size in (32, 48, 24):  # checkpoint size, larger and smaller grid (position embeddings resized)
        px = rng.standard_normal((2, size, size, 3)).astype(np.float32)
        with torch.no_grad():
            ref = ckpt.model.model.vision_tower(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2)).last_hidden_state
        ours = model.module.vision_hidden_states(jnp.asarray(px))
        assert ours.shape == tuple(ref.shape)
        assert rel_err(ours, ref.numpy()) <= RTOL, size


def test_full_model_at_interpolated_size(ckpts):
    ckpt = ckpts["opengvlab"]
    model = vlm_jax.load_pretrained(ckpt.path)
    # Image blocks the image blocks for 48 px tiles: (48/8/2)^2 = 9 tokens per tile.
    big = fixtures.TinyCheckpoint(**{**ckpt.__dict__, "num_image_tokens": 9, "image_size": 48})
    px, ids, mask = fixtures.padded_batch(big, num_images=(1, 1), padding="left", seed=2)
    ref = fixtures.torch_logits(ckpt, px, ids, mask)
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask)
    assert rel_err(out.logits, ref, mask) <= RTOL


def test_bicubic_matches_torch_interpolate():
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((4, 4), (6, 6)), ((7, 5), (3, 9)), ((32, 32), (16, 40))]:
        x = rng.standard_normal((h, w, 5)).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=(oh, ow),
                                              mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        ours = layers.resize_bicubic_2d(jnp.asarray(x), oh, ow)
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["transformers_native", "opengvlab"])
def test_qk_norm_rms_norm_vision_variant(tmp_path, layout):
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path, layout, seed=3,
                                               vision=dict(use_qk_norm=True, norm_type="rms_norm"))
    model = vlm_jax.load_pretrained(ckpt.path)
    assert model.config.vision.qk_norm and model.config.vision.norm_type == "rms_norm"
    px, ids, mask = fixtures.padded_batch(ckpt, num_images=(2, 1), padding="right", seed=3)
    ref = fixtures.torch_logits(ckpt, px, ids, mask)
    assert rel_err(model(pixel_values=px, input_ids=ids, attention_mask=mask).logits, ref, mask) <= RTOL


def test_tied_embeddings_and_sharded_files(tmp_path):
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path, "transformers_native", seed=4, tie_word_embeddings=True,
                                               shards=2)
    model = vlm_jax.load_pretrained(ckpt.path)
    assert model.module.lm_head is None
    px, ids, mask = fixtures.padded_batch(ckpt, num_images=(1, 1), seed=4)
    ref = fixtures.torch_logits(ckpt, px, ids, mask)
    assert rel_err(model(pixel_values=px, input_ids=ids, attention_mask=mask).logits, ref, mask) <= RTOL


def test_bfloat16_checkpoint_loads_into_requested_dtype(tmp_path):
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path, "transformers", seed=5, dtype="bfloat16")
    px, ids, mask = fixtures.padded_batch(ckpt, num_images=(1, 1), seed=5)
    ref = fixtures.torch_logits(ckpt, px, ids, mask)  # float32 model holding the bf16-rounded weights
    model = vlm_jax.load_pretrained(ckpt.path, dtype="float32")
    emb = model.module.language_model.embed_tokens[...]
    assert emb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(emb), ckpt.model.model.language_model.embed_tokens.weight.detach().numpy())
    assert rel_err(model(pixel_values=px, input_ids=ids, attention_mask=mask).logits, ref, mask) <= RTOL
    bf16 = vlm_jax.load_pretrained(ckpt.path, dtype="bfloat16")
    assert bf16.module.language_model.embed_tokens[...].dtype == jnp.bfloat16
    out = bf16(pixel_values=px, input_ids=ids, attention_mask=mask)
    assert out.hidden.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32  # logits accumulated in float32
    assert rel_err(out.logits, ref, mask) < 0.05  # bf16 compute: loose bound, catches layout bugs


def _image_prompt_batch(ckpt, tiles_per_row, padding, seed):
    """Rows `text <img> <IMG_CONTEXT> x (num_image_tokens * tiles) </img> text`, padded to one length.

    -> (input_ids int64[B, T], attention_mask int64[B, T]); row b's image block covers all its tiles.
    """
    rng = np.random.default_rng(seed)
    img, img_end = ckpt.vocab_size - 3, ckpt.vocab_size - 2
    rows = []
    for n in tiles_per_row:
        ids = list(rng.integers(0, ckpt.vocab_size - 3, size=3))
        ids += [img] + [ckpt.image_token_id] * (ckpt.num_image_tokens * n) + [img_end]
        ids += list(rng.integers(0, ckpt.vocab_size - 3, size=2))
        rows.append(ids)
    length = max(len(r) for r in rows) + 2  # every row gets some padding
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        span = slice(length - len(r), length) if padding == "left" else slice(0, len(r))
        ids[b, span], mask[b, span] = r, 1
    return ids, mask


def test_mixed_tile_counts_in_one_batch_match_transformers_and_solo_rows(ckpts):
    """A 1-tile and a 7-tile image (3x2 grid + thumbnail from `dynamic_tiles`) in one batch: logits equal
    transformers' on the valid positions, and each row equals that row run alone (no image leakage across rows)."""
    from vlm_jax.data import preprocess

    ckpt = ckpts["transformers"]
    model = vlm_jax.load_pretrained(ckpt.path)
    s, max_tiles = ckpt.image_size, 6
    rng = np.random.default_rng(7)
    square = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, size=(2 * s, 3 * s, 3), dtype=np.uint8)  # H x W = 64 x 96: aspect 3:2
    counts = [preprocess.num_tiles(a.shape[1], a.shape[0], image_size=s, max_tiles=max_tiles) for a in (square, wide)]
    assert counts == [1, 7]
    tiles = [preprocess.dynamic_tiles(a, image_size=s, max_tiles=max_tiles) for a in (square, wide)]
    assert [t.shape for t in tiles] == [(1, s, s, 3), (7, s, s, 3)]
    px = np.concatenate(tiles, axis=0)  # row order: row 0's tile, then row 1's 7 tiles
    assert px.dtype == np.float32 and px.shape == (8, s, s, 3)
    for padding in ("left", "right"):
        ids, mask = _image_prompt_batch(ckpt, counts, padding, seed=7)
        ref = fixtures.torch_logits(ckpt, px, ids, mask)  # NCHW for torch
        out = np.asarray(model(pixel_values=px, input_ids=ids, attention_mask=mask).logits)
        assert out.shape == ref.shape
        assert rel_err(out, ref, mask) <= RTOL, padding
        for b, row_px in enumerate(tiles):
            solo = np.asarray(model(pixel_values=row_px, input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits)
            assert rel_err(solo, out[b:b + 1], mask[b:b + 1]) <= RTOL, (padding, b)
