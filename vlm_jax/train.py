"""The train loop: ``train_and_evaluate(config, workdir)`` trains, evaluates and checkpoints one run.

Before anything is built the config is checked (`vlm_jax.config_check`), and the workdir is locked for the run
(`vlm_jax.workdir`). Resume order (`vlm_jax.checkpoints.run.restore_or_init`): the newest intact checkpoint in the
workdir (model, optimizer, step, data iterator; refused when the config differs, see `vlm_jax.workdir`) ->
``config.init_from`` (a stage-1 workdir or a converted checkpoint: the modules ``config.init_from_keys``) -> the
model's own init (random, with a 'converted' backbone's weights).

Checkpoints are written every ``checkpoint.every_steps``, at every evaluation (with its metrics, for best-N
retention) and at the end. After ``config.max_consecutive_nonfinite`` skipped steps in a row (see
`vlm_jax.trainer`) the run saves a checkpoint of the last finite state and stops with `NonFiniteError`, one step
after the limit is reached. An error in the loop waits for a checkpoint being written before it propagates.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import jax
import ml_collections

from vlm_jax import build, config_check, config_reference, console, evaluate, run_summary, runs, sharding
from vlm_jax import workdir as workdir_lib
from vlm_jax.checkpoints import run as run_checkpoints
from vlm_jax.run_logging import RunLog, data_window, train_tags, window_summary
from vlm_jax.trainer import make_trainer


class NonFiniteError(RuntimeError):
    pass


def resolve_num_train_steps(config) -> int:
    """``config.num_train_steps`` micro-steps, or (when it is <= 0) ``config.num_epochs`` passes over the training
    images (the pipeline shows each image once per epoch, with one of its captions)."""
    if int(config.num_train_steps) > 0:
        return int(config.num_train_steps)
    from vlm_jax.data import pipeline

    num_images = pipeline.make_builder(config.data).info.splits[config.data.train_split].num_examples
    return max(1, math.ceil(float(config.num_epochs) * num_images / int(config.batch_size)))


def _flat_results(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"split/metric": value}``: an evaluation's results as stored with its checkpoint."""
    return {f"{split}/{k}": v for split, values in results.items() for k, v in values.items()}


def _check_resume(checkpoints: run_checkpoints.RunCheckpoints, config, allow_change: bool) -> None:
    """Refuses to resume a checkpoint trained with another config (see `vlm_jax.workdir`)."""
    for step in reversed(checkpoints.steps()):
        try:
            stored = json.loads(checkpoints.meta(step)["config"])
        except (ValueError, KeyError):
            continue  # an unreadable checkpoint is reported (and skipped) by the restore
        changes = workdir_lib.check_resume_config(stored, json.loads(config.to_json()),
                                                  f"checkpoint {checkpoints.directory}/{step}", allow_change)
        if changes:
            logging.warning("Resuming with %d changed config field(s): %s", len(changes),
                            "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
        return


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Trains ``config.num_train_steps`` micro-steps with periodic evaluation and checkpoints; resumes from
    ``workdir`` when it holds a checkpoint. Returns the final evaluation results per split.

    The config is checked before anything is built; the workdir is locked for the run; resuming with a config
    that differs outside `vlm_jax.workdir.SAFE_TO_CHANGE` needs ``allow_config_change``."""
    config_check.validate(config)
    with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
        return _train(config, workdir, allow_config_change)


def _parameter_tables(state) -> tuple[str, int, int]:
    """(text of the trainable and frozen parameter tables, number trainable, number frozen)."""
    from clu import parameter_overview

    trainable, frozen = state.params.to_pure_dict(), state.frozen.to_pure_dict()
    text = "Trainable parameters:\n" + parameter_overview.get_parameter_overview(trainable, include_stats=False)
    if frozen:
        text += "\n\nFrozen parameters:\n" + parameter_overview.get_parameter_overview(frozen, include_stats=False)
    count = parameter_overview.count_parameters
    return text, int(count(trainable)), int(count(frozen)) if frozen else 0


def _train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> dict[str, Any]:
    started = time.monotonic()
    mesh = sharding.make_mesh(config.mesh)
    backbone = build.resolve_backbone(config.model)
    runs.check_splits(config, train=True)
    num_steps = resolve_num_train_steps(config)
    trainer = make_trainer(config, mesh, num_steps, backbone.config)
    caching = config_check.feature_cache_enabled(config)
    if caching:
        from vlm_jax import feature_cache

        feature_cache.check_cacheable(config, trainer)  # before any data is read
    checkpoints = run_checkpoints.RunCheckpoints(workdir, config.checkpoint)
    _check_resume(checkpoints, config, allow_config_change)
    inputs = runs.model_inputs(backbone)
    train_iter = runs.make_data(config, inputs, config.data.train_split, train=True)
    model_state, items, start, source = run_checkpoints.restore_or_init(
        checkpoints, init_from=config.init_from, abstract_model=trainer.abstract_model,
        abstract_train=trainer.abstract_train_items(), init_model=trainer.init_model_state,
        init_train=trainer.init_train_items, data_iter=train_iter, init_from_keys=tuple(config.init_from_keys))
    if start >= num_steps:
        checkpoints.close()
        logging.info("%s", run_summary.summary(workdir, config, num_steps, complete=True))
        return run_summary.last_evaluations(workdir)[1]
    state = trainer.assemble(model_state, items)
    del model_state, items
    caches: dict[str, Any] = {}
    if caching:  # the backbone's outputs of every split once; the iterator goes on from the restored position
        caches = feature_cache.prepare(trainer, state, config, inputs, workdir)
        cached_iter = runs.make_data(config, inputs, config.data.train_split, train=True,
                                     cache=caches[config.data.train_split])
        cached_iter.set_state(train_iter.get_state())
        train_iter = cached_iter
    meta = dict(config=config.to_json(), source=source)

    log = RunLog(workdir)
    log.resume_at(start)
    log_every, eval_every, every = int(config.log_every), int(config.eval_every), int(config.checkpoint.every_steps)
    tables, num_trainable, num_frozen = _parameter_tables(state)
    config_file, params_file = log.run_files(config_reference.describe(config), tables)
    logging.info("Model from %s: %s trainable and %s frozen parameters; config: %s, parameter tables: %s",
                 source, f"{num_trainable:,}", f"{num_frozen:,}", config_file, params_file)
    logging.info("Compiling the train step, then training steps %d to %d%s", start + 1, num_steps,
                 f" (evaluating {', '.join(config.eval_splits)} every {eval_every} steps)" if eval_every and
                 config.eval_splits else "")
    if start == 0:
        log.hparams(config.to_dict())
    rng = jax.random.key(config.seed + 1)
    results: dict[str, Any] = {}
    pending: list[dict] = []
    max_bad = int(config.max_consecutive_nonfinite)
    evaluating = bool(config.eval_splits)

    def evals_after(step):  # evaluations still to come after `step` (the last step always evaluates)
        if not evaluating:
            return 0
        periodic = (num_steps - 1) // eval_every - step // eval_every if eval_every else 0
        return max(periodic, 0) + (step < num_steps)

    progress = console.Progress(num_steps, start, num_evals_left=evals_after)
    examples: dict[str, Any] = {}
    diagnostics = trainer.diagnostic_terms
    window_start = time.monotonic()
    window_data = getattr(train_iter, "stats", {})

    def checkpoint(step, metrics=None):
        checkpoints.save(step, state.model_state(), state.train_items(), train_iter, meta, metrics)

    def evaluate_all(step):
        for split in config.eval_splits:
            began = time.monotonic()
            collected = runs.collect_state(trainer, state, config, inputs, split, caches.get(split))
            results[split] = evaluate.compute_metrics(trainer.tasks.values(), collected)
            log.evaluation(step, split, results[split])
            logging.info("%s", console.headline(split, step, results[split], trainer.headline_metrics,
                                                time.monotonic() - began))
            if jax.process_index() == 0:
                log.pictures(step, split, runs.eval_pictures(trainer, config, split, collected, examples))
            progress.add_eval_time(time.monotonic() - began)

    step, previous = start, None
    try:
        while step < num_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = sharding.global_batch(next(train_iter), mesh)
                state, metrics = trainer.train_step(state, batch, rng)
            step += 1
            pending.append(metrics)
            line = progress(step, metrics["total"])
            if line:
                logging.info("%s", line)
            # The previous step's skip counter: that step has finished (or nearly) while this one is queued, so
            # reading it every step costs no stall of the device.
            if previous is not None and int(previous["nonfinite"]) >= max_bad:
                checkpoint(step)
                checkpoints.close()
                raise NonFiniteError(
                    f"{int(previous['nonfinite'])} consecutive steps with a non-finite loss, gradient or update by "
                    f"step {step - 1} (config.max_consecutive_nonfinite={max_bad}); the last finite parameters are "
                    f"checkpointed at step {step} in {checkpoints.directory}.")
            previous = metrics
            if step % log_every == 0 or step == num_steps:
                summary = window_summary(pending, trainer.last_value_terms)
                now = time.monotonic()
                summary["steps_per_sec"] = len(pending) / max(now - window_start, 1e-9)
                pending, window_start = [], now
                for group, sched in trainer.opt.schedules.items():
                    summary[f"lr/{group}"] = float(sched((step - 1) // trainer.opt.accum_steps))
                data_stats = getattr(train_iter, "stats", {})  # a custom iterator may count nothing
                summary.update(data_window(window_data, data_stats))
                if step == log_every or step == num_steps:
                    logging.info("Input padding: %.1f %% of tiles, %.1f %% of prompt tokens; %d images re-tiled",
                                 100 * summary["data/tile_padding"], 100 * summary["data/token_padding"],
                                 summary["data/retiled_images"])
                window_data = data_stats
                log.scalars(step, train_tags(summary, diagnostics))
            evaluated = evaluating and ((eval_every and step % eval_every == 0) or step == num_steps)
            if evaluated:
                evaluate_all(step)
                window_start = time.monotonic()
            if evaluated or step % every == 0 or step == num_steps:
                checkpoint(step, _flat_results(results) if evaluated else None)
        checkpoints.close()
    except BaseException:
        checkpoints.abandon()  # a save in flight commits (or fails) before the error propagates
        raise
    finally:
        log.flush()
    logging.info("%s", run_summary.summary(workdir, config, num_steps, complete=True,
                                           seconds=time.monotonic() - started))
    return results
