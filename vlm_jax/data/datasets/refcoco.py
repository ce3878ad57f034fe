"""`refcoco`: RefCOCO-style referring expressions (RefCOCO, RefCOCO+, RefCOCOg), built from JSON files on disk.

The usual distribution ships the refs as a Python pickle (`refs(unc).p`, written by Python 2). A pickle can run code
when loaded, so this builder reads it with a restricted unpickler that builds only plain data (lists, dicts, tuples,
strings, numbers, booleans, None) and refuses any other object, naming it, before anything is called: the official
download works as is. The same refs as JSON work too. Expected files in `manual_dir`:
    instances.json   COCO-format annotations: "images" [{"id", "file_name", "width", "height"}],
                     "annotations" [{"id", "image_id", "bbox": [x, y, w, h] in pixels, "category_id"}],
                     "categories" [{"id", "name"}]
    refs(unc).p      (or "refs(umd).p", "refs(google).p", "refs.p", or the JSON form "refs.json",
                     "refs(unc).json", "refs(umd).json", "refs(google).json"; JSON is preferred) the list of refs:
                     [{"ref_id", "ann_id", "image_id", "split": "train"|"val"|"test"|"testA"|"testB",
                       "sentences": [{"sent": "man on the left", "raw": "Man on the left", ...}, ...]}, ...]
    images/<file_name>  the COCO train2014 images (a `train2014/` folder is also accepted)
Several distributions of the refs in JSON exist (the refs pickle converted with `json.dump`, or the JSON files of
the refer toolkit forks); all use the field names above.

Records: one per image and split, holding every sentence of every ref of that image in that split (K varies):
    captions[k]   the sentence (`sent`, lower-cased and tokenised in the original files; `raw` when absent)
    boxes[k]      the referred object's box, normalised xyxy (COCO [x, y, w, h] / image size)
    relations[k]  `relations.relation_from_boxes(referred box, reference box)` when the image has a second
                  annotated object (any object of instances.json other than the referred one; the one with the
                  largest box area is the reference, ties broken by the lower annotation id); has_relation is
                  False and the label 0 otherwise. reference_boxes[k] holds the reference's box.
    subjects[k]   the sentence again, references[k] the reference's category name ("" without a reference): the
                  spatial task's 'objects' query is then "the <sentence> and the <category>", with the relation
                  left for the image to tell
Splits: "train", "validation" (refs split "val"), "test", "testA", "testB": those present in the refs.

Bad records (missing or corrupt image, a referred box empty or outside the image, ref pointing to an unknown
annotation; an unrelated annotation's bad box is only left out of the reference candidates): the build
fails with a ValueError naming the image id and the path, unless `skip_bad_records=True`, which skips and counts
them (`builder.num_skipped_records`, per split in `builder.info.metadata["skipped_records"]`).
"""

from __future__ import annotations

import collections
import json
import os
import pickle

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vlm_jax.data.datasets import builder
from vlm_jax.data.datasets import relations as rel

REF_FILES = ("refs.json", "refs(unc).json", "refs(umd).json", "refs(google).json",
             "refs(unc).p", "refs(umd).p", "refs(google).p", "refs.p")


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only. Lists, dicts, tuples, strings, bytes, numbers, booleans and None have opcodes of
    their own; everything else (a class, a function, `os.system`) must be looked up through `find_class`, which is
    refused here, so no code named by the file is ever imported or called. Python 2 byte strings are decoded as
    latin-1 (the refs' text is ASCII)."""

    def find_class(self, module: str, name: str):
        raise ValueError(f"refuses the object {module}.{name}: only lists, dicts, strings and numbers are read "
                         f"from a refs pickle")


def load_refs(path: epath.Path):
    """The refs of a JSON or pickle file (`PlainDataUnpickler`); ValueError naming the file if it is neither."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    try:
        with path.open("rb") as f:
            return PlainDataUnpickler(f, encoding="latin1").load()
    except ValueError as e:
        raise ValueError(f"refcoco: {os.fspath(path)} {e}") from e
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"refcoco: {os.fspath(path)} is not a readable refs pickle ({e!r:.200})") from e
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test", "testA": "testA", "testB": "testB"}
IMAGE_DIRS = ("images", "train2014", "")


def _box_xywh_to_xyxy_normalised(bbox, width: int, height: int, what: str) -> list[float]:
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected bbox [x, y, w, h], got {bbox!r}") from e
    if w <= 0 or h <= 0 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        raise ValueError(f"{what}: bbox {bbox!r} is empty or outside the {width}x{height} image")
    return [max(0.0, x / width), max(0.0, y / height), min(1.0, (x + w) / width), min(1.0, (y + h) / height)]


class RefCoco(builder.ManualBuilder):
    """Referring expressions with the referred object's box and a derived spatial relation."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "First version.",
                     "1.1.0": "subjects and references (the sentence, the reference's category) per sentence.",
                     "1.2.0": "refs(unc).p read (plain data only); an unrelated bad box no longer fails its image."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    # The configs differ only in name (the files in manual_dir decide the content), so that the three datasets
    # get separate data directories.
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{n} from JSON files")
                       for n in ("refcoco", "refcocoplus", "refcocog")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                **builder.record_features(None),
                "file_name": tfds.features.Text(),
                "ref_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "subjects": tfds.features.Sequence(tfds.features.Text()),
                "references": tfds.features.Sequence(tfds.features.Text()),
            }),
            homepage="https://github.com/lichengunc/refer",
            metadata=self._metadata(),
            disable_shuffling=True,  # records in split-file order; the pipeline shuffles
        )

    def _split_generators(self, dl_manager):
        instances = json.loads(self._manual_file(dl_manager, ("instances.json",), "COCO instances").read_text())
        refs = load_refs(self._manual_file(dl_manager, REF_FILES, "the refs (pickle or JSON)"))
        if not isinstance(refs, list):
            raise ValueError(f"refcoco: the refs file must hold a list of refs, got {type(refs).__name__}")
        root = epath.Path(dl_manager.manual_dir)
        images = {int(im["id"]): im for im in instances["images"]}
        self._categories = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}
        anns = {int(a["id"]): a for a in instances["annotations"]}
        anns_by_image = collections.defaultdict(list)
        for a in instances["annotations"]:
            anns_by_image[int(a["image_id"])].append(a)
        by_split = collections.defaultdict(lambda: collections.defaultdict(list))
        for ref in refs:
            if ref.get("split") not in SPLIT_NAMES:
                raise ValueError(f"refcoco: ref {ref.get('ref_id')!r} has split {ref.get('split')!r}; expected one "
                                 f"of {sorted(SPLIT_NAMES)}")
            by_split[SPLIT_NAMES[ref["split"]]][int(ref["image_id"])].append(ref)
        return {split: self._generate_examples(split, refs_by_image, images, anns, anns_by_image, root)
                for split, refs_by_image in sorted(by_split.items())}

    def _generate_examples(self, split, refs_by_image, images, anns, anns_by_image, root):
        for image_id in sorted(refs_by_image):
            try:
                example = self._example(image_id, refs_by_image[image_id], images, anns, anns_by_image, root)
            except ValueError as e:
                self._bad.handle(split, e)
                continue
            yield image_id, example
        self._record_skips()

    def _category(self, annotation: dict, what: str) -> str:
        category = annotation.get("category_id")
        if category is None or int(category) not in self._categories:
            raise ValueError(f"{what}: annotation {annotation.get('id')} has category_id {category!r}, which is not "
                             f"in instances.json's categories")
        return self._categories[int(category)]

    def _example(self, image_id, refs, images, anns, anns_by_image, root) -> dict:
        what = f"refcoco record image_id={image_id}"
        if image_id not in images:
            raise ValueError(f"{what}: image id not in instances.json")
        meta = images[image_id]
        file_name = meta["file_name"]
        what = f"{what} ({file_name})"
        path = next((root / d / file_name for d in IMAGE_DIRS if (root / d / file_name).exists()),
                    root / IMAGE_DIRS[0] / file_name)
        width, height = int(meta["width"]), int(meta["height"])
        image = builder.read_image(path, what)
        # Only a referred annotation must be valid; an unrelated bad box (COCO has a few) just cannot be a reference.
        boxes_by_ann, bad_boxes = {}, {}
        for a in anns_by_image[image_id]:
            try:
                boxes_by_ann[int(a["id"])] = _box_xywh_to_xyxy_normalised(a["bbox"], width, height,
                                                                          f"{what} annotation {a['id']}")
            except ValueError as e:
                bad_boxes[int(a["id"])] = e
        captions, boxes, ref_boxes, labels, has_rel, ref_ids, names = [], [], [], [], [], [], []
        for ref in sorted(refs, key=lambda r: int(r["ref_id"])):
            ann_id = int(ref["ann_id"])
            if ann_id in bad_boxes:
                raise bad_boxes[ann_id]
            if ann_id not in boxes_by_ann:
                raise ValueError(f"{what}: ref {ref['ref_id']} points to annotation {ann_id}, which is not an "
                                 f"annotation of this image in instances.json")
            box = boxes_by_ann[ann_id]
            others = [(-(b[2] - b[0]) * (b[3] - b[1]), a, b) for a, b in boxes_by_ann.items() if a != ann_id]
            reference = min(others)[2] if others else None
            reference_name = self._category(anns[min(others)[1]], what) if others else ""
            for sentence in ref["sentences"]:
                text = sentence.get("sent") or sentence.get("raw")
                if not text:
                    raise ValueError(f"{what}: ref {ref['ref_id']} has a sentence without text: {sentence!r:.200}")
                captions.append(text.strip())
                boxes.append(box)
                ref_boxes.append(reference or [0.0] * 4)
                labels.append(rel.relation_from_boxes(box, reference) if reference else 0)
                has_rel.append(reference is not None)
                ref_ids.append(int(ref["ref_id"]))
                names.append(reference_name)
        if not captions:
            raise ValueError(f"{what}: no sentences")
        k = len(captions)
        return {
            "image": image,
            "image_id": image_id,
            "file_name": file_name,
            "captions": captions,
            "boxes": np.asarray(boxes, np.float32),
            "reference_boxes": np.asarray(ref_boxes, np.float32),
            "relations": np.asarray(labels, np.int32),
            "has_box": np.ones(k, bool),
            "has_relation": np.asarray(has_rel, bool),
            "ref_ids": np.asarray(ref_ids, np.int64),
            "subjects": captions,
            "references": names,
        }
