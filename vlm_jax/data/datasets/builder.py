"""The record schema shared by the tfds builders, their base classes and image reading.

Builders (import the module to register it with tfds; all write array_record files and are read with
`tfds.data_source`, which works without TensorFlow):
    spatial_shapes.SpatialShapes   procedural shapes with captions, boxes and spatial relations (no download)
    coco_captions.CocoCaptions     COCO captions, Karpathy splits, from files in `manual_dir`
    refcoco.RefCoco                RefCOCO-style referring expressions, from JSON files in `manual_dir`
    coco_detection.CocoDetection   COCO detection annotations (instances_*.json), every object's name and box

Every record holds one image and K >= 1 captions (K fixed per builder config, or variable):
    image            encoded image (PNG or the source JPEG), uint8[H, W, 3] when decoded
    image_id         int64 (unique within a split)
    captions         text[K]
    boxes            float32[K, 4]  normalised xyxy box of the caption's subject (zeros when has_box is False)
    reference_boxes  float32[K, 4]  box of the reference object of the relation (zeros when has_relation is False)
    relations        int32[K]       index into relations.RELATIONS (0 when has_relation is False)
    has_box          bool[K]
    has_relation     bool[K]
Builders may add fields; the pipeline reads only these. `builder.info.metadata["num_skipped_records"]` counts the
records a real-data builder skipped with `skip_bad_records=True`.
"""

import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath


def record_features(k: int | None, image_shape=(None, None, 3), image_format: str | None = None) -> dict:
    """The shared schema as a dict of tfds features; `k` = None for a variable number of captions per record."""
    return {
        "image": tfds.features.Image(shape=image_shape, encoding_format=image_format),
        "image_id": tfds.features.Scalar(np.int64),
        "captions": tfds.features.Sequence(tfds.features.Text(), length=k),
        "boxes": tfds.features.Tensor(shape=(k, 4), dtype=np.float32),
        "reference_boxes": tfds.features.Tensor(shape=(k, 4), dtype=np.float32),
        "relations": tfds.features.Tensor(shape=(k,), dtype=np.int32),
        "has_box": tfds.features.Tensor(shape=(k,), dtype=np.bool_),
        "has_relation": tfds.features.Tensor(shape=(k,), dtype=np.bool_),
    }



def no_box_fields(k: int) -> dict:
    """The schema's box and relation fields of `k` captions that name no box and no relation (all zero / False)."""
    return {"boxes": np.zeros((k, 4), np.float32), "reference_boxes": np.zeros((k, 4), np.float32),
            "relations": np.zeros((k,), np.int32), "has_box": np.zeros((k,), bool),
            "has_relation": np.zeros((k,), bool)}

class LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """GeneratorBasedBuilder defaulting to array_record files, for builders that live in this package."""

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _create_builder_config(self, builder_config, version):
        """A config object of this builder's own config class is used as given: it is how parameterised builds
        (e.g. spatial_shapes' sizes) are made, not a mistake worth tfds' "custom data configuration" warning."""
        if isinstance(builder_config, tfds.core.BuilderConfig) and builder_config.name not in self.builder_configs:
            return builder_config
        return super()._create_builder_config(builder_config, version)

    # tfds prints these two to stdout in bold; one log line each says the same.
    def _log_download_bytes(self) -> None:
        logging.info("Building dataset %s into %s ...", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("Built dataset %s in %s", self.name, self.data_dir)

    # tfds locates a builder's source through importlib_resources, which is not a dependency here and fails for
    # editable installs; the module file is the answer it is looking for.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        import inspect  # pylint: disable=g-import-not-at-top
        return epath.Path(inspect.getfile(cls))


def read_image(path: epath.PathLike, what: str) -> bytes:
    """Encoded bytes of the image at `path`, checked by decoding it; `what` names the record in errors.

    RGB JPEG and PNG files are stored as they are; anything else (greyscale, CMYK, palette, other formats) is
    converted to RGB and re-encoded as PNG so that every stored image decodes to uint8[H, W, 3].
    Raises ValueError naming `what` and the path when the file is missing, unreadable, truncated or empty.
    """
    import io  # pylint: disable=g-import-not-at-top
    import PIL.Image  # pylint: disable=g-import-not-at-top

    path = epath.Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read image file {os.fspath(path)!r} ({e})") from e
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()  # decode fully, so truncated files fail here
            if image.width == 0 or image.height == 0:
                raise OSError(f"zero-size image {image.width}x{image.height}")
            if image.format in ("JPEG", "PNG") and image.mode == "RGB":
                return data
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"{what}: unreadable or truncated image file {os.fspath(path)!r} ({e})") from e


class BadRecords:
    """The bad-record policy of one build: raise (default) or, with `skip=True`, skip and count per split."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.per_split: dict[str, int] = {}

    def handle(self, split: str, error: ValueError) -> None:
        if not self.skip:
            raise error
        logging.warning("skipping bad record in split %r: %s", split, error)
        self.per_split[split] = self.per_split.get(split, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.per_split.values())


class ManualBuilder(LocalBuilder):
    """A builder for real data already on the user's disk (`manual_dir`), with the bad-record policy.

    `skip_bad_records=False` (default): a missing or corrupt image fails the build with the record id and the path.
    `skip_bad_records=True`: such records are skipped; `num_skipped_records` (total) and
    `info.metadata["skipped_records"]` (per split) count them, also after reloading the prepared dataset.
    """

    def __init__(self, *, skip_bad_records: bool = False, **kwargs):
        self._bad = BadRecords(skip_bad_records)
        super().__init__(**kwargs)

    def _metadata(self) -> tfds.core.MetadataDict:
        return tfds.core.MetadataDict(num_skipped_records=0, skipped_records={})

    def _record_skips(self) -> None:
        # DatasetInfo (with this metadata) is written after all splits are generated.
        self.info.metadata["num_skipped_records"] = self._bad.total
        self.info.metadata["skipped_records"] = dict(self._bad.per_split)

    @property
    def num_skipped_records(self) -> int:
        return int(self.info.metadata.get("num_skipped_records", 0))

    def _manual_file(self, dl_manager, names: tuple[str, ...], what: str) -> epath.Path:
        """The first of `names` that exists in manual_dir; ValueError listing them otherwise."""
        root = epath.Path(dl_manager.manual_dir)
        for name in names:
            if (root / name).exists():
                return root / name
        raise ValueError(f"{self.name}: expected {what} in manual_dir {os.fspath(root)!r} as one of {names}")
