"""Image loading and InternVL dynamic tiling.

An image becomes `float32[N, S, S, 3]` (NHWC, ImageNet-normalised): the aspect-ratio grid search of InternVL's
`dynamic_preprocess` (equal to transformers' `GotOcr2ImageProcessor(crop_to_patches=True)`), tiles in row-major
order and, when there is more than one tile, a thumbnail of the whole image last.

Resizing is PIL bicubic on uint8 RGB, as in the original InternVL `load_image` and transformers' PIL image
processor, so pixels agree with both to float rounding. (transformers' torchvision processor resizes float tensors
with antialiasing and differs by a few grey levels.)

Colour: every input goes through `to_rgb`: EXIF orientation applied, transparency composited onto white (as
transformers does; the original InternVL's `.convert("RGB")` drops alpha instead), grey/palette/CMYK converted.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_HIGH_BIT_DEPTH = ("I", "F")

ImageLike = Union[PIL.Image.Image, np.ndarray, str, os.PathLike, bytes]


def _describe(source, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    if isinstance(source, bytes):
        return f"image bytes ({len(source)} bytes)"
    return f"image of type {type(source).__name__}"


def load_image(source: ImageLike, *, name: str | None = None) -> PIL.Image.Image:
    """Opens `source` (path, encoded bytes, PIL image or uint8 array [H, W, C|none]) as an RGB PIL image.

    `name` (e.g. "image 3 of the batch") is used in error messages; by default the path is.
    Raises ValueError for unreadable, truncated or zero-size images.
    """
    what = _describe(source, name)
    if isinstance(source, PIL.Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_pil(source, what)
    elif isinstance(source, (str, os.PathLike, bytes)):
        try:
            handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        except OSError as e:
            raise ValueError(f"{what}: cannot open ({e})") from e
        try:
            with handle:
                image = PIL.Image.open(handle)
                image.load()  # decode now so truncated files fail here, naming the item
        except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as e:
            raise ValueError(f"{what}: unreadable or truncated image ({e})") from e
    else:
        raise ValueError(f"{what}: expected a PIL image, uint8 array, path or bytes")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{what}: zero-size image ({image.width}x{image.height})")
    if image.mode in _HIGH_BIT_DEPTH or image.mode.startswith("I;16"):
        # PIL's RGB conversion clips these to 0..255, which silently whitens most 16-bit images.
        raise ValueError(f"{what}: {image.mode!r} (16-bit/32-bit/float) images are not supported; "
                         "scale to 8-bit first")
    return to_rgb(image)


def _array_to_pil(array: np.ndarray, what: str) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"{what}: expected an array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"{what}: expected a uint8 array (0..255), got {array.dtype}")
    if 0 in array.shape[:2]:
        raise ValueError(f"{what}: zero-size image {array.shape}")
    return PIL.Image.fromarray(array)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """EXIF-upright RGB version of `image`; transparent pixels are composited onto white."""
    image = PIL.ImageOps.exif_transpose(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Alpha is composited rather than dropped: fully transparent pixels often hold garbage colours.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, sorted by tile count (stable, cols-major).

    The order inside one tile count only matters for exact ties between grids with the same count, which
    cannot be the best match while smaller grids are allowed; it follows transformers.
    """
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, image_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to width/height.

    On an exact tie a later (more tiles) grid wins while the image area exceeds half the canvas area, so that
    big images get more tiles and small ones are not blown up.
    """
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8[..., 3] -> float32[..., 3]: /255 then ImageNet mean/std."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def _resize(image: PIL.Image.Image, width: int, height: int) -> np.ndarray:
    """uint8[height, width, 3], PIL bicubic (the filter InternVL's `Image.resize` defaults to for RGB)."""
    return np.asarray(image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC))


def dynamic_tiles(
    image: ImageLike,
    image_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    *,
    name: str | None = None,
) -> np.ndarray:
    """InternVL dynamic tiling: float32[N, S, S, 3], S = image_size.

    N = cols*rows tiles in row-major order (tile k is column k % cols, row k // cols), plus a thumbnail of the
    whole image last when cols*rows > 1 and `use_thumbnail`. At most max_tiles + 1 tiles.
    """
    return tiles_and_regions(image, image_size, min_tiles, max_tiles, use_thumbnail, name=name)[0]


def tiles_and_regions(image: ImageLike, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 12,
                      use_thumbnail: bool = True, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`dynamic_tiles` and float32[N, 4]: the part of the whole image each tile shows, as normalised xyxy (the
    grid's cell; the thumbnail shows all of it), so positions inside a tile map back to the whole image."""
    image = load_image(image, name=name)
    cols, rows = choose_grid(image.width, image.height, image_size, min_tiles, max_tiles)
    canvas = _resize(image, cols * image_size, rows * image_size)  # [rows*S, cols*S, 3]
    tiles = canvas.reshape(rows, image_size, cols, image_size, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(rows * cols, image_size, image_size, 3)
    k = np.arange(rows * cols)
    regions = np.stack([k % cols / cols, k // cols / rows, (k % cols + 1) / cols, (k // cols + 1) / rows], axis=-1)
    if use_thumbnail and rows * cols > 1:
        tiles = np.concatenate([tiles, _resize(image, image_size, image_size)[None]], axis=0)
        regions = np.concatenate([regions, [[0.0, 0.0, 1.0, 1.0]]], axis=0)
    return normalize(tiles), regions.astype(np.float32)


def num_tiles(width: int, height: int, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 12,
              use_thumbnail: bool = True) -> int:
    """Number of tiles `dynamic_tiles` returns for an image of this size (for sizing prompts without pixels)."""
    cols, rows = choose_grid(width, height, image_size, min_tiles, max_tiles)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def single_tile(image: ImageLike, image_size: int, *, name: str | None = None) -> np.ndarray:
    """The whole image resized to one tile: float32[S, S, 3] (static shapes for training)."""
    image = load_image(image, name=name)
    return normalize(_resize(image, image_size, image_size))
