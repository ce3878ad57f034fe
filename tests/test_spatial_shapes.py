"""spatial_shapes builder: schema, label balance, boxes and labels checked against the drawn pixels, determinism."""

import io

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from vlm_jax.data.datasets import relations as rel
from vlm_jax.data.datasets import spatial_shapes as ss

TINY = dict(image_size=64, num_train=40, num_validation=12, num_test=12)


def _build(data_dir, **params):
    builder = ss.SpatialShapes(config=ss.make_config(**params), data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def _records(builder, split="train"):
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("ss"), **TINY)


def _text(x):
    return x.decode() if isinstance(x, bytes) else x


def test_documented_fields(built):
    k = built.builder_config.pairs_per_image
    records = _records(built)
    assert len(records) == TINY["num_train"]
    assert {s: len(built.as_data_source(split=s)) for s in ("validation", "test")} == {"validation": 12, "test": 12}
    for r in records:
        image = np.asarray(PIL.Image.open(io.BytesIO(r["image"])))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert len(r["captions"]) == k and len(r["subjects"]) == k and len(r["references"]) == k
        for name, shape, dtype in [("boxes", (k, 4), np.float32), ("reference_boxes", (k, 4), np.float32),
                                   ("relations", (k,), np.int32), ("has_box", (k,), np.bool_),
                                   ("has_relation", (k,), np.bool_)]:
            assert r[name].shape == shape and r[name].dtype == dtype, name
        assert r["has_box"].all() and r["has_relation"].all()
        boxes = np.concatenate([r["boxes"], r["reference_boxes"], r["object_boxes"]])
        assert (boxes >= 0).all() and (boxes <= 1).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        names = [_text(n) for n in r["object_names"]]
        assert 2 <= len(names) <= 4 and len(set(names)) == len(names)  # colour+shape unique per image
        for caption, subject, reference, label in zip(r["captions"], r["subjects"], r["references"],
                                                      r["relations"]):
            assert _text(caption) == f"the {_text(subject)} {ss.CAPTION_VERBS[label]} the {_text(reference)}"
            assert _text(subject) in names and _text(reference) in names and subject != reference
    assert len({r["image_id"] for r in records}) == len(records)


def test_boxes_and_labels_match_the_drawn_pixels(built):
    """Stored boxes equal the bounding box of the object's colour in the image; labels agree with the boxes both
    through relation_from_boxes and through a direct check on the pixel boxes."""
    checked = 0
    for r in _records(built):
        image = np.asarray(PIL.Image.open(io.BytesIO(r["image"])))
        size = image.shape[0]
        names = [_text(n) for n in r["object_names"]]
        colours = [n.split()[0] for n in names]

        def pixel_box(name):
            colour = name.split()[0]
            if colours.count(colour) != 1:
                return None  # two objects share this colour: their pixels cannot be told apart by colour
            mask = (image == np.asarray(ss.COLOURS[colour], np.uint8)).all(-1)
            rows, cols = np.nonzero(mask)
            return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / size

        for box, ref_box, label, subject, reference in zip(r["boxes"], r["reference_boxes"], r["relations"],
                                                           r["subjects"], r["references"]):
            assert rel.relation_from_boxes(box, ref_box) == label
            if rel.RELATIONS[label] in ("inside", "outside"):
                assert _text(subject).split()[0] != _text(reference).split()[0]  # the inner object is visible
            sbox, rbox = pixel_box(_text(subject)), pixel_box(_text(reference))
            if sbox is None or rbox is None:
                continue
            np.testing.assert_allclose(box, sbox, atol=1e-6)
            np.testing.assert_allclose(ref_box, rbox, atol=1e-6)
            name = rel.RELATIONS[label]
            within = lambda a, b: a[0] >= b[0] and a[1] >= b[1] and a[2] <= b[2] and a[3] <= b[3]
            if name == "inside":
                assert within(sbox, rbox)
            elif name == "outside":
                assert within(rbox, sbox)
            else:
                assert not within(sbox, rbox) and not within(rbox, sbox)
                dx = (sbox[0] + sbox[2] - rbox[0] - rbox[2]) / 2
                dy = (sbox[1] + sbox[3] - rbox[1] - rbox[3]) / 2
                expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
                assert name == expected
            checked += 1
    assert checked >= 40  # most pairs have distinct colours


def test_label_balance_and_nesting():
    config = ss.make_config()  # default sizes and sampling; examples generated directly, no files
    labels = np.concatenate([ss.generate_example(config, "train", i)["relations"] for i in range(300)])
    freq = np.bincount(labels, minlength=6) / len(labels)
    assert (freq > 0.10).all() and (freq < 0.25).all(), dict(zip(rel.RELATIONS, freq.round(3)))


def test_every_caption_word_is_one_demo_token(built):
    from vlm_jax import tokenizer

    tok = tokenizer.make_tokenizer("demo")
    # Every word the caption form "the {colour shape} {verb} the {colour shape}" can use, and the captions drawn.
    words = {"the", *ss.COLOURS, *ss.SHAPES, *" ".join(ss.CAPTION_VERBS).split()}
    assert words <= set(tokenizer.DEMO_WORDS)
    for r in _records(built):
        for caption in r["captions"]:
            text = _text(caption)
            assert len(tok(text)["input_ids"]) == len(text.split()), text
    for word in words:
        assert len(tok(" " + word)["input_ids"]) == 1, word


def test_deterministic_from_seed(tmp_path, built):
    again = _records(_build(tmp_path / "a", **TINY), "validation")
    first = _records(built, "validation")
    for a, b in zip(first, again):
        assert a["image"] == b["image"] and a["captions"] == b["captions"]
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
    other = _records(_build(tmp_path / "b", seed=1, **TINY), "validation")
    assert [r["image"] for r in other] != [r["image"] for r in first]


def test_relation_rules_and_ties():
    # Hand-worked boxes (x right, y down).
    ref = (10, 10, 20, 20)
    assert rel.RELATIONS[rel.relation_from_boxes((12, 12, 18, 18), ref)] == "inside"
    assert rel.RELATIONS[rel.relation_from_boxes((10, 10, 20, 20), ref)] == "inside"  # identical: rule 1 first
    assert rel.RELATIONS[rel.relation_from_boxes((0, 0, 30, 30), ref)] == "outside"
    assert rel.RELATIONS[rel.relation_from_boxes((0, 12, 5, 14), ref)] == "left"
    assert rel.RELATIONS[rel.relation_from_boxes((25, 0, 30, 5), ref)] == "right"  # dx = dy = 12.5: horizontal
    assert rel.RELATIONS[rel.relation_from_boxes((14, 0, 16, 4), ref)] == "above"
    assert rel.RELATIONS[rel.relation_from_boxes((12, 30, 30, 40), ref)] == "below"
    assert rel.RELATIONS[rel.relation_from_boxes((5, 14, 25, 16), ref)] == "left"  # same centre, not nested
    with pytest.raises(ValueError, match="subject"):
        rel.relation_from_boxes((5, 5, 1, 1), ref)
    with pytest.raises(ValueError, match="reference"):
        rel.relation_from_boxes((1, 1, 5, 5), (1, 2, 3))


def test_config_validation():
    with pytest.raises(ValueError, match="pairs_per_image"):
        ss.make_config(pairs_per_image=3, min_objects=2)
    with pytest.raises(ValueError, match="image_size"):
        ss.make_config(image_size=16)
    assert ss.make_config(image_size=64).name != ss.make_config(image_size=96).name

