"""Checking that a run can use the feature cache, and the write pass that fills (or resumes) each split's cache."""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import time

import jax
import numpy as np
from etils import epath
from flax import nnx

from vlm_jax import config_check, multitask, optim, sharding
from vlm_jax.feature_cache import key as key_lib
from vlm_jax.feature_cache.store import CAPTION_FIELDS, IMAGE_FIELDS, SPARSE_TILE_FIELDS, CacheError, CacheShard, \
    ShardLayout, field_spec, row_bytes


def check_cacheable(config, trainer) -> None:
    """CacheError naming why `config` cannot train from cached backbone outputs: a trainable backbone parameter
    (its paths), fusion 'lm' or the lm task (their language model reads trained image tokens)."""
    problems = config_check.feature_cache_problems(config)
    params = nnx.split_state(trainer.abstract_model, trainer.trainable, ...)[0]
    paths = [optim.path_to_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    trainable = [p for p in paths if p.startswith("backbone/")]
    if trainable:
        shown = ", ".join(trainable[:5]) + (f" and {len(trainable) - 5} more" if len(trainable) > 5 else "")
        problems.append(f"{len(trainable)} backbone parameters are trainable ({shown}); the cache needs the whole "
                        "backbone in the optimizer group 'frozen' (optim.rules) and no LoRA on it")
    if problems:
        raise CacheError("config.feature_cache.enabled needs a frozen backbone whose outputs never change:\n  - "
                         + "\n  - ".join(problems))


def cache_root(config, workdir: str) -> epath.Path:
    return epath.Path(config.feature_cache.dir or epath.Path(workdir) / "feature_cache")


def backbone_digest(state) -> str:
    """sha256 of the frozen backbone's parameters in the train state."""
    return key_lib.weights_digest(state.frozen["backbone"] if "backbone" in state.frozen else state.frozen)


def open_shard(config, trainer, state, inputs, split: str, root, *, shard_index: int, shard_count: int,
               weights: str | None = None) -> tuple[CacheShard, dict]:
    """(the cache of `split` for this shard, the settings of its key), at root/<split>/<key[:16]>/process_<i>_of_<n>.
    `weights`: `backbone_digest(state)` when already computed."""
    from vlm_jax.data import pipeline

    builder = pipeline.make_builder(config.data)
    fields = multitask.cached_fields(config.model.embedding.vision_pool, trainer.tasks.values())
    settings = key_lib.cache_settings(config, builder, split, inputs, weights or backbone_digest(state), fields,
                                      shard_index, shard_count)
    key = key_lib.cache_key(settings)
    records, counts = pipeline.shard_images(config.data, split, shard_index, shard_count)
    directory = epath.Path(root) / split / key[:16] / f"process_{shard_index}_of_{shard_count}"
    return CacheShard(directory, key, ShardLayout(records, counts)), settings


def _local_rows(outputs: dict, mesh) -> dict[str, np.ndarray]:
    """This process's rows of the step's global outputs."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in outputs.items()}
    from jax.experimental import multihost_utils

    local = multihost_utils.global_array_to_host_local_array(outputs, mesh, sharding.batch_sharding(mesh).spec)
    return {k: np.asarray(v) for k, v in local.items()}


def _agree(value: int, how) -> int:
    """`how` (np.min / np.max) of `value` over the processes."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(how(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _trim_texts(host: dict, multiple: int = 8) -> dict:
    """The batch's captions and queries cut to their longest row (rounded up to `multiple`, the same in every
    process): right padding that the language model would run over for nothing. Causal attention never lets a
    token see the padding after it, so the pooled features keep their values (up to the order of float sums)."""
    out = dict(host)
    for ids, mask in (("text_ids", "text_mask"), ("query_ids", "query_mask")):
        if mask not in host:
            continue
        full = host[mask].shape[1]
        longest = _agree(int(host[mask].sum(axis=1).max()), np.max)
        keep = min(full, -(-max(longest, 1) // multiple) * multiple)
        out[ids], out[mask] = host[ids][:, :keep], host[mask][:, :keep]
    return out


def _check_finite(outputs: dict, image_ids: np.ndarray, dataset: str, split: str) -> None:
    for name, values in outputs.items():
        if np.issubdtype(values.dtype, np.integer):
            continue
        bad = ~np.isfinite(np.asarray(values, np.float32)).reshape(len(values), -1).all(axis=1)
        if bad.any():
            raise CacheError(f"the backbone gave non-finite {name} for {dataset} split {split!r} image_id="
                             f"{image_ids[bad][:5].tolist()}; nothing of this batch is cached (check the checkpoint)")


def write_shard(trainer, state, config, inputs, split: str, cache: CacheShard, settings: dict, *,
                shard_index: int, shard_count: int, on_batch=None) -> CacheShard:
    """Fills `cache` with the backbone's outputs for every (image, caption) of this shard (the evaluation order),
    resuming after the batches a killed pass left on disk; returns it ready to read. The size is logged (and the
    free disk checked) before anything is written. `on_batch(n)` is called after batch n is on disk."""
    from vlm_jax.data import pipeline

    state_now, done = cache.status()
    local = int(config.eval_batch_size) // shard_count
    total = pipeline.eval_batch_count(config.data, split, shard_count, local)
    done = total if state_now == "complete" else done
    start = _agree(done, np.min)  # every process runs the same steps (the backbone step is one program)
    if start >= total:
        logging.info("Feature cache of %r (process %d of %d): reusing %s", split, shard_index, shard_count,
                     cache.directory)
        return cache
    if state_now == "partial":
        logging.info("Feature cache of %r: resuming %s at batch %d of %d", split, cache.directory, start, total)
    data_config = copy.deepcopy(config.data)
    with data_config.unlocked():
        data_config.tile_budget = 0  # every image at its own tiling, whatever else shares its batch
    batches = pipeline.make_iterator(
        data_config, inputs, split=split, train=False, global_batch_size=int(config.eval_batch_size),
        seed=int(config.seed), shard_index=shard_index, shard_count=shard_count,
        tile_multiple=sharding.local_batch_shards(trainer.mesh), with_keys=True, first_batch=start)
    began = time.monotonic()
    trim = "cached_text_hidden" not in multitask.cached_fields(config.model.embedding.vision_pool,
                                                               trainer.tasks.values())
    for n, host in enumerate(batches, start=start + 1):
        records, captions = host.pop("record_index"), host.pop("caption_index")
        valid = host["valid"].astype(bool)
        if trim:
            host = _trim_texts(host)
        outputs = _local_rows(trainer.backbone_step(state, sharding.global_batch(host, trainer.mesh)), trainer.mesh)
        outputs.update(num_tiles=host["num_tiles"], image_aspect=host["image_aspect"])
        outputs = {k: v[valid] for k, v in outputs.items()}
        if state_now == "complete":
            continue  # this process's cache is whole; it only keeps the others' steps company
        _check_finite(outputs, host["image_id"][valid], config.data.name, split)
        if cache.spec is None:
            _create(cache, field_spec(outputs), settings, split, shard_index, shard_count)
        cache.write(outputs, records[valid], captions[valid])
        cache.mark_progress(n)
        if on_batch is not None:
            on_batch(n)
    if state_now != "complete":
        cache.mark_complete(total, time.monotonic() - began)
        logging.info("Feature cache of %r written in %.0f s: %s", split, time.monotonic() - began, cache.directory)
    return cache


def _create(cache: CacheShard, spec: dict, settings: dict, split: str, shard_index: int, shard_count: int) -> None:
    """Logs the cache's size, checks the free disk, creates the arrays."""
    layout = cache.layout
    per_image = row_bytes(spec, IMAGE_FIELDS) + row_bytes(spec, CAPTION_FIELDS) * layout.num_captions / max(
        layout.num_images, 1)
    size = math.ceil(per_image * layout.num_images)
    sparse = any(field in spec for field in SPARSE_TILE_FIELDS)  # the size counts every image's max_tiles
    logging.info("Feature cache of %r (process %d of %d): %d images, %d captions, %s%.1f MiB (%.1f KiB per image) "
                 "in %s%s", split, shard_index, shard_count, layout.num_images, layout.num_captions,
                 "at most " if sparse else "", size / 2**20, per_image / 2**10, cache.directory,
                 "; the patch tiles an image does not have take no disk" if sparse else "")
    cache.directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache.directory).free
    if free < size * 1.05:
        raise CacheError(f"the feature cache of {split!r} needs {size / 2**20:.1f} MiB in {cache.directory}, only "
                         f"{free / 2**20:.1f} MiB are free (set config.feature_cache.dir to a larger disk)")
    cache.create(spec, settings)


def other_caches(split_dir, key: str) -> list[tuple[epath.Path, int]]:
    """(directory, bytes on disk) of each cache in `split_dir` (root/<split>) whose key is not `key`: written
    under other weights or settings, never read by this run, left for the user to delete (another run may use
    them)."""
    split_dir = epath.Path(split_dir)
    if not split_dir.exists():
        return []
    out = []
    for directory in sorted(split_dir.iterdir()):
        if directory.name != key[:16] and directory.is_dir():
            files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
            out.append((directory, sum(os.stat(f).st_blocks * 512 for f in files)))
    return out


def prepare(trainer, state, config, inputs, workdir: str, splits: tuple[str, ...] | None = None
            ) -> dict[str, CacheShard]:
    """The caches of `splits` (default: the training split and the evaluation splits) for this process, written
    where missing: {split: CacheShard}."""
    check_cacheable(config, trainer)
    root = cache_root(config, workdir)
    shard_index, shard_count = jax.process_index(), jax.process_count()
    caches = {}
    weights = backbone_digest(state)
    if splits is None:
        splits = (config.data.train_split, *config.eval_splits)
    for split in dict.fromkeys(splits):
        cache, settings = open_shard(config, trainer, state, inputs, split, root, shard_index=shard_index,
                                     shard_count=shard_count, weights=weights)
        others = other_caches(root / split, cache.key)
        if others:
            logging.info("Feature cache of %r: %d caches of other weights or settings in %s (%.1f MiB on disk) are "
                         "not read by this run; delete them if no other run uses them", split, len(others),
                         root / split, sum(size for _, size in others) / 2**20)
        caches[split] = write_shard(trainer, state, config, inputs, split, cache, settings,
                                    shard_index=shard_index, shard_count=shard_count)
    return caches
