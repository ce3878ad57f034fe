"""`spatial_shapes`: a procedural dataset of coloured shapes and their spatial relations (no download).

Each image shows 2-4 objects, each a colour (red, green, blue, yellow, purple, orange) and a shape (circle, square,
triangle, cross), on a grey textured background. Colour+shape is unique within an image, so a caption names its
objects unambiguously. With probability `nest_probability` one object is drawn inside a larger one of another
colour (a nested pair), so that "inside" and "outside" occur about as often as the four directions. Objects that are
not nested never overlap, and a nested inner object lies in the central half of its outer object, so every object's
box is the tight bounding box of its visible pixels.

Images are square (`image_size` pixels a side) unless `aspect_ratios` is set: then each image draws its aspect ratio
r = width / height uniformly from that tuple (with its own seeded rng), its short side is `image_size` and its long
side round(image_size * max(r, 1/r)) (64 px, W x H: r = 2 gives 128 x 64, r = 0.5 64 x 128), so InternVL's
dynamic tiling (tiles chosen by the aspect ratio) has something to do. Object sizes are fractions of the short side
(objects look the same in every image), positions cover the whole width and height, and nesting, relations and the
choice of clear directional pairs are all decided on the pixel boxes (the real geometry); boxes are normalised by
the width (x) and the height (y). Recomputing a direction from normalised boxes of a non-square image needs them
scaled back by (W, H) first: |dx| >= |dy| in normalised units is not the same test as in pixels.

Per image, `pairs_per_image` = K ordered pairs (subject A, reference B) are chosen; for each the record stores a
caption, A's box and B's box (normalised xyxy, x right, y down, pixel-exclusive right/bottom edge: a box covering
pixel columns c0..c1 has x0 = c0 / W, x1 = (c1 + 1) / W) and the label `relations.relation_from_boxes(A, B)`.
A nested image always contributes its nested pair (in a random direction); directional pairs are only chosen when
their dominant axis is clear (|dx| and |dy| of the centres differ by 25 % or more), so labels are never ties.

Captions ("the red circle is left of the blue square"):
    left "is left of", right "is right of", above "is above", below "is below", inside "is inside",
    outside "is around" ("the red square is around the blue circle": B's box within A's).

Record (the schema shared with `coco_captions` and `refcoco`, see `datasets/__init__.py`):
    image            PNG, uint8[S, S, 3]; with `aspect_ratios`, uint8[H, W, 3] (min(H, W) = S)
    image_id         int64, unique within a split (the example's index)
    captions         text[K]
    boxes            float32[K, 4]  subject box, normalised xyxy
    reference_boxes  float32[K, 4]  reference box, normalised xyxy
    relations        int32[K]       index into RELATIONS
    has_box, has_relation  bool[K]  all True here
    subjects, references   text[K]  "red circle" ...
    object_names     text[N], object_boxes float32[N, 4]   every object in the image (N = 2..4): with `subjects` and
                     `references` they decide which captions are true of which images (`vlm_jax.caption_truth`)

Configs: "default" (224 px, 4000/500/500 images, K = 2) and "tiny" (64 px, 256/64/64). Other sizes:
`SpatialShapes(config=make_config(image_size=..., num_train=...), data_dir=...)`; the config name is derived from
the parameters so different parameters never share a cache directory (`aspect_ratios=(1, 2, 0.5)` adds
"_a1-2-0.5"; the default () adds nothing, and its images are exactly those of the square builder). Everything is a
function of `seed`: image i of a split is drawn from `np.random.default_rng((seed, split_code, i))`.

Chance levels (what a model that ignores the input scores; measured numbers are for the test splits):
    Retrieval R@K: a random ranking over C candidates puts a given match in the top K with probability K / C
        (image->text with M matching captions among C: about 1 - (1 - K/C)^M ~ M*K/C). "default" (500 images,
        1000 captions): text->image R@1 = 0.2 %, R@5 = 1 %, R@10 = 2 %; image->text (M = 2) about the same.
        "tiny" (64 images, 128 captions): text->image R@1 = 1.6 %, R@5 = 7.8 %, R@10 = 15.6 %.
        Captions can repeat across images (73 % of the "default" test captions occur once, the most repeated
        one 3 times; 97 % on "tiny"), and a caption of one image is often true of others ("the red circle is left
        of the blue square" holds wherever such a pair stands so): by `vlm_jax.caption_truth`, 60 % of the
        captions are true of more than one image of their 500-image split (0.9-1.0 other images on average).
        Only its own image counts in the strict protocol (`t2i_r1`), so its best expected R@1 (an oracle that
        knows which images each caption is true of, ties broken at random: `metrics.retrieval_ceilings`, reported
        as `ceiling/t2i_r1`, `ceiling/i2t_r1`) is, text->image / image->text: "default" validation 65.5 / 63.6 %,
        test 65.4 / 64.3 %; the demo's 64 px config (4000/500/500) validation 65.8 / 64.3 %, test 65.5 / 64.1 %.
        `t2i_r1_true` / `i2t_r1_true` count a hit on any image the caption is true of (ceiling 100 %).
        `python experiments/retrieval_oracles.py` recomputes these, with two partial oracles.
    Matching (ITM): balanced accuracy and AUC are 0.5 for a constant score.
    Spatial accuracy (the same labels whether the head reads the caption or "the A and the B" and the image): a
        constant predictor scores the frequency of the label it predicts. Measured label shares on
        "default": left 17.1 %, right 15.9 %, above 15.9 %, below 17.2 %, inside 15.9 %, outside 18.0 % (majority
        baseline 18 %, uniform guessing 16.7 %, macro-F1 of a constant predictor about 0.05); on the small "tiny"
        test split (128 labels): 19.5 / 22.7 / 19.5 / 12.5 / 10.9 / 14.8 % (majority baseline 22.7 %).
    Box IoU: predicting the mean box for every caption gives mean IoU 0.087 on "default" and 0.061 on "tiny";
        `box_ops.box_iou_paired(boxes, boxes.mean(0))[0].mean()` computes it for any set of boxes.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import PIL.Image
import PIL.ImageDraw
import tensorflow_datasets as tfds

from vlm_jax.data.datasets import builder
from vlm_jax.data.datasets import relations as rel

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
OBJECT_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # every object name: a class vocabulary
CAPTION_VERBS = ("is left of", "is right of", "is above", "is below", "is inside", "is around")
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}

# Fractions of the image side.
_OBJECT_SIZE = (0.15, 0.35)
_OUTER_SIZE = (0.35, 0.55)
_INNER_FRACTION = (0.25, 0.45)  # inner side / outer side; the inner box lies in the outer's central half
_MIN_PIXELS = 6


@dataclasses.dataclass(eq=False)
class SpatialShapesConfig(tfds.core.BuilderConfig):
    """Sizes and sampling parameters. Use `make_config` for custom values (it names the config)."""

    image_size: int = 224
    num_train: int = 4000
    num_validation: int = 500
    num_test: int = 500
    pairs_per_image: int = 2
    min_objects: int = 2
    max_objects: int = 4
    nest_probability: float = 0.5
    seed: int = 0
    # Width / height ratios drawn uniformly per image (short side image_size); () = square images.
    aspect_ratios: tuple[float, ...] = ()

    def __post_init__(self):
        self.aspect_ratios = _check_aspect_ratios(self.aspect_ratios)
        if self.image_size < 32:
            raise ValueError(f"spatial_shapes: image_size must be >= 32, got {self.image_size}")
        if not 2 <= self.min_objects <= self.max_objects <= len(COLOURS) * len(SHAPES):
            raise ValueError(f"spatial_shapes: need 2 <= min_objects <= max_objects, got "
                             f"{self.min_objects}, {self.max_objects}")
        if not 1 <= self.pairs_per_image <= self.min_objects * (self.min_objects - 1):
            raise ValueError(f"spatial_shapes: pairs_per_image must be in [1, min_objects*(min_objects-1)] = "
                             f"[1, {self.min_objects * (self.min_objects - 1)}], got {self.pairs_per_image}")
        if self.max_objects > 4 and self.image_size < 96:
            raise ValueError("spatial_shapes: more than 4 objects need image_size >= 96")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


_MAX_ASPECT = 4.0  # the long side is at most this many times image_size


def _check_aspect_ratios(ratios) -> tuple[float, ...]:
    """`aspect_ratios` as a tuple of floats, each finite, > 0 and within [1 / _MAX_ASPECT, _MAX_ASPECT]."""
    if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__"):
        raise ValueError(f"spatial_shapes: aspect_ratios must be a tuple of width / height ratios, got {ratios!r}")
    out = []
    for r in ratios:
        if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, float, np.integer, np.floating)):
            raise ValueError(f"spatial_shapes: aspect_ratios must hold numbers (width / height), got {r!r} in "
                             f"{ratios!r}")
        r = float(r)
        if not (np.isfinite(r) and r > 0 and max(r, 1 / r) <= _MAX_ASPECT):
            raise ValueError(f"spatial_shapes: every aspect_ratios entry (width / height) must be finite and in "
                             f"[1/{_MAX_ASPECT:g}, {_MAX_ASPECT:g}] (long side <= {_MAX_ASPECT:g} x image_size), "
                             f"got {r!r} in {tuple(ratios)!r}")
        out.append(r)
    return tuple(out)


def _ratio_text(r: float) -> str:
    """Shortest exact text of a ratio for config names: 2.0 -> "2", 0.5 -> "0.5"."""
    text = repr(float(r))
    return text[:-2] if text.endswith(".0") else text


def image_shape(image_size: int, ratio: float | None) -> tuple[int, int]:
    """(height, width) of an image with short side `image_size` and width / height `ratio` (None: square)."""
    if ratio is None or ratio == 1:
        return image_size, image_size
    long = int(round(image_size * max(ratio, 1 / ratio)))
    return (image_size, long) if ratio > 1 else (long, image_size)


def make_config(name: str | None = None, **params) -> SpatialShapesConfig:
    """A config with `params` overriding the defaults; by default named after the parameters."""
    if name is None:
        merged = dataclasses.replace(SpatialShapesConfig(name="x"), **params)
        name = (f"s{merged.image_size}_n{merged.num_train}-{merged.num_validation}-{merged.num_test}"
                f"_k{merged.pairs_per_image}_o{merged.min_objects}-{merged.max_objects}"
                f"_p{round(merged.nest_probability * 100)}_seed{merged.seed}")
        if merged.aspect_ratios:
            name += "_a" + "-".join(_ratio_text(r) for r in merged.aspect_ratios)
    return SpatialShapesConfig(name=name, description="custom spatial_shapes config", **params)


# ---------------------------------------------------------------------------------------------------------------
# Drawing.


def _shape_mask(shape: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """bool[H, W] (`size` = (W, H), as PIL): the pixels of `shape` drawn (aliased) in the inclusive pixel box
    (c0, r0, c1, r1)."""
    mask = PIL.Image.new("L", size, 0)
    draw = PIL.ImageDraw.Draw(mask)
    c0, r0, c1, r1 = box
    w, h = c1 - c0, r1 - r0
    if shape == "circle":
        draw.ellipse((c0, r0, c1, r1), fill=255)
    elif shape == "square":
        draw.rectangle((c0, r0, c1, r1), fill=255)
    elif shape == "triangle":
        draw.polygon([(c0 + w / 2, r0), (c1, r1), (c0, r1)], fill=255)
    elif shape == "cross":
        t0, t1 = round(w / 3), round(2 * w / 3)
        u0, u1 = round(h / 3), round(2 * h / 3)
        draw.rectangle((c0 + t0, r0, c0 + t1, r1), fill=255)
        draw.rectangle((c0, r0 + u0, c1, r0 + u1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(mask) > 0


def _pixel_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight inclusive pixel box (c0, r0, c1, r1) of a non-empty mask."""
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8[H, W, 3] grey texture (R = G = B), so no background pixel has an object's colour. Cells are sized by
    the short side; the long side gets as many more as it needs (a square image draws exactly as it always has)."""
    short = min(height, width)
    cells = max(4, short // 16)
    block = short // cells + 1
    cells_h, cells_w = (max(cells, -(-n // block)) for n in (height, width))
    coarse = rng.integers(95, 165, size=(cells_h, cells_w))
    grey = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]
    # Fine grain in 2x2-pixel blocks: per-pixel noise would triple the PNG size and encoding time.
    fine = np.kron(rng.integers(-12, 13, size=(height // 2 + 1, width // 2 + 1)), np.ones((2, 2), np.int64))
    grey = np.clip(grey + fine[:height, :width], 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------------------------------------------------
# Scene sampling.


@dataclasses.dataclass
class _Object:
    name: str  # "red circle"
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # requested inclusive pixel box; the stored box is the tight box of the mask


def _disjoint(a, b, gap: int = 2) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def _random_box(rng, height: int, width: int, side: int) -> tuple[int, int, int, int]:
    c0 = int(rng.integers(0, width - side + 1))
    r0 = int(rng.integers(0, height - side + 1))
    return c0, r0, c0 + side - 1, r0 + side - 1


def _side(rng, lo: float, hi: float, reference: int) -> int:
    return max(_MIN_PIXELS, int(round(rng.uniform(lo, hi) * reference)))


def _sample_layout(rng, config: SpatialShapesConfig, num_objects: int, nested: bool, height: int,
                   width: int) -> list[tuple] | None:
    """Pixel boxes for the objects, the first two nested (outer, inner) when `nested`; None when placement fails.
    Sides are fractions of the short side (`image_size`); positions cover the whole height x width."""
    size = config.image_size
    boxes = []
    if nested:
        outer_side = _side(rng, *_OUTER_SIZE, size)
        outer = _random_box(rng, height, width, outer_side)
        inner_side = max(_MIN_PIXELS, min(outer_side // 2 - 2, _side(rng, *_INNER_FRACTION, outer_side)))
        # Central half of the outer box, away from its edges (where the outer shape's extreme pixels are).
        lo_c, hi_c = outer[0] + outer_side // 4 + 1, outer[0] + (3 * outer_side) // 4 - 1 - inner_side
        lo_r, hi_r = outer[1] + outer_side // 4 + 1, outer[1] + (3 * outer_side) // 4 - 1 - inner_side
        if hi_c < lo_c or hi_r < lo_r:
            return None
        c0, r0 = int(rng.integers(lo_c, hi_c + 1)), int(rng.integers(lo_r, hi_r + 1))
        boxes = [outer, (c0, r0, c0 + inner_side - 1, r0 + inner_side - 1)]
    while len(boxes) < num_objects:
        for _ in range(50):
            box = _random_box(rng, height, width, _side(rng, *_OBJECT_SIZE, size))
            if all(_disjoint(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _clear_direction(a, b) -> bool:
    dx = abs((a[0] + a[2]) - (b[0] + b[2]))
    dy = abs((a[1] + a[3]) - (b[1] + b[3]))
    return max(dx, dy) >= rel.CLEAR_AXIS_MARGIN * min(dx, dy) and max(dx, dy) > 0


def generate_example(config: SpatialShapesConfig, split: str, index: int) -> dict:
    """The record for image `index` of `split` (deterministic), with `image` as uint8[H, W, 3] (S x S without
    `aspect_ratios`). Relations and pair choice use the pixel boxes; stored boxes are normalised by W and H."""
    rng = np.random.default_rng((config.seed, SPLIT_CODES[split], index))
    ratio = None  # square: no draw, so the square images are exactly those of the builder before aspect_ratios
    if config.aspect_ratios:
        ratio = config.aspect_ratios[int(rng.integers(len(config.aspect_ratios)))]
    height, width = image_shape(config.image_size, ratio)
    k = config.pairs_per_image
    for _ in range(1000):
        num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
        nested = bool(rng.random() < config.nest_probability)
        layout = _sample_layout(rng, config, num_objects, nested, height, width)
        if layout is None:
            continue
        kinds = rng.choice(len(COLOURS) * len(SHAPES), size=num_objects, replace=False)
        if nested and kinds[0] // len(SHAPES) == kinds[1] // len(SHAPES):
            continue  # an inner object of its outer object's colour would be invisible
        colours = list(COLOURS)
        objects = []
        for kind, box in zip(kinds, layout):
            colour, shape = colours[kind // len(SHAPES)], SHAPES[kind % len(SHAPES)]
            objects.append(_Object(f"{colour} {shape}", colour, shape, box))
        # Draw (outer before inner: layout order) and take the tight pixel box of each object's own mask.
        pixels = _background(rng, height, width)
        tight = []
        for obj in objects:
            mask = _shape_mask(obj.shape, (width, height), obj.box)
            pixels[mask] = COLOURS[obj.colour]
            tight.append(_pixel_box(mask))
        pairs = _choose_pairs(rng, tight, nested, k)
        if pairs is None:
            continue
        break
    else:
        raise ValueError(f"spatial_shapes: could not sample image {index} of {split!r} for config {config.name!r}")

    def norm(b):
        return [b[0] / width, b[1] / height, (b[2] + 1) / width, (b[3] + 1) / height]

    boxes, refs, labels, captions, subjects, references = [], [], [], [], [], []
    for i, j in pairs:
        label = rel.relation_from_boxes(tight[i], tight[j])  # pixel boxes: the real geometry
        boxes.append(norm(tight[i]))
        refs.append(norm(tight[j]))
        labels.append(label)
        subjects.append(objects[i].name)
        references.append(objects[j].name)
        captions.append(f"the {objects[i].name} {CAPTION_VERBS[label]} the {objects[j].name}")
    return {
        "image": pixels,
        "image_id": index,
        "captions": captions,
        "boxes": np.asarray(boxes, np.float32),
        "reference_boxes": np.asarray(refs, np.float32),
        "relations": np.asarray(labels, np.int32),
        "has_box": np.ones(k, bool),
        "has_relation": np.ones(k, bool),
        "subjects": subjects,
        "references": references,
        "object_names": [o.name for o in objects],
        "object_boxes": np.asarray([norm(b) for b in tight], np.float32),
    }


def _choose_pairs(rng, boxes, nested: bool, k: int) -> list[tuple[int, int]] | None:
    """K distinct ordered pairs: the nested pair first (random direction) when there is one, then clear
    directional pairs; the reverse nested pair only when no directional pair is left. None if fewer than K."""
    n = len(boxes)
    nested_pairs = [(1, 0), (0, 1)] if nested else []
    if nested_pairs and rng.random() < 0.5:
        nested_pairs.reverse()
    directional = [(i, j) for i in range(n) for j in range(n) if i != j and not (nested and {i, j} == {0, 1})]
    directional = [p for p in directional if _clear_direction(boxes[p[0]], boxes[p[1]])]
    order = rng.permutation(len(directional))
    candidates = nested_pairs[:1] + [directional[o] for o in order] + nested_pairs[1:]
    if len(candidates) < k:
        return None
    return candidates[:k]


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class SpatialShapes(builder.LocalBuilder):
    """Procedural coloured shapes with captions, subject boxes and spatial relations."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        SpatialShapesConfig(name="default", description="224 px, 4000/500/500 images, 2 captions per image"),
        SpatialShapesConfig(name="tiny", description="64 px, 256/64/64 images, for tests and the CPU demo",
                            image_size=64, num_train=256, num_validation=64, num_test=64),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        k = c.pairs_per_image
        shape = (None, None, 3) if c.aspect_ratios else (c.image_size, c.image_size, 3)
        feats = builder.record_features(k, shape, "png")
        feats.update({
            "subjects": tfds.features.Sequence(tfds.features.Text(), length=k),
            "references": tfds.features.Sequence(tfds.features.Text(), length=k),
            "object_names": tfds.features.Sequence(tfds.features.Text()),
            "object_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        })
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(feats),
            homepage="https://github.com/",  # generated locally; no source to link
            metadata=tfds.core.MetadataDict(num_skipped_records=0),
            disable_shuffling=True,  # records in generation order; the pipeline shuffles
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n) for split, n in self.builder_config.split_sizes().items()}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
        for index in range(num_examples):
            example = generate_example(self.builder_config, split, index)
            example["image"] = encode_png(example["image"])
            yield index, example

