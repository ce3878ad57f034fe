"""Orbax checkpoints of a training run, and the one place that decides where a run's weights come from.

A checkpoint (``WORKDIR/checkpoints/<step>/``) is an ``ocp.args.Composite`` of
  ``model``  the whole model state (trainable + frozen parameters + other variables), as one nnx.State,
  ``train``  optimizer state, step and failure counters,
  ``data``   the grain iterator state (exact resume of the input order),
  ``meta``   JSON: step, config, where the initial weights came from.
Keeping ``model`` whole (not split by trainability) lets a stage-2 run with other frozen groups read a stage-1
checkpoint: ``restore_modules`` restores just ``model/backbone`` (or other top-level modules) with an orbax partial
restore.

Resume order (``restore_or_init``): latest checkpoint in the workdir → ``config.init_from`` (a converted backbone
directory from ``python -m vlm_jax.convert``, or a stage-1 workdir: backbone only) → random init.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from vlm_jax.checkpoints import converted

CHECKPOINT_SUBDIR = "checkpoints"


def make_manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
    """Manager that saves every ``every_steps`` (plus forced saves), keeps ``keep`` and optionally the best one.

    ckpt_cfg fields: every_steps, keep, best_metric ('' = keep the latest ones), best_mode ('max'|'min'),
    async_save.
    """
    best = ckpt_cfg.best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep,
        save_interval_steps=ckpt_cfg.every_steps,
        best_fn=(lambda metrics: float(metrics[best])) if best else None,
        best_mode=ckpt_cfg.best_mode,
        keep_checkpoints_without_metrics=True,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR)), options=options)


def save(manager: ocp.CheckpointManager, step: int, model_state, train_state, data_iter=None,
         meta: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
         force: bool = False) -> bool:
    """Saves (asynchronously when configured) if ``step`` is due or ``force``; returns whether it saved."""
    items = dict(model=ocp.args.StandardSave(model_state), train=ocp.args.StandardSave(train_state),
                 meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    if data_iter is not None:
        items["data"] = _grain_save(data_iter)
    return manager.save(int(step), args=ocp.args.Composite(**items),
                        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
                        force=force)


def _grain_save(data_iter):
    import grain

    return grain.checkpoint.CheckpointSave(data_iter)


def _grain_restore(data_iter):
    import grain

    return grain.checkpoint.CheckpointRestore(data_iter)


def restore(manager: ocp.CheckpointManager, step: int, abstract_model, abstract_train, data_iter=None):
    """Restores ``(model_state, train_state, meta)`` onto abstract trees that carry the target shardings; the
    data iterator (when given) is set in place."""
    items = dict(model=ocp.args.StandardRestore(abstract_model), train=ocp.args.StandardRestore(abstract_train),
                 meta=ocp.args.JsonRestore())
    if data_iter is not None:
        items["data"] = _grain_restore(data_iter)
    out = manager.restore(int(step), args=ocp.args.Composite(**items))
    return out["model"], out["train"], out["meta"]


def _restore_partial(item_dir: str, abstract_subtree):
    """Reads only the leaves named in ``abstract_subtree`` from a saved pytree item."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(item_dir, args=ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args,
                                                                  partial_restore=True))


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR))


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the finished checkpoints in a run's workdir ([] when there are none)."""
    return list(ocp.utils.checkpoint_steps(os.path.join(workdir, CHECKPOINT_SUBDIR)))


def restore_modules(init_from: str, abstract_model, keys=("backbone",)) -> dict:
    """Parameters of the top-level model modules ``keys`` from a stage-1 workdir (its latest checkpoint) or, for
    ``("backbone",)``, from a converted checkpoint directory. Returns ``{key: nnx.State}`` with the structure,
    shardings and dtypes of ``abstract_model[key]`` (parameters only)."""
    if not os.path.isdir(init_from):
        raise ValueError(f"config.init_from={init_from!r} is not a directory (expected a training workdir with "
                         f"'{CHECKPOINT_SUBDIR}/' or a converted checkpoint from `python -m vlm_jax.convert`).")
    missing = [k for k in keys if k not in abstract_model]
    if missing:
        raise ValueError(f"config.init_from_keys names {missing}, which the model does not have "
                         f"(top-level modules: {sorted(abstract_model.keys())}).")
    target = {k: abstract_model[k] if isinstance(abstract_model[k], nnx.Variable)
              else nnx.split_state(abstract_model[k], nnx.Param, ...)[0] for k in keys}
    if is_run_dir(init_from):
        steps = checkpoint_steps(init_from)
        if not steps:
            raise ValueError(f"config.init_from={init_from!r} has no finished checkpoint.")
        item = os.path.join(os.path.abspath(init_from), CHECKPOINT_SUBDIR, str(max(steps)), "model")
        return dict(_restore_partial(item, target))
    if tuple(keys) != ("backbone",):
        raise ValueError(f"config.init_from={init_from!r} is a converted backbone; only init_from_keys=('backbone',) "
                         f"can come from it, got {tuple(keys)}.")
    if not converted.is_converted(init_from):
        raise ValueError(f"config.init_from={init_from!r}: neither a training workdir ('{CHECKPOINT_SUBDIR}/') nor a "
                         f"converted checkpoint ({converted.CONFIG_FILE}).")
    return {"backbone": converted.restore_params(init_from, target["backbone"])}


def restore_or_init(manager: ocp.CheckpointManager, *, init_from: str, abstract_model, abstract_train,
                    init_model: Callable[[], Any], init_train: Callable[[Any], Any],
                    data_iter=None, init_from_keys=("backbone",)) -> tuple[Any, Any, int, str]:
    """The resume order, in one place. Returns ``(model_state, train_state, step, source)``.

    1. the latest checkpoint in this workdir (model, optimizer, step, data iterator);
    2. ``init_from``: random init, then the modules ``init_from_keys`` (default: the backbone) replaced by the
       stage-1 run's / converted checkpoint's weights;
    3. random init.
    ``init_model()`` builds the sharded model state; ``init_train(model_state)`` the optimizer state and counters.
    """
    latest = manager.latest_step()
    if latest is not None:
        model, train, meta = restore(manager, latest, abstract_model, abstract_train, data_iter)
        logging.info("Resuming from %s step %d", manager.directory, latest)
        return model, train, int(latest), f"resume:{latest}"
    model = init_model()
    if init_from:
        # Parameters only: other variables (if any) keep their initial values.
        for key, restored in restore_modules(init_from, abstract_model, init_from_keys).items():
            model[key] = restored if isinstance(restored, nnx.Variable) else nnx.merge_state(model[key], restored)
        logging.info("Initialised %s from %s", ", ".join(init_from_keys), init_from)
        source = f"init_from:{init_from}"
    else:
        source = "scratch"
    return model, init_train(model), 0, source


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The JSON ``meta`` item of checkpoint ``step`` (default: the latest)."""
    step = max(checkpoint_steps(workdir)) if step is None else step
    with open(os.path.join(workdir, CHECKPOINT_SUBDIR, str(step), "meta", "metadata")) as f:
        return json.load(f)
