"""coco_detection builder on small fake COCO instances files written here, and the pipeline's scene fields from it."""

import io
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from fixtures import data_config
from vlm_jax import caption_truth
from vlm_jax import tokenizer as tok
from vlm_jax.data import pipeline
from vlm_jax.data.datasets import coco_detection as cd

# In the file out of id order, to check that the vocabulary follows the ids.
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
NAMES_BY_ID = {c["id"]: c["name"] for c in CATEGORIES}
VOCAB = ["person", "car", "dog"]  # id order 1, 3, 18


def _jpeg(path, width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels).save(path, format="JPEG")


def _write_coco(root, *, val_annotations=None):
    """val2017: image 5 (64x48, three objects, one box past the right edge), image 2 (40x40, a car and a crowd of
    dogs), image 9 (no annotations); train2017: image 7 in `images/` with a captions file. Returns the val json."""
    val_images = [{"id": 5, "file_name": "000000000005.jpg", "width": 64, "height": 48},
                  {"id": 2, "file_name": "000000000002.jpg", "width": 40, "height": 40},
                  {"id": 9, "file_name": "000000000009.jpg", "width": 50, "height": 30}]
    for im in val_images:
        _jpeg(root / "val2017" / im["file_name"], im["width"], im["height"], seed=im["id"])
    if val_annotations is None:
        val_annotations = [
            {"id": 52, "image_id": 5, "category_id": 18, "bbox": [30.0, 10.0, 40.0, 30.0], "iscrowd": 0},
            {"id": 50, "image_id": 5, "category_id": 3, "bbox": [1.5, 2.5, 10.0, 8.0], "iscrowd": 0},
            {"id": 51, "image_id": 5, "category_id": 1, "bbox": [4.0, 6.0, 20.0, 30.0], "iscrowd": 0},
            {"id": 21, "image_id": 2, "category_id": 3, "bbox": [0.0, 0.0, 40.0, 40.0], "iscrowd": 0},
            {"id": 22, "image_id": 2, "category_id": 18, "bbox": [5.0, 5.0, 10.0, 10.0], "iscrowd": 1},
        ]
    val = {"images": val_images, "annotations": val_annotations, "categories": CATEGORIES}
    train = {"images": [{"id": 7, "file_name": "000000000007.jpg", "width": 32, "height": 32}],
             "annotations": [{"id": 71, "image_id": 7, "category_id": 18, "bbox": [8, 8, 16, 8], "iscrowd": 0}],
             "categories": CATEGORIES}
    _jpeg(root / "images" / "000000000007.jpg", 32, 32, seed=7)
    captions = {"annotations": [{"id": 702, "image_id": 7, "caption": "A dog lying down. "},
                                {"id": 701, "image_id": 7, "caption": "a small dog"}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(captions))
    return val


def _prepare(data_dir, manual_dir, **kwargs):
    builder = cd.CocoDetection(data_dir=str(data_dir), **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _records(builder, split):
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return [source[i] for i in range(len(source))]


def _text(x):
    return x.decode() if isinstance(x, bytes) else x


def _expected_objects(instances, image_id):
    """(names, boxes) of an image's non-crowd annotations in id order, straight from the json."""
    meta = next(im for im in instances["images"] if im["id"] == image_id)
    w, h = meta["width"], meta["height"]
    anns = sorted((a for a in instances["annotations"] if a["image_id"] == image_id and not a["iscrowd"]),
                  key=lambda a: a["id"])
    boxes = [np.clip([x / w, y / h, (x + bw) / w, (y + bh) / h], 0, 1) for x, y, bw, bh in (a["bbox"] for a in anns)]
    return [NAMES_BY_ID[a["category_id"]] for a in anns], np.asarray(boxes, np.float32).reshape(-1, 4)


def test_records_boxes_names_crowd_and_empty_images(tmp_path):
    val = _write_coco(tmp_path / "manual")
    builder = _prepare(tmp_path / "data", tmp_path / "manual")
    assert set(builder.info.splits) == {"train", "validation"}
    records = _records(builder, "validation")
    assert [r["image_id"] for r in records] == [2, 5, 9]
    for r in records:
        names, boxes = _expected_objects(val, int(r["image_id"]))
        assert [_text(n) for n in r["object_names"]] == names
        np.testing.assert_allclose(r["object_boxes"], boxes, atol=1e-6)
        assert r["object_labels"].tolist() == [VOCAB.index(n) for n in names]
        assert not r["has_box"].any() and not r["has_relation"].any() and r["boxes"].shape == (1, 4)
        source = PIL.Image.open(tmp_path / "manual" / _text(r["file_name"]))
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(r["image"]))), np.asarray(source))
    two, five, nine = records
    # Image 5: clipped at the right edge (30 + 40 > 64), objects in annotation id order.
    np.testing.assert_allclose(five["object_boxes"][2], [30 / 64, 10 / 48, 1.0, 40 / 48], atol=1e-6)
    assert five["annotation_ids"].tolist() == [50, 51, 52]
    assert [_text(c) for c in five["captions"]] == ["car, person and dog"]
    # Image 2: the crowd of dogs is no object, but the caption (what the picture shows) names it.
    assert [_text(n) for n in two["object_names"]] == ["car"] and two["annotation_ids"].tolist() == [21]
    assert [_text(c) for c in two["captions"]] == ["car and dog"]
    # Image 9: kept, with no objects.
    assert nine["object_boxes"].shape == (0, 4) and len(nine["object_names"]) == 0
    assert [_text(c) for c in nine["captions"]] == [cd.NO_OBJECTS_CAPTION]
    # Train: the image from images/, the captions of captions_train2017.json in caption id order.
    (seven,) = _records(builder, "train")
    assert _text(seven["file_name"]) == "images/000000000007.jpg"
    assert [_text(c) for c in seven["captions"]] == ["a small dog", "A dog lying down."]
    np.testing.assert_allclose(seven["object_boxes"], [[0.25, 0.25, 0.75, 0.5]], atol=1e-6)
    # The class vocabulary, in category id order, also after a reload.
    assert cd.category_names(builder) == tuple(VOCAB)
    reloaded = cd.CocoDetection(data_dir=str(tmp_path / "data"))
    assert cd.category_names(reloaded) == tuple(VOCAB)
    assert list(reloaded.info.metadata["category_ids"]) == [1, 3, 18]
    assert reloaded.num_skipped_records == 0


def test_bad_annotation_fails_naming_image_and_annotation_or_is_counted(tmp_path):
    val = _write_coco(tmp_path / "manual")
    val["annotations"][0]["bbox"][2] = 0.0  # annotation 52 of image 5: zero width
    (tmp_path / "manual" / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    with pytest.raises(ValueError, match=r"image_id=5 .*instances_val2017\.json.*annotation 52.*non-positive"):
        _prepare(tmp_path / "data", tmp_path / "manual")
    builder = _prepare(tmp_path / "data2", tmp_path / "manual", skip_bad_records=True)
    assert [r["image_id"] for r in _records(builder, "validation")] == [2, 9]
    assert builder.num_skipped_records == 1
    assert builder.info.metadata["skipped_records"] == {"validation": 1}


def test_unknown_category_is_a_bad_record(tmp_path):
    val = _write_coco(tmp_path / "manual")
    val["annotations"][3]["category_id"] = 99  # annotation 21 of image 2
    (tmp_path / "manual" / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    with pytest.raises(ValueError, match=r"image_id=2 .*annotation 21: category_id 99 is not in"):
        _prepare(tmp_path / "data", tmp_path / "manual")


def test_more_objects_than_max_objects_fails_naming_both(tmp_path):
    _write_coco(tmp_path / "manual")
    config = cd.CocoDetectionConfig(name="max2", max_objects=2)
    with pytest.raises(ValueError, match=r"image_id=5 .*3 non-crowd objects, more than .*max_objects=2"):
        _prepare(tmp_path / "data", tmp_path / "manual", config=config)


def test_refcoco_instances_config(tmp_path):
    manual = tmp_path / "manual"
    instances = {"images": [{"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "width": 20, "height": 10}],
                 "annotations": [{"id": 31, "image_id": 3, "category_id": 1, "bbox": [2, 1, 8, 4], "iscrowd": 0}],
                 "categories": [{"id": 1, "name": "person"}]}
    _jpeg(manual / "train2014" / instances["images"][0]["file_name"], 20, 10, seed=3)
    (manual / "instances.json").write_text(json.dumps(instances))
    builder = _prepare(tmp_path / "data", manual, config="refcoco_instances")
    assert set(builder.info.splits) == {"train"}
    (r,) = _records(builder, "train")
    np.testing.assert_allclose(r["object_boxes"], [[0.1, 0.1, 0.5, 0.5]], atol=1e-6)
    assert [_text(c) for c in r["captions"]] == ["person"]


def test_pipeline_reads_the_objects(tmp_path):
    val = _write_coco(tmp_path / "manual")
    c = data_config(name="coco_detection", builder_config="", data_dir=str(tmp_path / "tfds"),
                    manual_dir=str(tmp_path / "manual"))
    inputs = pipeline.ModelInputs(tok.make_tokenizer("demo"), image_size=16, num_image_tokens=3)
    it = pipeline.make_iterator(c, inputs, split="validation", train=False, global_batch_size=3, seed=0,
                                shard_index=0, shard_count=1)
    batch = next(it)
    n = cd.CocoDetectionConfig(name="x").max_objects
    assert batch["scene_keys"].shape == (3, n) and batch["scene_boxes"].shape == (3, n, 4)
    assert batch["image_id"].tolist() == [2, 5, 9] and batch["valid"].all()
    for i, image_id in enumerate(batch["image_id"]):
        names, boxes = _expected_objects(val, int(image_id))
        keys = [caption_truth.text_key(name) for name in names] + [caption_truth.NO_KEY] * (n - len(names))
        np.testing.assert_array_equal(batch["scene_keys"][i], keys)
        np.testing.assert_allclose(batch["scene_boxes"][i][: len(names)], boxes, atol=1e-6)
        assert not batch["scene_boxes"][i][len(names):].any()
    assert not batch["has_box"].any() and not batch["has_relation"].any()


def test_caption_counts_are_read_once_per_build(tmp_path, monkeypatch):
    """A variable number of captions per record is counted by reading every record; evaluations and the feature
    cache's write pass ask again, so the counts are kept per build, and a rebuilt dataset is read anew."""
    manual = tmp_path / "manual"
    _write_coco(manual)
    c = data_config(name="coco_detection", builder_config="", data_dir=str(tmp_path / "tfds"),
                    manual_dir=str(manual))
    builder = pipeline.make_builder(c)
    source = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    reads = []
    original = type(source).__getitem__

    def counted(self, index):
        reads.append(index)
        return original(self, index)

    monkeypatch.setattr(type(source), "__getitem__", counted)
    assert pipeline.shard_images(c, "train", 0, 1)[1].tolist() == [2]  # image 7's two captions
    assert len(reads) == 1
    assert pipeline.eval_batch_count(c, "train", 1, 1) == 2 and pipeline.shard_images(c, "train", 0, 1)[1].tolist() \
        == [2]
    assert len(reads) == 1  # not read again

    # The same directory rebuilt with a third caption: its new dataset_info.json makes the counts be read again.
    captions = json.loads((manual / "annotations" / "captions_train2017.json").read_text())
    captions["annotations"].append({"id": 703, "image_id": 7, "caption": "a dog"})
    (manual / "annotations" / "captions_train2017.json").write_text(json.dumps(captions))
    shutil.rmtree(tmp_path / "tfds")
    pipeline.make_builder(c)
    assert pipeline.shard_images(c, "train", 0, 1)[1].tolist() == [3] and len(reads) == 2
