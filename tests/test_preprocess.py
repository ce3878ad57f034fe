"""Dynamic tiling against transformers' GotOcr2 image processor (PIL backend, the same bicubic resize as the
original InternVL `load_image`), plus colour modes and bad input."""

import io

import numpy as np
import PIL.Image
import pytest

from vlm_jax.data import preprocess

# Same PIL resize on the same uint8 pixels on both sides: only float rounding of /255 and mean/std differs
# (transformers rescales in float64, we in float32), so 1e-5 in normalised units (~1/400 of a grey level).
ATOL = 1e-5


def _hf_processor(image_size, min_tiles=1, max_tiles=12, crop=True):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(
        crop_to_patches=crop,
        size={"height": image_size, "width": image_size},
        min_patches=min_tiles,
        max_patches=max_tiles,
        image_mean=list(preprocess.IMAGENET_MEAN),
        image_std=list(preprocess.IMAGENET_STD),
        do_rescale=True,
        do_normalize=True,
    )


def _hf_tiles(processor, image):
    out = processor(images=[image], return_tensors="np")
    return np.transpose(out["pixel_values"], (0, 2, 3, 1)), int(out["num_patches"][0])


def _textured(width, height, seed=0):
    """Smooth gradients plus noise: resampling differences and tile-order mistakes both show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / max(width, 1), y * 255.0 / max(height, 1), (x + y) % 97 * 2.6], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _square_tie_sides(image_size):
    """Square images sit on an exact tie between 1x1, 2x2, 3x3 grids; the tie rule flips at area = 2*S^2."""
    threshold = int(np.floor(np.sqrt(2.0) * image_size))
    return [threshold, threshold + 1]


S = 16  # small tiles keep the test fast; one case below runs at the real 448
CASES = [
    (100, 10),   # very wide -> 12x1-ish grids
    (10, 100),   # very tall
    (3, 5),      # tiny
    (1, 1),      # single pixel
    (37, 23),    # odd ratio
    (64, 32),    # exact 2:1 tie between 2x1 and 4x2
    (16, 16),    # square, below the tie threshold -> 1 tile
    (500, 333),  # large
    (40, 30),
    (30, 45),
    (13, 12),
] + [(s, s) for s in _square_tie_sides(S)]


@pytest.mark.parametrize("width,height", CASES)
def test_dynamic_tiles_matches_transformers(width, height):
    image = _textured(width, height, seed=width * 1000 + height)
    want, n_want = _hf_tiles(_hf_processor(S), image)
    got = preprocess.dynamic_tiles(image, image_size=S)
    assert got.dtype == np.float32
    assert got.shape == (n_want, S, S, 3), (got.shape, n_want)
    assert preprocess.num_tiles(width, height, image_size=S) == n_want
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_square_tie_rule_flips_at_threshold():
    below, above = _square_tie_sides(S)
    assert preprocess.dynamic_tiles(_textured(below, below), image_size=S).shape[0] == 1
    assert preprocess.dynamic_tiles(_textured(above, above), image_size=S).shape[0] == 5  # 2x2 + thumbnail


def test_min_max_tiles_and_no_thumbnail():
    image = _textured(90, 20)
    want, n = _hf_tiles(_hf_processor(S, min_tiles=2, max_tiles=6), image)
    got = preprocess.dynamic_tiles(image, image_size=S, min_tiles=2, max_tiles=6)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    no_thumb = preprocess.dynamic_tiles(image, image_size=S, min_tiles=2, max_tiles=6, use_thumbnail=False)
    np.testing.assert_allclose(no_thumb, want[:-1], atol=ATOL, rtol=0)


def test_real_size_448():
    image = _textured(1100, 700)
    want, n = _hf_tiles(_hf_processor(448), image)
    got = preprocess.dynamic_tiles(image)
    assert n > 1 and got.shape == (n, 448, 448, 3)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_single_tile_matches_transformers_without_cropping():
    image = _textured(70, 30)
    want, n = _hf_tiles(_hf_processor(S, crop=False), image)
    got = preprocess.single_tile(image, S)
    assert n == 1 and got.shape == (S, S, 3)
    np.testing.assert_allclose(got, want[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P_transparent", "CMYK", "I;16"])
def test_colour_modes_match_transformers(mode):
    rgb = _textured(40, 24)
    if mode == "P_transparent":
        image = rgb.convert("P")
        image.info["transparency"] = 0
    elif mode in ("LA", "RGBA"):
        image = rgb.convert(mode)
        alpha = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (24, 1))
        image.putalpha(PIL.Image.fromarray(alpha))
    elif mode == "I;16":
        image = PIL.Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 3)
    else:
        image = rgb.convert(mode)
    if mode == "I;16":
        # PIL would clip 16-bit values to 255: refuse rather than return a washed-out image.
        with pytest.raises(ValueError, match="16-bit"):
            preprocess.dynamic_tiles(image, image_size=S)
        return
    want, _ = _hf_tiles(_hf_processor(S), image)
    np.testing.assert_allclose(preprocess.dynamic_tiles(image, image_size=S), want, atol=ATOL, rtol=0)


def test_exif_rotation_is_applied():
    upright = _textured(40, 20)  # wide once rotated back
    stored = upright.transpose(PIL.Image.Transpose.ROTATE_90)  # what a camera writes: tall pixels + tag
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    got = preprocess.dynamic_tiles(buf.getvalue(), image_size=S)
    want, _ = _hf_tiles(_hf_processor(S), upright)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_load_from_path_and_array(tmp_path):
    image = _textured(30, 20)
    path = tmp_path / "x.png"
    image.save(path)
    from_path = preprocess.dynamic_tiles(str(path), image_size=S)
    from_array = preprocess.dynamic_tiles(np.asarray(image), image_size=S)
    np.testing.assert_array_equal(from_path, from_array)


def test_bad_inputs_name_the_item(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        preprocess.load_image(str(tmp_path / "missing.png"))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="junk.jpg.*unreadable"):
        preprocess.load_image(str(junk))
    buf = io.BytesIO()
    _textured(64, 64).save(buf, format="JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="cut.jpg.*truncated"):
        preprocess.load_image(str(cut))
    with pytest.raises(ValueError, match="image 7.*zero-size"):
        preprocess.dynamic_tiles(np.zeros((0, 5, 3), np.uint8), image_size=S, name="image 7")
    with pytest.raises(ValueError, match="zero-size"):
        preprocess.single_tile(PIL.Image.new("RGB", (0, 4)), S)
    with pytest.raises(ValueError, match="uint8"):
        preprocess.load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="min_tiles"):
        preprocess.dynamic_tiles(_textured(8, 8), image_size=S, min_tiles=3, max_tiles=2)


def test_grid_choice_matches_transformers_over_many_sizes():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    sizes = [(w, h) for w in range(1, 70, 3) for h in range(1, 70, 4)] + [(s, s) for s in range(1, 70)]
    for min_tiles, max_tiles in [(1, 12), (1, 6), (3, 9)]:
        for w, h in sizes:
            want = get_optimal_tiled_canvas((h, w), (S, S), min_tiles, max_tiles)
            assert preprocess.choose_grid(w, h, S, min_tiles, max_tiles) == tuple(want), (w, h, min_tiles)
