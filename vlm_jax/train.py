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
from typing import Any

import jax
import ml_collections

from vlm_jax import build, config_check, runs, sharding
from vlm_jax import workdir as workdir_lib
from vlm_jax.checkpoints import run as run_checkpoints
from vlm_jax.run_logging import RunLog, window_summary
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


def _train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> dict[str, Any]:
    from clu import parameter_overview, periodic_actions

    mesh = sharding.make_mesh(config.mesh)
    backbone = build.resolve_backbone(config.model)
    runs.check_splits(config, train=True)
    num_steps = resolve_num_train_steps(config)
    trainer = make_trainer(config, mesh, num_steps, backbone.config)
    checkpoints = run_checkpoints.RunCheckpoints(workdir, config.checkpoint)
    _check_resume(checkpoints, config, allow_config_change)
    inputs = runs.model_inputs(backbone)
    train_iter = runs.make_data(config, inputs, config.data.train_split, train=True)
    model_state, items, start, source = run_checkpoints.restore_or_init(
        checkpoints, init_from=config.init_from, abstract_model=trainer.abstract_model,
        abstract_train=trainer.abstract_train_items(), init_model=trainer.init_model_state,
        init_train=trainer.init_train_items, data_iter=train_iter, init_from_keys=tuple(config.init_from_keys))
    state = trainer.assemble(model_state, items)
    del model_state, items
    meta = dict(config=config.to_json(), source=source)

    log = RunLog(workdir)
    log.resume_at(start)
    if start == 0:
        log.hparams(config.to_dict())
        logging.info("Model source: %s", source)
        logging.info("Trainable parameters:\n%s",
                     parameter_overview.get_parameter_overview(state.params.to_pure_dict(), include_stats=False))
        logging.info("Frozen parameters: %d", parameter_overview.count_parameters(state.frozen.to_pure_dict()))
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=log.writer)
    rng = jax.random.key(config.seed + 1)
    results: dict[str, Any] = {}
    pending: list[dict] = []
    log_every, eval_every, every = int(config.log_every), int(config.eval_every), int(config.checkpoint.every_steps)
    max_bad = int(config.max_consecutive_nonfinite)

    def checkpoint(step, metrics=None):
        checkpoints.save(step, state.model_state(), state.train_items(), train_iter, meta, metrics)

    step, previous = start, None
    try:
        while step < num_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = sharding.global_batch(next(train_iter), mesh)
                state, metrics = trainer.train_step(state, batch, rng)
            step += 1
            pending.append(metrics)
            report(step)
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
                pending = []
                for group, sched in trainer.opt.schedules.items():
                    summary[f"lr/{group}"] = float(sched((step - 1) // trainer.opt.accum_steps))
                log.scalars(step, summary)
            evaluated = bool(config.eval_splits) and ((eval_every and step % eval_every == 0) or step == num_steps)
            if evaluated:
                with report.timed("eval"):
                    for split in config.eval_splits:
                        results[split] = runs.evaluate_state(trainer, state, config, inputs, split)
                        log.evaluation(step, split, results[split])
            if evaluated or step % every == 0 or step == num_steps:
                checkpoint(step, _flat_results(results) if evaluated else None)
        checkpoints.close()
    except BaseException:
        checkpoints.abandon()  # a save in flight commits (or fails) before the error propagates
        raise
    finally:
        log.flush()
    return results
