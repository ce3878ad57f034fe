"""The RefCOCO grounding evaluator: InternVL's prompt and image blocks, batched generation equal to one-at-a-time,
scoring equal to a pixel-space IoU written here, and the command line on a tiny built RefCOCO."""

import json

import numpy as np
import pytest

from vlm_jax import generation, grounding_eval, tokenizer
from vlm_jax.checkpoints import converted, random_hf
from vlm_jax.data import preprocess
from vlm_jax.data.prompt import INTERNVL_SYSTEM_MESSAGE
from vlm_jax.models.config import InternVLConfig
from vlm_jax.pretrained import load_pretrained

WORDS = ["man", "on", "the", "left", "red", "cup", "small", "dog"]
GROUNDING = ("<ref>", "</ref>", "<box>", "</box>")  # special tokens in InternVL's tokenizer
PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"
NEW = 6  # one max_new_tokens everywhere: the tests share compiled programs
SIZES = [(32, 32), (70, 24), (40, 80)]  # 1, 4 and 3 tiles of 32 px with max_tiles 6 (+ thumbnail)


@pytest.fixture(scope="module")
def tok():
    t = tokenizer.build_demo_tokenizer(WORDS)
    t.add_tokens(list(GROUNDING), special_tokens=True)
    return t


@pytest.fixture(scope="module")
def converted_dir(tok, tmp_path_factory):
    """A tiny random checkpoint as `python -m vlm_jax.convert` writes it, with the tokenizer's files."""
    cfg = InternVLConfig.tiny(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(tokenizer.IMG_CONTEXT))
    path = str(tmp_path_factory.mktemp("grounding") / "converted")
    converted.save(path, cfg, random_hf.random_model(cfg, seed=0))
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(converted_dir):
    # Loaded as the command line loads it, so the two share compiled programs.
    return load_pretrained(converted_dir, dtype="float32")


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for w, h in SIZES]
    # Image 1 twice (two expressions of one image, as RefCOCO records hold). Every prompt is 257..512 tokens long
    # (one length bucket), so the tests compile few programs (the command line's test reuses some).
    texts = ["the small red dog on the left of the man", "red cup", "man on the left", "cup"]
    which = [0, 1, 2, 1]
    return [grounding_eval.GroundingExample(images[j], t, [0.1, 0.2, 0.6, 0.9], image_id=j, ref_id=i)
            for i, (j, t) in enumerate(zip(which, texts))]


def test_prompt_and_image_blocks_are_internvls(model, tok, examples):
    builder = grounding_eval.prompt_builder(model, tok)
    ids, mask, px, tiles = grounding_eval.batch_inputs(model, builder, examples)
    q = model.config.num_image_tokens
    start, end, ctx = (tok.convert_tokens_to_ids(t) for t in (tokenizer.IMG_START, tokenizer.IMG_END,
                                                              tokenizer.IMG_CONTEXT))
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding
    offset = 0
    for row, ex in enumerate(examples):
        h, w = ex.image.shape[:2]
        n = preprocess.num_tiles(w, h, model.config.image_size, 1, 6, True)
        assert tiles[row] == n
        seq = ids[row][mask[row] == 1].tolist()
        assert seq.count(start) == seq.count(end) == 1
        a, b = seq.index(start), seq.index(end)
        assert b - a - 1 == q * n and set(seq[a + 1:b]) == {ctx} and seq.count(ctx) == q * n
        assert tok.decode(seq[:a]) == (f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>\n"
                                       "<|im_start|>user\n")
        assert tok.decode(seq[b + 1:]) == f"\n{PROMPT.format(ex.expression)}<|im_end|>\n<|im_start|>assistant\n"
        np.testing.assert_array_equal(px[offset:offset + n], preprocess.dynamic_tiles(ex.image, 32, 1, 6, True))
        offset += n
    assert offset == len(px)


def test_the_evaluator_feeds_those_inputs_and_keeps_the_box_markup(model, tok, examples, monkeypatch):
    """generate_ids replaced by a spy that answers each row with a box naming the row's tile count: the inputs it
    sees are batch_inputs', the answers come back in the examples' order whatever the batching, and the answers'
    special tokens (<ref>, <box>) survive decoding."""
    builder = grounding_eval.prompt_builder(model, tok)
    ctx, q = model.config.image_token_id, model.config.num_image_tokens
    seen = []

    def answer(tiles):
        return f"<ref>x</ref><box>[[0, 0, {100 * tiles}, 900]]</box>"

    def spy(model, ids, mask, px, *, max_new_tokens, eos_token_id, pad_token_id):
        seen.append((ids, mask, px))
        out = np.full((ids.shape[0], max_new_tokens), pad_token_id)
        for row in range(ids.shape[0]):
            answer_ids = tok.encode(answer(int((ids[row] == ctx).sum()) // q), add_special_tokens=False)
            assert tok.convert_tokens_to_ids("<box>") in answer_ids
            out[row, :len(answer_ids) + 1] = answer_ids + [eos_token_id]
        return out

    monkeypatch.setattr(generation, "generate_ids", spy)
    tiles = [preprocess.num_tiles(ex.image.shape[1], ex.image.shape[0], 32, 1, 6) for ex in examples]
    result = grounding_eval.evaluate_grounding(model, tok, examples[:3], batch_size=3, sort_by_tiles=False,
                                               max_new_tokens=40)
    ids, mask, px, _ = grounding_eval.batch_inputs(model, builder, examples[:3])
    assert len(seen) == 1
    for got, want in zip(seen[0], (ids, mask, px)):
        np.testing.assert_array_equal(got, want)
    assert result["answers"] == [answer(n) for n in tiles[:3]]
    assert result["unparsable"] == 0 and result["per_example"][0]["pred_box"] == [0.0, 0.0, 0.1, 0.9]
    # Sorted by tile count (1, 3, 4, 4) in batches of 3, the last one padded with repeats: answers in input order.
    seen.clear()
    assert grounding_eval.generate_answers(model, tok, examples, batch_size=3, max_new_tokens=40) == \
        [answer(n) for n in tiles]
    assert [len(ids) for ids, _, _ in seen] == [3, 3]


def test_random_model_end_to_end_batched_equals_one_at_a_time(model, tok, examples):
    # Images of 1 and 4 tiles in one batch; the second batch is one real row and a repeat.
    chosen = [examples[i] for i in (0, 1, 3)]
    mixed = grounding_eval.evaluate_grounding(model, tok, chosen, batch_size=2, sort_by_tiles=False,
                                              max_new_tokens=NEW)
    assert mixed["num_examples"] == len(mixed["answers"]) == len(mixed["per_example"]) == len(chosen)
    assert all(isinstance(a, str) for a in mixed["answers"])
    per = mixed["per_example"]
    assert mixed["unparsable"] == sum(p["unparsable"] is not None for p in per)  # a random model: mostly these
    assert mixed["acc"] == np.mean([p["correct"] for p in per])
    json.dumps(grounding_eval._json_ready(mixed))  # dumps as strict JSON
    # Greedy decoding is deterministic: left padding and batch company must not change any answer.
    alone = grounding_eval.generate_answers(model, tok, chosen, batch_size=1, max_new_tokens=NEW)
    assert mixed["answers"] == alone
    assert len(set(alone)) > 1  # the answers depend on the input (else the comparison proves little)


def test_accuracy_equals_pixel_space_iou():
    sizes = [(200, 100), (50, 120), (640, 480), (300, 300), (80, 200)]  # (width, height): different aspects
    true_px = np.array([[20, 10, 120, 90], [5, 30, 45, 100], [100, 50, 400, 300], [0, 0, 150, 150],
                        [10, 20, 70, 180]], float)
    answers = [
        "<ref>a</ref><box>[[100, 100, 600, 900]]</box>",  # the exact box
        "<ref>b</ref><box>[[100, 250, 900, 833]]</box>",  # shifted on both axes
        "<ref>c</ref><box>[[320, 104, 789, 625]]</box>",  # IoU a little below 0.5 in pixels
        "[[0, 0, 500, 500]]",  # no <box> block: unparsable, counted as wrong
        "<ref>e</ref><box>[[125, 100, 875, 900]]</box>",
    ]
    wh = np.array([[w, h, w, h] for w, h in sizes], float)
    examples = [grounding_eval.GroundingExample(None, f"thing {i}", (true_px[i] / wh[i]).tolist())
                for i in range(len(sizes))]
    result = grounding_eval.score_answers(answers, examples)

    def iou(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    want = []
    for i, answer in enumerate(answers):
        if "<box>" not in answer:
            want.append(0.0)
            continue
        coords = np.array([float(v) for v in answer.split("[[")[1].split("]]")[0].split(",")])
        want.append(iou(coords / 1000 * wh[i], true_px[i]))  # InternVL: /1000, x * width, y * height
    want = np.array(want)
    assert 0.4 < want[2] < 0.5 and want[4] >= 0.5  # the cases the answers were written for
    np.testing.assert_allclose(result["iou"], want, atol=1e-6)
    assert result["acc"] == pytest.approx(np.mean(want >= 0.5)) and result["num_examples"] == 5
    assert result["unparsable"] == 1 and result["per_example"][3]["unparsable"]
    assert [p["correct"] for p in result["per_example"]] == list(want >= 0.5)
    with pytest.raises(ValueError, match="4 answers for 5"):
        grounding_eval.evaluate_grounding(None, None, examples, answer_fn=lambda ex: answers[:4])
    with pytest.raises(ValueError, match="example 1: box"):
        grounding_eval.score_answers(answers[:2], [examples[0], (None, "x", [0.5, 0.5, 0.2, 0.9])])


# ---- the command line on a tiny built RefCOCO ---------------------------------------------------------------------

def _write_refcoco(root):
    """instances.json + refs.json + two JPEGs of different aspect ratios, three val expressions."""
    import PIL.Image

    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 70, "height": 24},
              {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 40, "height": 80}]
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for im in images:
        pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(root / "images" / im["file_name"], format="JPEG")
    annotations = [{"id": 11, "image_id": 1, "bbox": [5.0, 2.0, 30.0, 20.0], "category_id": 1},
                   {"id": 21, "image_id": 2, "bbox": [4.0, 10.0, 30.0, 60.0], "category_id": 1}]
    sent = lambda i, t: {"sent": t, "raw": t, "sent_id": i}  # noqa: E731
    refs = [{"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val",
             "sentences": [sent(0, "red cup"), sent(1, "the small cup on the left")]},
            {"ref_id": 2, "ann_id": 21, "image_id": 2, "split": "val", "sentences": [sent(2, "dog")]}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": [{"id": 1, "name": "cup"}]}))
    (root / "refs.json").write_text(json.dumps(refs))


def test_command_line_on_a_tiny_refcoco(converted_dir, tmp_path):
    _write_refcoco(tmp_path / "manual")
    common = ["--converted_dir", converted_dir, "--manual_dir", str(tmp_path / "manual"), "--data_dir",
              str(tmp_path / "tfds"), "--dtype", "float32", "--max_new_tokens", str(NEW)]
    with pytest.raises(ValueError, match="--converted_dir .*missing.* is not a directory"):
        grounding_eval.main(["--converted_dir", str(tmp_path / "missing"), *common[2:]])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        grounding_eval.main([*common, "--split", "dev"])
    out = tmp_path / "results.json"
    grounding_eval.main([*common, "--split", "val", "--batch_size", "2", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["num_examples"] == 3 and len(saved["per_example"]) == 3
    assert [p["expression"] for p in saved["per_example"]] == ["red cup", "the small cup on the left", "dog"]
    np.testing.assert_allclose(saved["per_example"][0]["true_box"], [5 / 70, 2 / 24, 35 / 70, 22 / 24], atol=1e-6)
    assert saved["settings"]["max_tiles"] == 6 and saved["settings"]["prompt"] == PROMPT
    assert saved["acc"] == np.mean([p["correct"] for p in saved["per_example"]])
    # The built dataset has no testA: named, with the splits it has, before the weights are read.
    with pytest.raises(ValueError, match=r"no split 'testA'; available: \['validation'\]"):
        grounding_eval.main([*common, "--split", "testA"])
    built = grounding_eval.refcoco_builder(data_dir=str(tmp_path / "tfds"))  # no manual_dir needed once built
    assert [e.expression for e in grounding_eval.refcoco_examples(built, "val", max_examples=2)] == \
        ["red cup", "the small cup on the left"]


def test_images_are_read_as_stored_without_exif_rotation():
    """COCO's boxes are in the stored pixel grid (as InternVL reads images): an EXIF orientation is not applied."""
    import io

    import PIL.Image

    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 16), (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
    data = buffer.getvalue()
    assert preprocess.load_image(data).size == (16, 40)  # the generic loader turns it upright
    assert grounding_eval.stored_pixels(data, "x").shape == (16, 40, 3)
    assert grounding_eval.image_size_of(data, "x") == (40, 16)
    with pytest.raises(ValueError, match="example 7: unreadable image"):
        grounding_eval.stored_pixels(data[:20], "example 7")
