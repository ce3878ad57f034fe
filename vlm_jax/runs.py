"""A run's pieces outside the train loop: its data iterators, evaluating a state on a split, and restoring a run
from its workdir for evaluation (``--mode eval``, the notebooks and the figure scripts all use `restore_run`).

    run = restore_run(workdir)               # latest checkpoint, with the config it was trained with
    results = evaluate_split(run, "test")    # {metric: float}, the names of metrics.jsonl
    collected = collect_split(run, "test")   # per-example host arrays: embeddings, predicted boxes, labels, ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from vlm_jax import build, config_check, evaluate, sharding
from vlm_jax.checkpoints import run as run_checkpoints
from vlm_jax.trainer import Trainer, TrainState, make_trainer


def model_inputs(backbone: build.Backbone):
    """What the data pipeline takes from the model: tokenizer, tile size, image tokens per tile."""
    from vlm_jax.data import pipeline  # the TensorFlow-backed data stack loads only when data is read

    return pipeline.ModelInputs.from_model(backbone.config, backbone.tokenizer)


def check_splits(config, *, train: bool) -> None:
    """Builds the dataset when needed (``config.data.prepare``) and checks that the configured splits exist."""
    from vlm_jax.data import pipeline

    config_check.validate_splits(config, pipeline.make_builder(config.data).info.splits.keys(), train=train)


def make_data(config, inputs, split: str, *, train: bool, cache=None):
    """This process's iterator of host batches (its share of ``config.batch_size`` / ``eval_batch_size``);
    with ``cache`` (this process's `vlm_jax.feature_cache.CacheShard` of the split) the batches carry the backbone's
    cached outputs instead of images."""
    from vlm_jax.data import pipeline

    return pipeline.make_iterator(config.data, inputs, split=split, train=train,
                                  global_batch_size=config.batch_size if train else config.eval_batch_size,
                                  seed=config.seed, shard_index=jax.process_index(),
                                  shard_count=jax.process_count(),
                                  tile_multiple=sharding.local_batch_shards(sharding.make_mesh(config.mesh)),
                                  cache=cache)


def collect_state(trainer: Trainer, state: TrainState, config, inputs, split: str, cache=None) -> dict:
    """Per-example host outputs and batch fields of ``split`` (valid rows only) + ``loss_terms``."""
    local = config.eval_batch_size // jax.process_count()
    return evaluate.collect(lambda b: trainer.eval_step(state, b),
                            make_data(config, inputs, split, train=False, cache=cache),
                            local, lambda b: sharding.global_batch(b, trainer.mesh))


def eval_pictures(trainer: Trainer, config, split: str, collected: dict, cache: dict) -> dict:
    """The tasks' TensorBoard pictures of one evaluation of ``split`` ({} when they cannot be drawn, with a
    warning naming why: pictures never stop a run). ``cache`` keeps each split's examples between evaluations."""
    from vlm_jax.eval_pictures import EvalExamples

    try:
        if split not in cache:
            cache[split] = EvalExamples.load(config.data, split, collected["image_id"])
        if cache[split] is None:
            return {}
        out = {}
        for task in trainer.tasks.values():
            out.update(task.eval_pictures(collected, cache[split]))
        return out
    except Exception as err:  # pylint: disable=broad-except
        logging.warning("No evaluation pictures for split %r: %s: %s", split, type(err).__name__, err)
        cache[split] = None
        return {}


def evaluate_state(trainer: Trainer, state: TrainState, config, inputs, split: str, cache=None) -> dict[str, float]:
    """Every task's metrics on ``split`` (from ``cache``, its `vlm_jax.feature_cache.CacheShard`, when given)."""
    return evaluate.compute_metrics(trainer.tasks.values(),
                                    collect_state(trainer, state, config, inputs, split, cache))


@dataclasses.dataclass
class RestoredRun:
    """A checkpoint of a run, restored onto the current devices."""

    config: ml_collections.ConfigDict
    step: int
    meta: dict[str, Any]  # 'source': where the run's initial weights came from; 'config': the stored config
    trainer: Trainer
    state: TrainState
    inputs: Any  # data.pipeline.ModelInputs

    @property
    def model(self) -> nnx.Module:
        """The multitask model with the restored weights (for calls outside the jitted eval step)."""
        return self.trainer.model(self.state)


def restore_run(workdir: str, step: int | None = None, config: ml_collections.ConfigDict | None = None
                ) -> RestoredRun:
    """Restores the checkpoint ``step`` (default: the latest) of the run in ``workdir``.

    ``config`` defaults to the one stored with the checkpoint (what the run was trained with); pass one to
    evaluate with other evaluation settings (e.g. splits, batch size), the model and tasks must stay the same.
    """
    steps = run_checkpoints.checkpoint_steps(workdir)
    if not steps:
        raise ValueError(f"{workdir!r} holds no finished checkpoint (expected {run_checkpoints.CHECKPOINT_SUBDIR}/"
                         f"<step>/ from a training run).")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise ValueError(f"{workdir!r} has no checkpoint at step {step}; it has steps {sorted(steps)}.")
    meta = run_checkpoints.read_meta(workdir, step)
    if config is None:
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
    mesh = sharding.make_mesh(config.mesh)
    backbone = build.resolve_backbone(config.model)
    # The schedules' length does not change any restored array: one step is enough to build the optimizer.
    trainer = make_trainer(config, mesh, 1, backbone.config)
    checkpoints = run_checkpoints.RunCheckpoints(workdir, config.checkpoint)
    model_state, items, _ = checkpoints.restore(step, trainer.abstract_model, trainer.abstract_train_items())
    return RestoredRun(config=config, step=step, meta=meta, trainer=trainer,
                       state=trainer.assemble(model_state, items), inputs=model_inputs(backbone))


def evaluate_split(run: RestoredRun, split: str, cache=None) -> dict[str, float]:
    return evaluate_state(run.trainer, run.state, run.config, run.inputs, split, cache)


def collect_split(run: RestoredRun, split: str) -> dict:
    return collect_state(run.trainer, run.state, run.config, run.inputs, split)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """``--mode eval``: evaluates a checkpoint of ``workdir`` on ``config.eval_splits`` and appends the results to
    its metrics.jsonl (``mode="eval"``). Never builds the training split. With ``feature_cache.enabled`` the
    evaluation splits' caches are read (the training run's, when its backbone and settings are the same) or
    written first."""
    from vlm_jax import console, run_summary
    from vlm_jax.run_logging import RunLog

    check_splits(config, train=False)
    run = restore_run(workdir, step, config)
    caches = {}
    if config_check.feature_cache_enabled(config):
        from vlm_jax import feature_cache

        caches = feature_cache.prepare(run.trainer, run.state, config, run.inputs, workdir,
                                       splits=tuple(config.eval_splits))
    log = RunLog(workdir)
    results = {}
    for split in config.eval_splits:
        began = time.monotonic()
        results[split] = evaluate_split(run, split, caches.get(split))
        seconds = time.monotonic() - began
        logging.info("%s", console.headline(split, run.step, results[split], run.trainer.headline_metrics, seconds))
        log.evaluation(run.step, split, results[split], mode="eval")
    log.flush()
    logging.info("Evaluation of %s at step %d (appended to %s with mode=eval):\n%s", workdir, run.step,
                 log.metrics_path, "\n".join(run_summary.metrics_table(results)))
    return results
