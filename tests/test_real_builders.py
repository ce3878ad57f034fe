"""coco_captions and refcoco builders on small fake files in the real on-disk formats, written here."""

import io
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from vlm_jax.data.datasets import coco_captions, refcoco
from vlm_jax.data.datasets import relations as rel


def _jpeg(path, width, height, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 255, size=(height, width, channels), dtype=np.uint8).squeeze()
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels, mode=None).convert(mode).save(path, format="JPEG")


def _prepare(builder_cls, data_dir, manual_dir, **kwargs):
    builder = builder_cls(data_dir=str(data_dir), **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _records(builder, split):
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return sorted((source[i] for i in range(len(source))), key=lambda r: r["image_id"])


def _text(x):
    return x.decode() if isinstance(x, bytes) else x


# --------------------------------------------------------------------------------------------------- COCO


def _write_coco(root, *, corrupt=False, missing=False):
    """Karpathy's dataset_coco.json with 5 images over the four split names; optionally one bad image."""
    images = []
    for i, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("val", "val2014"),
                                         ("test", "val2014"), ("test", "val2014")]):
        cocoid = 1000 + i
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        _jpeg(root / folder / name, 40 + 8 * i, 32, seed=i, mode="L" if i == 1 else "RGB")
        sentences = [{"tokens": ["a", "cat"], "raw": f"caption {j} of image {cocoid} ", "imgid": i,
                      "sentid": 10 * i + j} for j in range(6 if i == 0 else 5)]
        images.append({"filepath": folder, "filename": name, "cocoid": cocoid, "imgid": i, "split": split,
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    if corrupt:
        (root / "val2014" / images[3]["filename"]).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    if missing:
        (root / "val2014" / images[1]["filename"]).unlink()
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return images


def test_coco_captions_records(tmp_path):
    entries = _write_coco(tmp_path / "manual")
    builder = _prepare(coco_captions.CocoCaptions, tmp_path / "data", tmp_path / "manual")
    expected = {"train": entries[0:2], "validation": entries[2:3], "test": entries[3:5]}
    for split, split_entries in expected.items():
        records = _records(builder, split)
        assert [r["image_id"] for r in records] == [e["cocoid"] for e in split_entries]
        for r, e in zip(records, split_entries):
            assert [_text(c) for c in r["captions"]] == [s["raw"].strip() for s in e["sentences"][:5]]
            assert _text(r["file_name"]) == f"{e['filepath']}/{e['filename']}"
            image = PIL.Image.open(io.BytesIO(r["image"]))
            source = PIL.Image.open(tmp_path / "manual" / e["filepath"] / e["filename"]).convert("RGB")
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(source))
            assert image.mode == "RGB"  # the greyscale JPEG was converted
            assert r["boxes"].shape == (5, 4) and not r["has_box"].any() and not r["has_relation"].any()
    assert builder.num_skipped_records == 0


def test_coco_bad_images_fail_with_id_and_path_by_default(tmp_path):
    entries = _write_coco(tmp_path / "manual", corrupt=True)
    with pytest.raises(ValueError, match=rf"cocoid={entries[3]['cocoid']}.*{entries[3]['filename']}"):
        _prepare(coco_captions.CocoCaptions, tmp_path / "data", tmp_path / "manual")


def test_coco_skip_bad_records_counts(tmp_path):
    entries = _write_coco(tmp_path / "manual", corrupt=True, missing=True)
    builder = _prepare(coco_captions.CocoCaptions, tmp_path / "data", tmp_path / "manual", skip_bad_records=True)
    assert [r["image_id"] for r in _records(builder, "test")] == [entries[4]["cocoid"]]
    assert [r["image_id"] for r in _records(builder, "train")] == [entries[0]["cocoid"]]
    assert builder.num_skipped_records == 2
    reloaded = coco_captions.CocoCaptions(data_dir=str(tmp_path / "data"))  # the count survives a reload
    assert reloaded.num_skipped_records == 2
    assert reloaded.info.metadata["skipped_records"] == {"train": 1, "test": 1}


# ------------------------------------------------------------------------------------------------ RefCOCO


def _write_refcoco(root, *, corrupt=False):
    """instances.json + refs.json (the refs in JSON) + images: image 1 has three objects, two of them referred;
    image 2 has a single object; image 3 is in another split."""
    sizes = {1: (100, 80), 2: (60, 50), 3: (70, 70)}
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": w, "height": h}
              for i, (w, h) in sizes.items()]
    for im in images:
        _jpeg(root / "images" / im["file_name"], im["width"], im["height"], seed=im["id"])
    if corrupt:
        path = root / "images" / images[1]["file_name"]
        path.write_bytes(path.read_bytes()[:60])  # truncated
    annotations = [
        {"id": 11, "image_id": 1, "bbox": [5.0, 10.0, 20.0, 30.0], "category_id": 1, "area": 600.0},
        {"id": 12, "image_id": 1, "bbox": [50.0, 5.0, 45.0, 70.0], "category_id": 2, "area": 3150.0},
        {"id": 13, "image_id": 1, "bbox": [60.0, 20.0, 10.0, 10.0], "category_id": 1, "area": 100.0},
        {"id": 21, "image_id": 2, "bbox": [0.0, 0.0, 60.0, 50.0], "category_id": 1, "area": 3000.0},
        {"id": 31, "image_id": 3, "bbox": [10.0, 40.0, 20.0, 20.0], "category_id": 1, "area": 400.0},
        {"id": 32, "image_id": 3, "bbox": [10.0, 5.0, 20.0, 20.0], "category_id": 1, "area": 400.0},
    ]
    sent = lambda i, t: {"tokens": t.split(), "raw": t.capitalize(), "sent": t, "sent_id": i}
    refs = [
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_11.jpg", "sentences": [sent(0, "cup on the left"),
                                                                           sent(1, "small cup")]},
        {"ref_id": 2, "ann_id": 13, "image_id": 1, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_13.jpg", "sentences": [sent(2, "cup on the plate")]},
        {"ref_id": 3, "ann_id": 21, "image_id": 2, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000002_21.jpg", "sentences": [sent(3, "the whole thing")]},
        {"ref_id": 4, "ann_id": 31, "image_id": 3, "split": "testA", "category_id": 1,
         "file_name": "COCO_train2014_000000000003_31.jpg", "sentences": [sent(4, "bottom one")]},
    ]
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cup"},
                                                                               {"id": 2, "name": "plate"}]}
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "refs(unc).json").write_text(json.dumps(refs))
    return instances, refs


def _xyxy(bbox, w, h):
    x, y, bw, bh = bbox
    return [x / w, y / h, (x + bw) / w, (y + bh) / h]


def test_refcoco_boxes_and_relations(tmp_path):
    instances, _ = _write_refcoco(tmp_path / "manual")
    builder = _prepare(refcoco.RefCoco, tmp_path / "data", tmp_path / "manual", config="refcoco")
    assert set(builder.info.splits) == {"train", "testA"}
    train = _records(builder, "train")
    assert [r["image_id"] for r in train] == [1, 2]
    one, two = train
    assert [_text(c) for c in one["captions"]] == ["cup on the left", "small cup", "cup on the plate"]
    ann = {a["id"]: a for a in instances["annotations"]}
    np.testing.assert_allclose(one["boxes"], [_xyxy(ann[i]["bbox"], 100, 80) for i in (11, 11, 13)], atol=1e-6)
    # The reference is the largest other annotated object: the plate (12) for both refs.
    np.testing.assert_allclose(one["reference_boxes"], [_xyxy(ann[12]["bbox"], 100, 80)] * 3, atol=1e-6)
    assert [rel.RELATIONS[i] for i in one["relations"]] == ["left", "left", "inside"]
    # The spatial task's 'objects' query: the sentence and the reference's category name.
    assert [_text(c) for c in one["subjects"]] == [_text(c) for c in one["captions"]]
    assert [_text(c) for c in one["references"]] == ["plate"] * 3
    assert [_text(c) for c in two["references"]] == [""]
    assert one["has_relation"].all() and one["has_box"].all()
    for box, ref_box, label in zip(one["boxes"], one["reference_boxes"], one["relations"]):
        assert rel.relation_from_boxes(box, ref_box) == label  # recomputed from the stored boxes
    # A single annotated object: box, but no relation.
    np.testing.assert_allclose(two["boxes"], [[0, 0, 1, 1]], atol=1e-6)
    assert two["has_box"].all() and not two["has_relation"].any()
    (three,) = _records(builder, "testA")
    assert rel.RELATIONS[three["relations"][0]] == "below"


def test_refcoco_bad_image(tmp_path):
    _write_refcoco(tmp_path / "manual", corrupt=True)
    with pytest.raises(ValueError, match=r"image_id=2 .*COCO_train2014_000000000002\.jpg"):
        _prepare(refcoco.RefCoco, tmp_path / "data", tmp_path / "manual", config="refcoco")
    builder = _prepare(refcoco.RefCoco, tmp_path / "data2", tmp_path / "manual", config="refcoco",
                       skip_bad_records=True)
    assert [r["image_id"] for r in _records(builder, "train")] == [1]
    assert builder.num_skipped_records == 1


def test_refcoco_checks_the_referred_box_not_unrelated_ones(tmp_path):
    manual = tmp_path / "manual"
    instances, _ = _write_refcoco(manual)
    # An unrelated zero-width box on image 1, larger than every other: it must not fail the image nor be the
    # reference (the largest valid other object, annotation 12, stays the reference).
    instances["annotations"].append({"id": 14, "image_id": 1, "bbox": [0.0, 0.0, 0.0, 80.0], "category_id": 2})
    (manual / "instances.json").write_text(json.dumps(instances))
    built = _records(_prepare(refcoco.RefCoco, tmp_path / "ok", manual, config="refcoco"), "train")
    ann12 = _xyxy([50.0, 5.0, 45.0, 70.0], 100, 80)
    np.testing.assert_allclose(built[0]["reference_boxes"][0], ann12, rtol=1e-6)
    # The same bad box referred to: the build names it.
    instances["annotations"][-1]["id"] = 11  # replaces the referred annotation 11 of ref 1
    instances["annotations"] = [a for a in instances["annotations"] if a["id"] != 11 or a["bbox"][2] == 0.0]
    (manual / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"image_id=1 .*annotation 11: bbox \[0\.0, 0\.0, 0\.0, 80\.0\] is empty"):
        _prepare(refcoco.RefCoco, tmp_path / "bad", manual, config="refcoco")


class _Python2Pickler(pickle._Pickler):
    """Writes text as Python 2's pickle writes its `str`: the STRING / SHORT_BINSTRING / BINSTRING opcodes of the
    official refs(unc).p (Python 3 itself would write unicode opcodes)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1")
        if self.proto == 0:
            self.write(pickle.STRING + repr(obj).encode("ascii") + b"\n")
        elif len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str


def _python2_pickle(obj, protocol: int) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=protocol).dump(obj)
    return out.getvalue()


@pytest.mark.parametrize("protocol", [0, 2])
def test_refcoco_reads_the_official_refs_pickle(tmp_path, protocol):
    """refs(unc).p as distributed (a Python 2 pickle of plain lists and dicts: protocol 0 or 2, str as bytes) gives
    the same records as the JSON form."""
    _write_refcoco(tmp_path / "manual")
    refs = json.loads((tmp_path / "manual" / "refs(unc).json").read_text())
    from_json = _records(_prepare(refcoco.RefCoco, tmp_path / "json", tmp_path / "manual", config="refcoco"),
                         "train")
    (tmp_path / "manual" / "refs(unc).json").unlink()

    (tmp_path / "manual" / "refs(unc).p").write_bytes(_python2_pickle(refs, protocol))
    assert refcoco.load_refs(tmp_path / "manual" / "refs(unc).p") == refs
    from_pickle = _records(_prepare(refcoco.RefCoco, tmp_path / "pickle", tmp_path / "manual", config="refcoco"),
                           "train")
    assert len(from_pickle) == len(from_json) == 2
    for a, b in zip(from_pickle, from_json):
        assert [_text(c) for c in a["captions"]] == [_text(c) for c in b["captions"]]
        np.testing.assert_array_equal(a["boxes"], b["boxes"])


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_refcoco_refuses_a_pickle_that_names_code(tmp_path):
    manual = tmp_path / "manual"
    _write_refcoco(manual)
    (manual / "refs(unc).json").unlink()
    (manual / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "x": _Payload()}], protocol=2))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p refuses the object (posix|os)\.system"):
        _prepare(refcoco.RefCoco, tmp_path / "data", manual, config="refcoco")
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
