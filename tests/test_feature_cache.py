"""The feature cache (`vlm_jax.feature_cache`): a run with it trains the same model as a run without (dropout on,
dynamic tiles, patch-reading head, spatial queries), resumed runs and `--mode eval` too; a write pass killed with SIGKILL resumes to the
same bytes; keys change with what changes a row and only with that; each process's shard holds its own images;
refusals name their cause before any data is read.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import fixtures
from vlm_jax import build, config_check, runs, sharding, train
from vlm_jax import feature_cache
from vlm_jax.feature_cache import key as key_lib
from vlm_jax.feature_cache import store
from vlm_jax.trainer import make_trainer

HERE = Path(__file__).resolve().parent


def cached_config(data_dir: str, *, enabled: bool = True):
    """The demo at test size with a frozen backbone: 8 steps of batch 8, dropout 0.1, up to 4 tiles + thumbnail
    per image, the attention box head (reads patches) and the spatial head on the objects query."""
    cfg = fixtures.demo_config()
    cfg.data = fixtures.data_config(data_dir=data_dir, max_tiles=4)
    cfg.model.tiny.image_size = 32  # 32-px tiles: the 64-px images get 2 x 2 tiles + a thumbnail
    cfg.batch_size, cfg.eval_batch_size = 8, 32
    cfg.num_train_steps, cfg.log_every, cfg.eval_every, cfg.eval_splits = 8, 4, 0, ("validation",)
    cfg.checkpoint.update(every_steps=2, keep=10, async_save=False)
    cfg.model.embedding.dropout = 0.1
    cfg.tasks.box.head = "attention"
    cfg.tasks.spatial.update(query="objects", head="mlp", locate=0.0)
    cfg.optim.rules = (("backbone/.*", "frozen"), (".*", "all"))
    cfg.feature_cache.enabled = enabled
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fixtures.build_tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def run_parts(data_dir):
    """(config, trainer, state, inputs) of a freshly initialised cached config."""
    cfg = cached_config(data_dir)
    trainer = make_trainer(cfg, sharding.make_mesh(cfg.mesh), 8)
    model_state = trainer.init_model_state()
    state = trainer.assemble(model_state, trainer.init_train_items(model_state))
    return cfg, trainer, state, runs.model_inputs(build.resolve_backbone(cfg.model))


def _params(workdir: str, step: int):
    run = runs.restore_run(workdir, step)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(run.state.params)[0]}


def test_a_cached_run_trains_the_same_model_and_resumes(data_dir, tmp_path):
    plain, cached = str(tmp_path / "plain"), str(tmp_path / "cached")
    expected = train.train_and_evaluate(cached_config(data_dir, enabled=False), plain)["validation"]
    got = train.train_and_evaluate(cached_config(data_dir), cached)["validation"]
    assert got.keys() == expected.keys() and len(got) > 20
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-6), name
    for step in (2, 8):
        a, b = _params(plain, step), _params(cached, step)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-6, err_msg=f"step {step} {name}")
    # Both splits were cached, once each, with only what the tasks read.
    complete = sorted((Path(cached) / "feature_cache").glob("*/*/process_0_of_1/complete.json"))
    assert [p.parts[-4] for p in complete] == ["train", "validation"]
    record = json.loads(complete[0].read_text())
    assert record["images"] == 256 and record["captions"] == 512
    assert sorted(record["spec"]) == ["cached_image", "cached_patches", "cached_query", "cached_regions",
                                      "cached_text", "image_aspect", "num_tiles"]
    assert record["spec"]["cached_patches"][0][0] == 5  # 4 tiles + thumbnail
    assert (np.load(complete[0].parent / "image.num_tiles.npy") == 5).all()
    written = {p: p.stat().st_mtime_ns for p in complete}

    # Resume: the last checkpoints are lost; the run restarts from step 4 (its data iterator included) and reads
    # the caches it has.
    for step in (6, 8):
        shutil.rmtree(Path(cached) / "checkpoints" / str(step))
    resumed = train.train_and_evaluate(cached_config(data_dir), cached)["validation"]
    for name in expected:
        assert resumed[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-6), name
    assert {p: p.stat().st_mtime_ns for p in complete} == written

    # --mode eval of the last checkpoint reads the run's validation cache; on the uncached run's workdir it writes
    # the validation split's cache only (never the training split's).
    for workdir in (cached, plain):
        evaluated = runs.evaluate_checkpoint(cached_config(data_dir), workdir)["validation"]
        for name in expected:
            assert evaluated[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-6), (workdir, name)
    assert {p: p.stat().st_mtime_ns for p in complete} == written
    assert [p.parts[-4] for p in (Path(plain) / "feature_cache").glob("*/*/process_0_of_1/complete.json")] == [
        "validation"]


def _arrays(directory: Path) -> dict:
    return {p.name: np.load(p) for p in sorted(directory.glob("*.npy"))}


def test_a_killed_write_pass_resumes_to_the_same_cache(run_parts, tmp_path):
    cfg, trainer, state, inputs = run_parts
    whole = feature_cache.prepare(trainer, state, cfg, inputs, str(tmp_path / "whole"))["train"]

    # A separate process writes the same cache and is killed with SIGKILL after its third batch is on disk.
    killed = tmp_path / "killed"
    script = (f"import os, signal, sys; sys.path.insert(0, {str(HERE)!r}); import test_feature_cache as t; "
              f"t.write_until_killed({cfg.data.data_dir!r}, {str(killed)!r}, 3)")
    env = dict(os.environ, XLA_FLAGS=fixtures.subprocess_xla_flags(8))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    partial = killed / "feature_cache" / "train" / whole.directory.parts[-2] / "process_0_of_1"
    assert json.loads((partial / "progress.json").read_text())["batches"] == 3
    assert not (partial / "complete.json").exists()

    resumed_at = []
    cache, settings = feature_cache.open_shard(cfg, trainer, state, inputs, "train", killed / "feature_cache",
                                               shard_index=0, shard_count=1)
    assert cache.directory == partial
    feature_cache.write_shard(trainer, state, cfg, inputs, "train", cache, settings, shard_index=0, shard_count=1,
                              on_batch=resumed_at.append)
    assert resumed_at[0] == 4 and resumed_at[-1] == 16  # only the batches that were not on disk
    a, b = _arrays(whole.directory), _arrays(partial)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def write_until_killed(data_dir: str, workdir: str, batches: int) -> None:
    """(Run in a subprocess.) The train split's write pass, killed with SIGKILL right after batch `batches`."""
    import signal

    cfg = cached_config(data_dir)
    trainer = make_trainer(cfg, sharding.make_mesh(cfg.mesh), 8)
    model_state = trainer.init_model_state()
    state = trainer.assemble(model_state, trainer.init_train_items(model_state))
    inputs = runs.model_inputs(build.resolve_backbone(cfg.model))
    cache, settings = feature_cache.open_shard(cfg, trainer, state, inputs, "train",
                                               feature_cache.cache_root(cfg, workdir), shard_index=0, shard_count=1)

    def kill(n):
        if n == batches:
            os.kill(os.getpid(), signal.SIGKILL)

    feature_cache.write_shard(trainer, state, cfg, inputs, "train", cache, settings, shard_index=0, shard_count=1,
                              on_batch=kill)


def test_each_process_shard_holds_its_own_images(run_parts, tmp_path, caplog):
    cfg, trainer, state, inputs = run_parts
    root = tmp_path / "cache"
    one, settings = feature_cache.open_shard(cfg, trainer, state, inputs, "validation", root, shard_index=0,
                                             shard_count=1)
    with caplog.at_level("INFO"):
        feature_cache.write_shard(trainer, state, cfg, inputs, "validation", one, settings, shard_index=0,
                                  shard_count=1)
    # The size is estimated and logged before the first write, and it is what the files take.
    done = json.loads((one.directory / "complete.json").read_text())
    estimate = [r.getMessage() for r in caplog.records if "MiB (" in r.getMessage()]
    assert len(estimate) == 1 and "64 images, 128 captions" in estimate[0]
    assert f"{done['bytes'] / 2**20:.1f} MiB" in estimate[0]
    keys = []
    for index in range(2):
        shard, settings = feature_cache.open_shard(cfg, trainer, state, inputs, "validation", root,
                                                   shard_index=index, shard_count=2)
        assert shard.directory.name == f"process_{index}_of_2" and shard.key != one.key
        feature_cache.write_shard(trainer, state, cfg, inputs, "validation", shard, settings, shard_index=index,
                                  shard_count=2)
        records = shard.layout.records
        np.testing.assert_array_equal(records, np.arange(index, 64, 2))  # validation: 64 images
        captions = np.zeros_like(records)
        mine, whole = shard.rows(records, captions), one.rows(records, captions)
        for name in whole:  # other batch compositions: equal up to the order of float sums
            np.testing.assert_allclose(mine[name], whole[name], rtol=1e-5, atol=1e-5, err_msg=name)
        with pytest.raises(feature_cache.CacheError, match="not in this shard"):
            shard.rows(records + 1, captions)
        keys.append(shard.directory.parent)
    # The two shards' caches have other keys: listed as not read by the single-process run, with their disk.
    others = feature_cache.other_caches(root / "validation", one.key)
    assert [d for d, _ in others] == sorted(keys)
    for directory, size in others:
        assert size >= sum(os.stat(p).st_blocks * 512 for p in directory.glob("*/*.npy")) > 0


def _holes_supported(directory: Path) -> bool:
    probe = directory / "probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
    holes = os.stat(probe).st_blocks * 512 < (1 << 20)
    probe.unlink()
    return holes


def test_the_patch_tiles_an_image_does_not_have_take_no_disk(tmp_path):
    if not _holes_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} has no sparse files")
    tiles, tile_bytes = np.asarray([1, 2, 3, 4, 1, 2]), 16 * 256 * 4  # 16 KiB per tile: four pages
    layout = feature_cache.ShardLayout(records=np.arange(6) * 3, caption_counts=np.asarray([1, 2, 1, 1, 1, 1]))
    cache = feature_cache.CacheShard(tmp_path / "shard", "k", layout)
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(6, 4, 16, 256)).astype(np.float32)
    patches[np.arange(4)[None, :] >= tiles[:, None]] = 0  # the backbone's zeros after num_tiles
    rows = [(0, 0), (3, 0), (3, 1), (6, 0), (9, 0), (12, 0), (15, 0)]  # (record, caption); image 3 twice
    image = np.asarray([r // 3 for r, _ in rows])
    outputs = dict(cached_patches=patches[image], num_tiles=tiles[image].astype(np.int32),
                   cached_text=rng.normal(size=(len(rows), 8)).astype(np.float32))
    cache.create(store.field_spec(outputs), {})
    records, captions = np.asarray(rows).T
    cache.write({k: v[:3] for k, v in outputs.items()}, records[:3], captions[:3])
    cache.write({k: v[3:] for k, v in outputs.items()}, records[3:], captions[3:])
    cache.mark_complete(2, 0.0)
    got = cache.rows(records, captions)
    for name, values in outputs.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    path = cache.directory / "image.cached_patches.npy"
    assert os.path.getsize(path) > 6 * 4 * tile_bytes  # every image's 4 tile slots (+ the header)
    allocated = os.stat(path).st_blocks * 512
    assert tiles.sum() * tile_bytes <= allocated <= tiles.sum() * tile_bytes + 7 * 2 * 4096  # + partial pages
    assert json.loads((cache.directory / "complete.json").read_text())["disk_bytes"] == cache.disk_bytes()


def _change_leaf(tree, name: str, change):
    """`tree` with `change` applied to its first leaf whose path contains `name`."""
    done = []

    def one(path, x):
        if not done and name in jax.tree_util.keystr(path):
            done.append(path)
            return change(x)
        return x

    out = jax.tree_util.tree_map_with_path(one, tree)
    assert done, name
    return out


def test_keys_change_with_what_changes_a_row_and_only_with_that(run_parts):
    cfg, trainer, state, inputs = run_parts
    from vlm_jax.data import pipeline

    builder = pipeline.make_builder(cfg.data)
    frozen = state.frozen["backbone"]
    weights = key_lib.weights_digest(frozen)
    base = key_lib.cache_settings(cfg, builder, "train", inputs, weights, ("cached_text",), 0, 1)

    def key_with(change=None, **kw):
        c = cfg.copy_and_resolve_references()
        if change:
            change(c)
        args = dict(split="train", weights=weights, fields=("cached_text",), shard=(0, 1)) | kw
        return key_lib.cache_key(key_lib.cache_settings(c, builder, args["split"], inputs, args["weights"],
                                                        args["fields"], *args["shard"]))

    same = key_lib.cache_key(base)
    assert key_with() == same
    # Settings that cannot change a row: the same key.
    for change in (lambda c: c.update(eval_batch_size=64, batch_size=16, seed=3),
                   lambda c: c.optim.groups.all.update(lr=1.0),
                   lambda c: c.model.embedding.update(adapter_dim=7, dropout=0.5),
                   lambda c: c.model.update(remat="full")):
        assert key_with(change) == same
    # What changes a row: another key.
    perturbed = _change_leaf(frozen, "patch_embedding", lambda x: x.at[(0,) * x.ndim].add(1e-6))
    changed = [key_with(weights=key_lib.weights_digest(perturbed)), key_with(split="validation"),
               key_with(shard=(1, 2)), key_with(fields=("cached_text", "cached_query")),
               key_with(lambda c: c.data.update(max_tiles=2)), key_with(lambda c: c.data.update(max_text_length=9)),
               key_with(lambda c: c.data.update(template="internvl2_5")),
               key_with(lambda c: c.model.embedding.update(text_pool="mean")),
               key_with(lambda c: c.model.tiny.vision.update(num_layers=3)),
               key_with(lambda c: c.model.update(dtype="bfloat16"))]
    assert len({same, *changed}) == len(changed) + 1
    version = dict(base, dataset=dict(base["dataset"], version="9.9.9"))
    assert key_lib.cache_key(version) != same


def test_refusals_name_their_cause_before_any_data(data_dir):
    cfg = cached_config(data_dir)
    cfg.optim.rules = ((r"backbone/vision_tower/.*", "frozen"), (".*", "all"))
    trainer = make_trainer(cfg, sharding.make_mesh(cfg.mesh), 8)
    with pytest.raises(feature_cache.CacheError, match=r"backbone parameters are trainable \(backbone/language_model"):
        feature_cache.check_cacheable(cfg, trainer)
    lora = cached_config(data_dir)
    lora.lora.update(rank=2, alpha=4.0, targets=(r".*q_proj",))
    lora.optim.rules = ((r".*lora.*", "all"), (r"backbone/.*", "frozen"), (".*", "all"))
    with pytest.raises(feature_cache.CacheError, match="lora"):
        feature_cache.check_cacheable(lora, make_trainer(lora, sharding.make_mesh(lora.mesh), 8))
    fused = cached_config(data_dir)
    fused.model.embedding.fusion = "lm"
    with pytest.raises(config_check.ConfigError, match="fusion='lm'"):
        config_check.validate(fused)


def test_non_finite_backbone_outputs_are_never_cached(run_parts, tmp_path):
    cfg, trainer, state, inputs = run_parts
    broken = state.replace(frozen=_change_leaf(state.frozen, "patch_embedding", lambda x: x * np.nan))
    cache, settings = feature_cache.open_shard(cfg, trainer, broken, inputs, "validation", tmp_path,
                                               shard_index=0, shard_count=1)
    with pytest.raises(feature_cache.CacheError, match=r"non-finite cached_image .* image_id=\["):
        feature_cache.write_shard(trainer, broken, cfg, inputs, "validation", cache, settings, shard_index=0,
                                  shard_count=1)
    assert not list(Path(tmp_path).rglob("*.npy")) and not list(Path(tmp_path).rglob("complete.json"))
