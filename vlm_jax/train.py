"""The train loop: ``train_and_evaluate(config, workdir)`` trains, evaluates and checkpoints one run.

Resume order (`vlm_jax.checkpoints.run.restore_or_init`): the latest checkpoint in the workdir (model, optimizer,
step, data iterator) -> ``config.init_from`` (a stage-1 workdir or a converted checkpoint: the modules
``config.init_from_keys``) -> the model's own init (random, with a 'converted' backbone's weights).

After ``config.max_consecutive_nonfinite`` skipped steps in a row (see `vlm_jax.trainer`) the run saves a checkpoint
of the last good parameters and stops with `NonFiniteError`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import ml_collections

from vlm_jax import runs, sharding
from vlm_jax.checkpoints import run as run_checkpoints
from vlm_jax import build
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


def _best_metrics(config, results):
    name = config.checkpoint.best_metric
    if not name:
        return None
    split, _, key = name.partition("/")
    if split in results and key in results[split]:
        return {name: results[split][key]}
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config.num_train_steps`` micro-steps with periodic evaluation and checkpoints; resumes from
    ``workdir`` when it holds a checkpoint. Returns the final evaluation results per split."""
    from clu import parameter_overview, periodic_actions

    mesh = sharding.make_mesh(config.mesh)
    num_steps = resolve_num_train_steps(config)
    backbone = build.resolve_backbone(config.model)
    trainer = make_trainer(config, mesh, num_steps, backbone.config)
    inputs = runs.model_inputs(backbone)
    train_iter = runs.make_data(config, inputs, config.data.train_split, train=True)
    manager = run_checkpoints.make_manager(workdir, config.checkpoint)
    model_state, items, start, source = run_checkpoints.restore_or_init(
        manager, init_from=config.init_from, abstract_model=trainer.abstract_model,
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

    def checkpoint(step):
        run_checkpoints.save(manager, step, state.model_state(), state.train_items(), train_iter, meta,
                             metrics=_best_metrics(config, results), force=True)

    step = start
    while step < num_steps:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = trainer.train_step(state, batch, rng)
        step += 1
        pending.append(metrics)
        report(step)
        if step % log_every == 0 or step == num_steps:
            summary = window_summary(pending, trainer.last_value_terms)
            pending = []
            for group, sched in trainer.opt.schedules.items():
                summary[f"lr/{group}"] = float(sched((step - 1) // trainer.opt.accum_steps))
            log.scalars(step, summary)
            if summary["nonfinite"] >= max_bad:
                checkpoint(step)
                manager.wait_until_finished()
                raise NonFiniteError(
                    f"{int(summary['nonfinite'])} consecutive steps with a non-finite loss or gradient at step {step} "
                    f"(config.max_consecutive_nonfinite={max_bad}); the last good parameters are checkpointed in "
                    f"{manager.directory}.")
        if config.eval_splits and ((eval_every and step % eval_every == 0) or step == num_steps):
            with report.timed("eval"):
                for split in config.eval_splits:
                    results[split] = runs.evaluate_state(trainer, state, config, inputs, split)
                    log.evaluation(step, split, results[split])
        if step % every == 0 or step == num_steps:
            checkpoint(step)
    manager.wait_until_finished()
    log.flush()
    return results
