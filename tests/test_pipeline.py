"""grain pipeline: contract fields, determinism, exact resume (also through orbax), process shards, truncation,
inputs taken from the model config."""

import io
import json
import os
import subprocess
import sys
import textwrap
import zlib

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

from fixtures import data_config
from vlm_jax import tokenizer as tok
from vlm_jax.data import batching, pipeline, preprocess

SIZES = dict(image_size=32, num_train=24, num_validation=10, num_test=4)
# Not a real model's numbers: 16 px tiles with 3 tokens each, so sizes never agree by accident.
INPUTS = pipeline.ModelInputs(tok.make_tokenizer("demo"), image_size=16, num_image_tokens=3)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return data_config(data_dir=str(tmp_path_factory.mktemp("tfds")), builder_config="", builder_params=SIZES)


@pytest.fixture(scope="module")
def records(config):
    _, source = pipeline.load_source(config, "train")
    return {int(r["image_id"]): r for r in (source[i] for i in range(len(source)))}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _train(config, seed=0, **kw):
    kw.setdefault("global_batch_size", 4)
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return pipeline.make_iterator(config, INPUTS, split="train", train=True, seed=seed, **kw)


def test_batch_fields_follow_the_contract(config, records):
    it = _train(config)
    builder = pipeline.make_prompt_builder(config, INPUTS)
    tokenizer = builder.tokenizer
    limit = pipeline.prompt_length(config, INPUTS)
    assert limit == 3 + 24 + 16  # num_image_tokens + max_text_length + template allowance
    for batch in _take(it, 3):
        lp = batch["prompt_ids"].shape[1]
        assert lp <= limit and lp % 8 == 0 or lp == limit
        expected = {"tiles": ((4, 16, 16, 3), np.float32), "tile_regions": ((4, 4), np.float32),
                    "row_tiles": ((4, 1), np.int32), "num_tiles": ((4,), np.int32), "image_id": ((4,), np.int32),
                    "image_aspect": ((4,), np.float32),
                    "text_ids": ((4, 24), np.int32), "text_mask": ((4, 24), np.int32),
                    "prompt_ids": ((4, lp), np.int32), "prompt_mask": ((4, lp), np.int32),
                    "box": ((4, 4), np.float32), "has_box": ((4,), np.bool_),
                    "reference_box": ((4, 4), np.float32),
                    "relation": ((4,), np.int32), "has_relation": ((4,), np.bool_),
                    "caption_key": ((4,), np.int32), "subject_key": ((4,), np.int32),
                    "reference_key": ((4,), np.int32), "scene_keys": ((4, 4), np.int32),
                    "scene_boxes": ((4, 4, 4), np.float32), "query_ids": ((4, 24), np.int32),
                    "query_mask": ((4, 24), np.int32)}
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
        np.testing.assert_array_equal(batch["row_tiles"][:, 0], np.arange(4))  # one tile per image, in row order
        np.testing.assert_array_equal(batch["tile_regions"], np.tile([[0.0, 0.0, 1.0, 1.0]], (4, 1)))
        for i in range(4):
            record = records[int(batch["image_id"][i])]
            np.testing.assert_allclose(batch["tiles"][i], preprocess.single_tile(record["image"], 16), atol=1e-6)
            n = batch["text_mask"][i].sum()
            assert (batch["text_mask"][i][:n] == 1).all() and (batch["text_mask"][i][n:] == 0).all()
            ids = batch["text_ids"][i][:n]
            assert ids[-1] == builder.eos_id
            caption = tokenizer.decode(ids[:-1])
            captions = [c.decode() for c in record["captions"]]
            assert caption in captions
            k = captions.index(caption)
            np.testing.assert_array_equal(batch["box"][i], record["boxes"][k])
            np.testing.assert_array_equal(batch["reference_box"][i], record["reference_boxes"][k])
            assert batch["relation"][i] == record["relations"][k] and batch["has_box"][i]
            # What the truth check reads: the keys of the caption and its objects, every object of the image.
            subject, reference = record["subjects"][k].decode(), record["references"][k].decode()
            assert caption.startswith(f"the {subject} ") and caption.endswith(f" the {reference}")
            assert batch["caption_key"][i] == zlib.crc32(caption.encode()) & 0x7FFFFFFF
            assert batch["subject_key"][i] == zlib.crc32(subject.encode()) & 0x7FFFFFFF
            assert batch["reference_key"][i] == zlib.crc32(reference.encode()) & 0x7FFFFFFF
            names = [n.decode() for n in record["object_names"]]
            keys = [zlib.crc32(n.encode()) & 0x7FFFFFFF for n in names] + [-1] * (4 - len(names))
            np.testing.assert_array_equal(batch["scene_keys"][i], keys)
            np.testing.assert_array_equal(batch["scene_boxes"][i][: len(names)], record["object_boxes"])
            q = batch["query_mask"][i].sum()
            assert tokenizer.decode(batch["query_ids"][i][: q - 1]) == f"the {subject} and the {reference}"
            # Prompt ("plain" template): <img> <IMG_CONTEXT> x 3 </img> caption EOS, right-padded.
            m = batch["prompt_mask"][i].sum()
            prompt = batch["prompt_ids"][i][:m].tolist()
            expected_prompt = tokenizer.convert_tokens_to_ids([tok.IMG_START] + [tok.IMG_CONTEXT] * 3 + [tok.IMG_END])
            assert prompt == expected_prompt + ids.tolist()
            assert (batch["prompt_ids"][i][m:] == tokenizer.pad_token_id).all()
    assert it.stats["truncated_captions"] == 0 and it.stats["skipped_bad_records"] == 0


def test_same_seed_same_batches_other_seed_differs(config):
    first, again = _take(_train(config, seed=3), 8), _take(_train(config, seed=3), 8)
    _assert_same(first, again)
    other = _take(_train(config, seed=4), 8)
    assert [b["image_id"].tolist() for b in other] != [b["image_id"].tolist() for b in first]


def test_epochs_cover_every_image_once_in_new_orders(config):
    config = config.copy_and_resolve_references()
    config.num_epochs = 2
    batches = list(_train(config, global_batch_size=6))
    assert len(batches) == 2 * 24 // 6
    ids = [np.concatenate([b["image_id"] for b in batches[e * 4:(e + 1) * 4]]) for e in range(2)]
    assert sorted(ids[0]) == sorted(ids[1]) == list(range(24))
    assert ids[0].tolist() != ids[1].tolist()


def test_resume_from_state_gives_the_uninterrupted_batches(config):
    uninterrupted = _take(_train(config), 7)
    it = _train(config)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    resumed = _train(config)
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), uninterrupted[3:])
    assert resumed.stats["examples"] == 7 * 4


def test_resume_through_an_orbax_checkpoint(config, tmp_path):
    uninterrupted = _take(_train(config, seed=5), 6)
    it = _train(config, seed=5)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data=pipeline.checkpoint_args(it)))
        manager.wait_until_finished()
    fresh = _train(config, seed=5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=ocp.args.Composite(data=pipeline.checkpoint_restore_args(fresh)))
    _assert_same(_take(fresh, 4), uninterrupted[2:])


def test_process_shards_are_disjoint_and_cover_the_split(config):
    config = config.copy_and_resolve_references()
    config.num_epochs = 1
    shards = [list(_train(config, global_batch_size=8, shard_index=i, shard_count=2)) for i in range(2)]
    ids = [set(np.concatenate([b["image_id"] for b in s]).tolist()) for s in shards]
    assert len(shards[0]) == len(shards[1]) == 3  # 12 images per process, 4 rows per process and batch
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(24))
    # Eval: every (image, caption) pair exactly once over the processes, equal batch counts, padding marked.
    evals = [list(pipeline.make_iterator(config, INPUTS, split="validation", train=False, global_batch_size=6,
                                         seed=0, shard_index=i, shard_count=2)) for i in range(2)]
    assert len(evals[0]) == len(evals[1])
    pairs = []
    for batches in evals:
        for b in batches:
            for i in np.nonzero(b["valid"])[0]:
                pairs.append((int(b["image_id"][i]), bytes(b["text_ids"][i])))
    assert len(pairs) == len(set(pairs)) == 10 * 2


def test_truncation_is_counted_and_never_cuts_the_image_block(config, records):
    config = config.copy_and_resolve_references()
    config.max_text_length = 6
    config.max_prompt_length = 9
    it = _train(config)
    tokenizer = INPUTS.tokenizer
    want_text = want_prompt = 0
    for batch in _take(it, 4):
        for i in range(4):
            n = batch["text_mask"][i].sum()
            caption_tokens = None
            record = records[int(batch["image_id"][i])]
            for c in record["captions"]:
                full = tokenizer.encode(c.decode(), add_special_tokens=False)
                if full[: n - 1] == batch["text_ids"][i][: n - 1].tolist():
                    caption_tokens = full
            assert caption_tokens is not None
            want_text += len(caption_tokens) + 1 > 6
            want_prompt += 5 + len(caption_tokens) + 1 > 9
            prompt = batch["prompt_ids"][i][: batch["prompt_mask"][i].sum()].tolist()
            ids = tokenizer.convert_tokens_to_ids([tok.IMG_START, tok.IMG_CONTEXT, tok.IMG_END, tok.IM_END])
            assert prompt[:5] == [ids[0]] + [ids[1]] * 3 + [ids[2]] and prompt[-1] == ids[3]
            assert prompt[5:-1] == caption_tokens[: len(prompt) - 6]
    assert want_text > 0 and want_prompt > 0
    assert it.stats["truncated_captions"] == want_text
    assert it.stats["truncated_prompts"] == want_prompt


WIDE = dict(image_size=32, num_train=12, num_validation=6, num_test=2, aspect_ratios=(2.0, 0.5, 1.0))


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory):
    """Non-square images (64x32, 32x64, 32x32) tiled into up to 4 tiles of 16 px + a thumbnail."""
    return data_config(data_dir=str(tmp_path_factory.mktemp("tfds_wide")), builder_config="", builder_params=WIDE,
                       max_tiles=4)


def _grid_regions(cols, rows):
    return [[c / cols, r / rows, (c + 1) / cols, (r + 1) / rows] for r in range(rows) for c in range(cols)]


def _check_rows(batch, source_by_id, max_tiles):
    """Every row's tiles are InternVL's dynamic tiles of its image, with their regions, and its prompt holds one
    <IMG_CONTEXT> run of tokens_per_tile x tiles; padding tiles are zero and never referenced."""
    context = INPUTS.tokenizer.convert_tokens_to_ids(tok.IMG_CONTEXT)
    used = set()
    for i in range(len(batch["image_id"])):
        image = PIL.Image.open(io.BytesIO(source_by_id[int(batch["image_id"][i])]["image"]))
        n = int(batch["num_tiles"][i])
        want = preprocess.dynamic_tiles(image, 16, 1, max_tiles, True)
        assert n == len(want) == preprocess.num_tiles(image.width, image.height, 16, 1, max_tiles)
        index = batch["row_tiles"][i, :n]
        assert (batch["row_tiles"][i, n:] == -1).all()
        np.testing.assert_allclose(batch["tiles"][index], want, atol=1e-6)
        cols, rows = preprocess.choose_grid(image.width, image.height, 16, 1, max_tiles)
        regions = _grid_regions(cols, rows) + ([[0.0, 0.0, 1.0, 1.0]] if n > 1 else [])
        np.testing.assert_allclose(batch["tile_regions"][index], regions, atol=1e-6)
        assert batch["image_aspect"][i] == np.float32(image.width / image.height)
        assert (batch["prompt_ids"][i] == context).sum() == 3 * n
        used.update(index.tolist())
    unused = sorted(set(range(len(batch["tiles"]))) - used)
    assert not batch["tiles"][unused].any()
    return used


def _records(data_config, split):
    _, source = pipeline.load_source(data_config, split)
    return {int(r["image_id"]): r for r in (source[i] for i in range(len(source)))}


@pytest.fixture(scope="module")
def wide_records(wide_config):
    return _records(wide_config, "train")


def test_dynamic_tiles_in_training(wide_config, wide_records):
    it = _train(wide_config, global_batch_size=4, tile_multiple=2)
    sizes = batching.bucket_sizes(4 * 5, 4, 2)  # budget: 4 images x (4 tiles + thumbnail)
    counts, real, padding = set(), 0, 0
    for batch in _take(it, 6):
        used = _check_rows(batch, wide_records, 4)
        assert len(batch["tiles"]) in sizes and len(batch["tiles"]) >= len(used)
        counts.update(batch["num_tiles"].tolist())
        real += int(batch["num_tiles"].sum())
        padding += len(batch["tiles"]) - int(batch["num_tiles"].sum())
    assert counts == {3, 5}  # 2x1 and 1x2 grids + thumbnail; square images take 2x2 + thumbnail
    assert it.stats["retiled_images"] == 0
    assert (it.stats["tiles"], it.stats["padding_tiles"]) == (real, padding)


def test_tile_budget_retiles_the_largest_images(wide_config, wide_records):
    """A budget of 2 tiles per image: batches over it re-tile their largest image with the next smaller grid
    (counted), never truncate; the prompts follow the final tile counts."""
    c = wide_config.copy_and_resolve_references()
    c.tile_budget = 2.0
    it = _train(c, global_batch_size=4)
    context = INPUTS.tokenizer.convert_tokens_to_ids(tok.IMG_CONTEXT)
    retiled_rows = 0
    for batch in _take(it, 6):
        assert batch["num_tiles"].sum() <= 8 and len(batch["tiles"]) in batching.bucket_sizes(8, 4)
        for i in range(4):
            image = PIL.Image.open(io.BytesIO(wide_records[int(batch["image_id"][i])]["image"]))
            n = int(batch["num_tiles"][i])
            full = preprocess.num_tiles(image.width, image.height, 16, 1, 4)
            if n < full:  # re-tiled: InternVL's tiling with fewer tiles allowed
                retiled_rows += 1
                grid = n - 1 if n > 1 else 1
                np.testing.assert_allclose(batch["tiles"][batch["row_tiles"][i, :n]],
                                           preprocess.dynamic_tiles(image, 16, 1, grid, True), atol=1e-6)
            assert (batch["prompt_ids"][i] == context).sum() == 3 * n
    assert retiled_rows > 0 and it.stats["retiled_images"] >= retiled_rows


def test_eval_rows_of_an_image_share_its_tiles(wide_config):
    batches = list(pipeline.make_iterator(wide_config, INPUTS, split="validation", train=False, global_batch_size=6,
                                          seed=0, shard_index=0, shard_count=1))
    records = _records(wide_config, "validation")
    for batch in batches:
        _check_rows(batch, records, 4)
        ids = batch["image_id"]
        for i in range(len(ids)):
            for j in range(len(ids)):
                same = (batch["row_tiles"][i] == batch["row_tiles"][j]).all()
                assert same == (ids[i] == ids[j])  # each image's tiles once per batch
        distinct = {int(k): int(n) for k, n in zip(ids, batch["num_tiles"])}
        assert len(batch["tiles"]) >= sum(distinct.values())
    # The tile array is sized for the batch's images, not its rows: the smallest bucket of (the most images a
    # batch holds) x (4 tiles + thumbnail) that fits.
    most = max(len(set(batch["image_id"].tolist())) for batch in batches)
    assert most < 6
    sizes = batching.bucket_sizes(most * 5, 4)
    assert [len(b["tiles"]) for b in batches] == [min(n for n in sizes if n >= b["num_tiles"][
        np.unique(b["image_id"], return_index=True)[1]].sum()) for b in batches]


def test_worker_processes_give_the_same_batches(config):
    """One worker process (each costs a few seconds of start-up here): same batches, exact resume."""
    config_w = config.copy_and_resolve_references()
    config_w.num_workers = 1
    with_workers = _train(config_w, seed=7)
    _assert_same(_take(with_workers, 3), _take(_train(config, seed=7), 3))
    state = with_workers.get_state()
    expected = _take(with_workers, 2)
    with_workers.close()
    resumed = _train(config_w, seed=7)
    resumed.set_state(state)
    _assert_same(_take(resumed, 2), expected)
    resumed.close()


def test_skipped_bad_records_are_reported(tmp_path):
    manual = tmp_path / "manual"
    images = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        name = f"COCO_val2014_{i:012d}.jpg"
        (manual / "val2014").mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(manual / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "cocoid": i, "split": split,
                       "sentences": [{"raw": f"image {i} caption {j}"} for j in range(5)]})
    (manual / "val2014" / images[1]["filename"]).write_bytes(b"not an image")
    (manual / "dataset_coco.json").write_text(json.dumps({"images": images}))
    c = data_config(name="coco_captions", builder_config="", data_dir=str(tmp_path / "tfds"),
                    manual_dir=str(manual), skip_bad_records=True)
    kw = dict(split="train", train=True, global_batch_size=1, seed=0, shard_index=0, shard_count=1)
    it = pipeline.make_iterator(c, INPUTS, **kw)
    assert {int(next(it)["image_id"][0]) for _ in range(3)} == {0}
    assert it.stats["skipped_bad_records"] == 1
    c.skip_bad_records = False
    c.data_dir = str(tmp_path / "tfds2")
    with pytest.raises(ValueError, match=r"cocoid=1 .*COCO_val2014_000000000001\.jpg"):
        pipeline.make_iterator(c, INPUTS, **kw)


def test_builder_params_and_builder_config_do_not_mix(config):
    with pytest.raises(ValueError, match="builder_params"):
        pipeline.make_builder(data_config(builder_config="tiny", builder_params=dict(image_size=32)))
    with pytest.raises(ValueError, match="builder_params"):
        pipeline.make_builder(data_config(name="coco_captions", builder_config="", builder_params=dict(num_test=2)))


def test_a_missing_field_is_an_error_naming_it(config):
    fields = config.to_dict()
    del fields["max_text_length"]
    with pytest.raises(AttributeError, match="max_text_length"):
        _train(ml_collections.ConfigDict(fields))


def test_model_inputs_come_from_the_model_config():
    from vlm_jax.models.config import InternVLConfig

    tokenizer = tok.make_tokenizer("demo")
    context = tokenizer.convert_tokens_to_ids(tok.IMG_CONTEXT)
    model = InternVLConfig.tiny(image_size=64, vocab_size=len(tokenizer), image_token_id=context)
    inputs = pipeline.ModelInputs.from_model(model, tokenizer)
    # 64 px tiles of 8 px patches: an 8 x 8 grid, pixel shuffle 0.5 -> 4 x 4 tokens.
    assert (inputs.tokenizer, inputs.image_size, inputs.num_image_tokens) == (tokenizer, 64, 16)
    with pytest.raises(ValueError, match="image_token_id"):
        pipeline.ModelInputs.from_model(model.replace(image_token_id=context - 1), tokenizer)
    with pytest.raises(ValueError, match="vocabulary"):
        small = InternVLConfig.tiny(vocab_size=len(tokenizer) - 1, image_token_id=context)
        pipeline.ModelInputs.from_model(small, tokenizer)


def test_pipeline_runs_without_tensorflow(tmp_path):
    """Build + read + preprocess + tokenise with the TensorFlow import blocked (tfds via array_record sources)."""
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "tensorflow":
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Block())
        _find = importlib.util.find_spec
        importlib.util.find_spec = lambda n, p=None: None if n.split(".")[0] == "tensorflow" else _find(n, p)
        from fixtures import data_config
        from vlm_jax import tokenizer
        from vlm_jax.data import pipeline
        c = data_config(data_dir={str(tmp_path)!r}, builder_config="",
                        builder_params=dict(image_size=32, num_train=8, num_validation=2, num_test=2))
        inputs = pipeline.ModelInputs(tokenizer.make_tokenizer("demo"), image_size=32, num_image_tokens=4)
        it = pipeline.make_iterator(c, inputs, split="train", train=True, global_batch_size=4, seed=0,
                                    shard_index=0, shard_count=1)
        assert next(it)["tiles"].shape == (4, 32, 32, 3)
        assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
        print("ok")
    """)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
