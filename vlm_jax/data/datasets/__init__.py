"""tfds builders for the data pipeline, and the record schema they share.

Builders (import the module to register it with tfds; all write array_record files and are read with
`tfds.data_source`, which works without TensorFlow):
    spatial_shapes.SpatialShapes   procedural shapes with captions, boxes and spatial relations (no download)
    coco_captions.CocoCaptions     COCO captions, Karpathy splits, from files in `manual_dir`
    refcoco.RefCoco                RefCOCO-style referring expressions, from JSON files in `manual_dir`

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

import numpy as np
import tensorflow_datasets as tfds
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


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """GeneratorBasedBuilder defaulting to array_record files, for builders that live in this package."""

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    # tfds locates a builder's source through importlib_resources, which is not a dependency here and fails for
    # editable installs; the module file is the answer it is looking for.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        import inspect  # pylint: disable=g-import-not-at-top
        return epath.Path(inspect.getfile(cls))
