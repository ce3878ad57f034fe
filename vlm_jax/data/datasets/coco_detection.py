"""`coco_detection`: COCO object detection annotations (every object of an image with its box and category), built
from files on the user's disk; also reads RefCOCO's `instances.json`, which has the same format.

Expected files in `manual_dir` (nothing is downloaded), for the default config "coco2017":
    annotations/instances_train2017.json  COCO-format annotations: "images" [{"id", "file_name", "width", "height"}],
    annotations/instances_val2017.json    "annotations" [{"id", "image_id", "category_id", "bbox": [x, y, w, h] in
                                          pixels, "iscrowd": 0|1}], "categories" [{"id", "name"}]
    annotations/captions_train2017.json   optional: COCO captions ("annotations" [{"id", "image_id", "caption"}])
    annotations/captions_val2017.json     (see captions below)
    train2017/<file_name>, val2017/<file_name>   the images as unpacked from COCO 2017
                                          (an `images/` sub-folder holding them is also accepted)
Configs "refcoco_instances", "refcocoplus_instances", "refcocog_instances": the `instances.json` of a RefCOCO-style
distribution (the file `refcoco` reads) with the COCO train2014 images in `train2014/` (or `images/`). That file
holds the annotations of the images of all the refs' splits together, so these configs have one split, "train";
the three names keep the three datasets in separate data directories.

Other files: the config field `splits` maps each split to (annotation file, image folder), both relative to
manual_dir; an image is read from `<image folder>/<file_name>`, else from `images/<file_name>`:
    CocoDetection(config=CocoDetectionConfig(name="my_split", splits={"train": ("a.json", "imgs"), ...}), ...)
The config's name names its data directory: give each custom config its own name. `max_objects` is a config
field, so the pipeline (which takes a config by name) uses the named configs' 100.

Records: one per image of the annotation file (in image id order), the shared schema of `builder.py` plus
    object_names    text[N]        category name of each non-crowd annotation, in annotation id order
    object_boxes    float32[N, 4]  its box, normalised xyxy: [x / W, y / H, (x + w) / W, (y + h) / H] from COCO's
                                   pixel bbox [x, y, w, h] and the image's width W and height H, clipped to [0, 1]
    object_labels   int32[N]       its class: the index of its category in `category_names` (below)
    annotation_ids  int64[N]       its COCO annotation id
    file_name       text           the image's path relative to manual_dir
    captions        text[K]        the image's COCO captions (in caption id order) when the annotation file has a
                                   captions file beside it (its name with "instances" replaced by "captions", e.g.
                                   captions_val2017.json); otherwise K = 1: the distinct category names of all the
                                   image's annotations (crowd ones included: the caption describes the picture),
                                   in order of first appearance by annotation id, as "person, dog and car";
                                   "no annotated objects" for an image without annotations
    boxes, reference_boxes zeros, relations 0, has_box and has_relation False (no caption refers to one box)
Crowd annotations (`iscrowd` = 1: one box around a group of objects) are left out of the objects, as COCO's
detection evaluation ignores them. Images without (non-crowd) annotations are kept with N = 0: detection
evaluation needs them. N is at most the config's `max_objects` (default 100; COCO 2017 has at most about 93 non-crowd
objects per image); the pipeline pads the objects to that size (`scene_keys`, `scene_boxes`).

Class vocabulary: after the build, `builder.info.metadata["category_names"]` lists the category names in category
id order and `["category_ids"]` their COCO ids (COCO's 80 ids run from 1 to 90 with gaps); `category_names(builder)`
returns the names as a tuple. All splits must have the same categories.

Bad records: a missing, unreadable or truncated image, an image whose size differs from the annotation file's
width/height, an annotation with a malformed bbox, a non-positive width or height, a box outside the image or a
category id not in "categories", an image without captions when the captions file exists, and an image with more
than `max_objects` objects (never truncated). The build fails with a ValueError naming the image id, the
annotation id (for an annotation's fault), the image path and the annotation file, unless the builder is made with
`skip_bad_records=True`, which skips the whole image (dropping one annotation would make its object a false
positive for a detector) and counts it (`builder.num_skipped_records`, per split in
`builder.info.metadata["skipped_records"]`). A file that is not COCO-format JSON, duplicate image ids and
annotations of images not in "images" fail the build in either case.

    builder = CocoDetection(data_dir=..., skip_bad_records=False)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/data/coco"))
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vlm_jax.data.datasets import builder

COCO_2017_SPLITS = {"train": ("annotations/instances_train2017.json", "train2017"),
                    "validation": ("annotations/instances_val2017.json", "val2017")}
REFCOCO_SPLITS = {"train": ("instances.json", "train2014")}
FALLBACK_IMAGE_DIR = "images"
NO_OBJECTS_CAPTION = "no annotated objects"


# COCO 2017's 80 detection categories in category id order (the class vocabulary of configs/internvl3_1b_detection.py;
# `category_names(builder)` reads the same list from a built dataset).
COCO_2017_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclasses.dataclass(eq=False)
class CocoDetectionConfig(tfds.core.BuilderConfig):
    """`splits`: {split: (annotation file, image folder)}, relative to manual_dir. `max_objects`: the most non-crowd
    objects an image may have (more is a bad record); the pipeline pads every image's objects to it."""

    splits: dict[str, tuple[str, str]] = dataclasses.field(default_factory=lambda: dict(COCO_2017_SPLITS))
    max_objects: int = 100

    def __post_init__(self):
        if not self.splits:
            raise ValueError("coco_detection: the config needs at least one split")
        for split, files in self.splits.items():
            if not (isinstance(files, (tuple, list)) and len(files) == 2 and all(isinstance(f, str) for f in files)):
                raise ValueError(f"coco_detection: split {split!r} must map to (annotation file, image folder), "
                                 f"got {files!r}")
        if self.max_objects < 1:
            raise ValueError(f"coco_detection: max_objects must be >= 1, got {self.max_objects}")


def category_names(dataset_builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    """The category names of a built `coco_detection` dataset in category id order (`object_labels` index them)."""
    names = (dataset_builder.info.metadata or {}).get("category_names")
    if names is None:
        raise ValueError(f"{dataset_builder.name}: no category names in the dataset's metadata; build it first "
                         f"(download_and_prepare) into {dataset_builder.data_dir!r}")
    return tuple(names)


def join_names(names: list[str]) -> str:
    """"person", "person and dog", "person, dog and car"; NO_OBJECTS_CAPTION for none."""
    if not names:
        return NO_OBJECTS_CAPTION
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _normalised_box(bbox, width: int, height: int, what: str) -> list[float]:
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected bbox [x, y, w, h], got {bbox!r}") from e
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"{what}: bbox {bbox!r} is not finite")
    if w <= 0 or h <= 0:
        raise ValueError(f"{what}: bbox {bbox!r} has a non-positive width or height")
    box = [min(1.0, max(0.0, v)) for v in (x / width, y / height, (x + w) / width, (y + h) / height)]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{what}: bbox {bbox!r} lies outside the {width}x{height} image")
    return box


@dataclasses.dataclass
class _Split:
    """One split's parsed annotation file."""

    name: str
    annotation_file: str  # relative to manual_dir, for messages
    image_dir: str
    images: list[dict]  # sorted by id
    annotations: dict[int, list[dict]]  # image id -> annotations sorted by id
    captions: dict[int, list[str]] | None  # image id -> captions, None without a captions file
    captions_file: str | None


class CocoDetection(builder.ManualBuilder):
    """COCO detection annotations: every non-crowd object of an image with its category and box."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    BUILDER_CONFIGS = [
        CocoDetectionConfig(name="coco2017", description="COCO 2017 train / val detection annotations"),
        *(CocoDetectionConfig(name=f"{n}_instances", splits=dict(REFCOCO_SPLITS),
                              description=f"{n}'s instances.json (all its images) as one train split")
          for n in ("refcoco", "refcocoplus", "refcocog")),
    ]
    DEFAULT_CONFIG_NAME = "coco2017"

    def _metadata(self) -> tfds.core.MetadataDict:
        metadata = super()._metadata()
        metadata.update(category_names=[], category_ids=[])
        return metadata

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                **builder.record_features(None),
                "file_name": tfds.features.Text(),
                "object_names": tfds.features.Sequence(tfds.features.Text()),
                "object_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                "object_labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "annotation_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            }),
            homepage="https://cocodataset.org/",
            metadata=self._metadata(),
            disable_shuffling=True,  # records in image id order; the pipeline shuffles
        )

    def _split_generators(self, dl_manager):
        root = epath.Path(dl_manager.manual_dir)
        splits, categories = {}, None
        for split, (annotation_file, image_dir) in self.builder_config.splits.items():
            path = self._manual_file(dl_manager, (annotation_file,), f"the {split!r} annotations")
            parsed, split_categories = self._parse(split, path, annotation_file, image_dir)
            if categories is None:
                categories, first = split_categories, annotation_file
            elif split_categories != categories:
                raise ValueError(f"coco_detection: the categories of {annotation_file} differ from those of {first}; "
                                 f"all splits must share one class vocabulary")
            splits[split] = parsed
        ids = sorted(categories)
        self._labels = {c: i for i, c in enumerate(ids)}
        self._categories = categories
        self.info.metadata["category_names"] = [categories[c] for c in ids]
        self.info.metadata["category_ids"] = ids
        return {split: self._generate_examples(parsed, root) for split, parsed in splits.items()}

    def _parse(self, split: str, path: epath.Path, annotation_file: str, image_dir: str
               ) -> tuple[_Split, dict[int, str]]:
        """The split's images, annotations by image and captions; its categories {id: name}."""
        try:
            data = json.loads(path.read_text())
            categories = {}
            for c in data["categories"]:
                if int(c["id"]) in categories:
                    raise ValueError(f"category id {c['id']} appears twice")
                categories[int(c["id"])] = str(c["name"])
            images = sorted(data["images"], key=lambda im: int(im["id"]))
            annotations = collections.defaultdict(list)
            for a in data["annotations"]:
                annotations[int(a["image_id"])].append(a)
            for anns in annotations.values():
                anns.sort(key=lambda a: int(a["id"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"coco_detection: {os.fspath(path)} is not a COCO instances file ({e!r:.300})") from e
        image_ids = [int(im["id"]) for im in images]
        if len(set(image_ids)) != len(image_ids):
            dup = next(i for i, n in collections.Counter(image_ids).items() if n > 1)
            raise ValueError(f"coco_detection: image id {dup} appears twice in {os.fspath(path)}")
        orphans = sorted(set(annotations) - set(image_ids))
        if orphans:
            raise ValueError(f"coco_detection: annotation {annotations[orphans[0]][0].get('id')} in "
                             f"{os.fspath(path)} is of image id {orphans[0]}, which is not in its 'images'")
        captions, captions_file = None, None
        if path.name.startswith("instances"):
            captions_path = path.parent / path.name.replace("instances", "captions", 1)
            if captions_path.exists():
                captions_file = os.path.join(os.path.dirname(annotation_file), captions_path.name)
                captions = collections.defaultdict(list)
                try:
                    entries = json.loads(captions_path.read_text())["annotations"]
                    for c in sorted(entries, key=lambda c: int(c["id"])):
                        captions[int(c["image_id"])].append(str(c["caption"]).strip())
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    raise ValueError(f"coco_detection: {os.fspath(captions_path)} is not a COCO captions file "
                                     f"({e!r:.300})") from e
        return _Split(split, annotation_file, image_dir, images, annotations, captions, captions_file), categories

    def _generate_examples(self, split: _Split, root: epath.Path) -> Iterator[tuple[int, dict]]:
        for meta in split.images:
            try:
                example = self._example(split, meta, root)
            except ValueError as e:
                self._bad.handle(split.name, e)
                continue
            yield example["image_id"], example
        self._record_skips()

    def _example(self, split: _Split, meta: dict, root: epath.Path) -> dict:
        import PIL.Image  # pylint: disable=g-import-not-at-top

        image_id = int(meta["id"])
        file_name = str(meta.get("file_name", ""))
        folder = split.image_dir
        if not (root / folder / file_name).exists() and (root / FALLBACK_IMAGE_DIR / file_name).exists():
            folder = FALLBACK_IMAGE_DIR
        path = root / folder / file_name
        rel_path = f"{folder}/{file_name}".lstrip("/")
        what = f"coco_detection record image_id={image_id} ({rel_path}, {split.annotation_file})"
        try:
            width, height = int(meta["width"]), int(meta["height"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{what}: no valid width and height in the annotation file ({e!r})") from e
        if not file_name or width <= 0 or height <= 0:
            raise ValueError(f"{what}: needs a file_name and a positive width and height, got {meta!r:.200}")

        names, boxes, labels, ann_ids, present = [], [], [], [], []
        for a in split.annotations.get(image_id, []):
            ann_what = f"{what} annotation {a.get('id')}"
            category = a.get("category_id")
            try:
                category = int(category)
            except (TypeError, ValueError):
                pass
            if category not in self._categories:
                raise ValueError(f"{ann_what}: category_id {a.get('category_id')!r} is not in the file's categories")
            if self._categories[category] not in present:
                present.append(self._categories[category])
            if a.get("iscrowd"):
                continue
            boxes.append(_normalised_box(a.get("bbox"), width, height, ann_what))
            names.append(self._categories[category])
            labels.append(self._labels[category])
            ann_ids.append(int(a["id"]))
        max_objects = self.builder_config.max_objects
        if len(names) > max_objects:
            raise ValueError(f"{what}: {len(names)} non-crowd objects, more than the config's "
                             f"max_objects={max_objects}")
        if split.captions is None:
            captions = [join_names(present)]
        else:
            captions = split.captions.get(image_id, [])
            if not captions:
                raise ValueError(f"{what}: no captions in {split.captions_file}")

        image = builder.read_image(path, what)
        with PIL.Image.open(io.BytesIO(image)) as decoded:
            if decoded.size != (width, height):
                raise ValueError(f"{what}: the image is {decoded.width}x{decoded.height} but the annotation file "
                                 f"says {width}x{height}")
        k = len(captions)
        return {
            "image": image,
            "image_id": image_id,
            "file_name": rel_path,
            "captions": captions,
            **builder.no_box_fields(k),
            "object_names": names,
            "object_boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "object_labels": np.asarray(labels, np.int32),
            "annotation_ids": np.asarray(ann_ids, np.int64),
        }
