"""Orbax checkpoints of a training run, and the one place that decides where a run's weights come from.

A checkpoint (``WORKDIR/checkpoints/<step>/``) is an ``ocp.args.Composite`` of
  ``model``  the whole model state (trainable + frozen parameters + other variables), as one nnx.State,
  ``train``  optimizer state, step and failure counters,
  ``data``   the grain iterator state (exact resume of the input order),
  ``meta``   JSON: step, config, where the initial weights came from, the evaluation metrics the checkpoint was
             saved with, and one fingerprint per array (`vlm_jax.checkpoints.integrity`).
Keeping ``model`` whole (not split by trainability) lets a stage-2 run with other frozen groups read a stage-1
checkpoint: ``restore_modules`` restores just ``model/backbone`` (or other top-level modules) with an orbax partial
restore.

What is guaranteed (`RunCheckpoints`):
- a state holding NaN or Inf is never saved; every restore compares each array with its fingerprint;
- a new checkpoint is read back from disk and verified before any older one is deleted, so the newest verified
  checkpoint always survives;
- on resume, a damaged newest checkpoint is moved to ``WORKDIR/damaged_checkpoints/<step>`` (kept for inspection)
  and the run resumes from the newest intact one;
- retention keeps the newest checkpoint (for resume) and, with ``best_metric``, the ``keep`` best by that metric
  among the checkpoints written at evaluations (else the ``keep`` newest);
- a save that fails (e.g. a full disk) surfaces as ``OSError`` naming the errno, message and path.

Resume order (``restore_or_init``): newest intact checkpoint in the workdir → ``config.init_from`` (a converted
backbone directory from ``python -m vlm_jax.convert``, or a stage-1 workdir: backbone only) → random init.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vlm_jax.checkpoints import converted, hf, integrity

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged_checkpoints"


def _grain_save(data_iter):
    import grain

    return grain.checkpoint.CheckpointSave(data_iter)


def _grain_restore(data_iter):
    import grain

    return grain.checkpoint.CheckpointRestore(data_iter)


def _os_error(err: BaseException, where: str) -> BaseException:
    """The OS error of a failed checkpoint write as an ``OSError(errno, strerror, path)``: from an orbax /
    TensorStore failure (``[os_error_code='28']`` in its text), or an OSError that names no file (a failed write()
    or flush), the path then being ``where`` (the step's checkpoint directory); other errors unchanged."""
    if isinstance(err, OSError):
        if err.filename or err.errno is None:
            return err
        return OSError(err.errno, err.strerror or os.strerror(err.errno), where)
    text = str(err)
    code = re.search(r"os_error_code='(\d+)'", text)
    if not code:
        return err
    path = re.search(r'Failed (?:writing|to write|to open)[^"]*"([^"]+)"', text)
    errno = int(code.group(1))
    return OSError(errno, os.strerror(errno), path.group(1) if path else where)


class RunCheckpoints:
    """The checkpoints of one run in ``WORKDIR/checkpoints``: saved with fingerprints, verified, pruned safely.

    ckpt_cfg fields: keep (>= 1), best_metric ('' = keep the newest ones; else "split/metric"), best_mode
    ('max'|'min'), async_save.
    """

    def __init__(self, workdir: str, ckpt_cfg):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_SUBDIR)
        self.keep, self.best_metric, self.best_mode = int(ckpt_cfg.keep), ckpt_cfg.best_metric, ckpt_cfg.best_mode
        # Orbax deletes nothing: retention is `_prune`, which runs only after the newest checkpoint is verified.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=ckpt_cfg.async_save,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._verified: set[int] = set()
        self._pending: tuple[int, Any, Any] | None = None  # (step, abstract model, abstract train) not yet verified
        self._closed = False

    # -- saving ----------------------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, model_state, train_items, data_iter=None, meta: Mapping[str, Any] | None = None,
             metrics: Mapping[str, float] | None = None) -> None:
        """Starts saving (in the background when async) the state at ``step``; refuses a non-finite state.
        ``metrics``: the evaluation this state was evaluated with (retention reads ``best_metric`` from it)."""
        self.settle()
        fingerprints = integrity.check_finite({"model": model_state, "train": train_items},
                                              f"the train state at step {step}")
        meta = dict(meta or {}, step=int(step), fingerprints=fingerprints,
                    metrics={k: float(v) for k, v in (metrics or {}).items()})
        items = dict(model=ocp.args.StandardSave(model_state), train=ocp.args.StandardSave(train_items),
                     meta=ocp.args.JsonSave(meta))
        if data_iter is not None:
            items["data"] = _grain_save(data_iter)
        try:
            self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        except Exception as err:
            cause = _os_error(err, self._path(step))
            if cause is err:
                raise
            raise cause from err
        self._pending = (int(step), _abstract(model_state), _abstract(train_items))

    def wait(self) -> None:
        """Waits for a background save to commit; a failed write raises its OSError."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            step = self._pending[0] if self._pending is not None else None
            cause = _os_error(err, self._path(step) if step is not None else self.directory)
            if cause is err:
                raise
            raise cause from err

    def settle(self) -> None:
        """Waits for the pending save, reads it back and verifies it, then applies the retention policy."""
        self.wait()
        if self._pending is not None:
            step, abstract_model, abstract_train = self._pending
            self._pending = None
            model, train = self._read_host(step, abstract_model, abstract_train)
            integrity.verify({"model": model, "train": train}, self.meta(step)["fingerprints"],
                             f"checkpoint {self._path(step)} (read back after writing)")
            self._verified.add(step)
        self._prune()

    def close(self) -> None:
        if not self._closed:
            self.settle()
            self.manager.close()
            self._closed = True

    def abandon(self) -> None:
        """After an error in the train loop: lets a pending save finish (or fail) before the error propagates;
        a failure here is logged, not raised, so the loop's own error stays the one reported."""
        if self._closed:
            return
        try:
            self.wait()
        except Exception as err:  # pylint: disable=broad-except
            logging.error("The checkpoint being written when the run failed was not saved: %s", err)

    # -- retention -------------------------------------------------------------------------------------------------

    def _prune(self) -> None:
        steps = self.steps()
        if not steps or steps[-1] not in self._verified:
            return  # nothing is deleted while the newest checkpoint has not been read back
        keep = {steps[-1]}
        if self.best_metric:
            scored = [(self.meta(s).get("metrics", {}).get(self.best_metric), s) for s in steps]
            scored = [(v, s) for v, s in scored if v is not None]
            scored.sort(key=lambda vs: (vs[0] if self.best_mode == "max" else -vs[0], vs[1]), reverse=True)
            keep |= {s for _, s in scored[: self.keep]}
        else:
            keep |= set(steps[-self.keep:])
        for step in steps:
            if step not in keep:
                self.manager.delete(step)

    # -- restoring -------------------------------------------------------------------------------------------------

    def meta(self, step: int) -> dict:
        return read_meta(self.workdir, step)

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _read_host(self, step: int, abstract_model, abstract_train):
        """The model and train items of ``step`` as host numpy arrays (what is on disk, not on the devices)."""
        return tuple(_restore_pytree(os.path.join(self._path(step), item), abstract, as_numpy=True)
                     for item, abstract in (("model", abstract_model), ("train", abstract_train)))

    def restore(self, step: int, abstract_model, abstract_train, data_iter=None):
        """``(model_state, train_items, meta)`` of checkpoint ``step``, verified against its fingerprints, on the
        shardings of the abstract trees; the data iterator (when given) is set in place."""
        items = dict(model=ocp.args.StandardRestore(abstract_model), train=ocp.args.StandardRestore(abstract_train),
                     meta=ocp.args.JsonRestore())
        if data_iter is not None:
            items["data"] = _grain_restore(data_iter)
        out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        meta = out["meta"]
        if "fingerprints" not in meta:
            raise integrity.CheckpointError(f"checkpoint {self._path(step)} records no fingerprints.")
        integrity.verify({"model": out["model"], "train": out["train"]}, meta["fingerprints"],
                         f"checkpoint {self._path(step)}")
        self._verified.add(int(step))
        return out["model"], out["train"], meta

    def restore_latest(self, abstract_model, abstract_train, data_iter=None):
        """``(model_state, train_items, meta)`` of the newest intact checkpoint, or None when there is none.

        Damaged ones (unreadable, fingerprints differ, NaN / Inf) are moved to ``WORKDIR/damaged_checkpoints``
        with the reason logged; when every checkpoint is damaged the error lists them all."""
        damaged = []
        for step in reversed(self.steps()):
            try:
                return self.restore(step, abstract_model, abstract_train, data_iter)
            except Exception as err:  # pylint: disable=broad-except  (orbax / TensorStore raise many types)
                reason = str(err).splitlines()[0][:500] if str(err) else type(err).__name__
                logging.error("Checkpoint %s cannot be restored (%s); it is moved to %s/ and the previous one "
                              "is tried.", self._path(step), reason, DAMAGED_SUBDIR)
                damaged.append(f"step {step}: {reason}")
                self._set_aside(step)
        if damaged:
            raise integrity.CheckpointError(
                f"every checkpoint in {self.directory} is damaged (moved to {DAMAGED_SUBDIR}/): " + "; ".join(damaged))
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, DAMAGED_SUBDIR, str(step))
            if os.path.exists(target):
                shutil.rmtree(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self._path(step), target)
        _sync(f"set_aside_{step}")
        self.manager.reload()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _restore_pytree(item_dir: str, abstract_tree, *, as_numpy: bool = False, partial: bool = False):
    """Reads the leaves named in ``abstract_tree`` from a saved pytree item: onto their shardings, or as host
    numpy arrays."""
    if as_numpy:
        restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), abstract_tree)
    else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_tree)
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(item_dir, args=ocp.args.PyTreeRestore(item=abstract_tree, restore_args=restore_args,
                                                                  partial_restore=partial))


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR))


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the finished checkpoints in a run's workdir ([] when there are none)."""
    directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
    return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The JSON ``meta`` item of checkpoint ``step`` (default: the latest)."""
    step = max(checkpoint_steps(workdir)) if step is None else step
    path = os.path.join(workdir, CHECKPOINT_SUBDIR, str(step), "meta", "metadata")
    return hf.read_json(path, error=integrity.CheckpointError, hint=" (the checkpoint's metadata)")


def restore_modules(init_from: str, abstract_model, keys=("backbone",)) -> dict:
    """Parameters of the top-level model modules ``keys`` from a stage-1 workdir (its newest intact checkpoint)
    or, for ``("backbone",)``, from a converted checkpoint directory. Returns ``{key: nnx.State}`` with the
    structure, shardings and dtypes of ``abstract_model[key]`` (parameters only), verified against the
    fingerprints recorded at save."""
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
        return _restore_modules_from_run(init_from, target)
    if tuple(keys) != ("backbone",):
        raise ValueError(f"config.init_from={init_from!r} is a converted backbone; only init_from_keys=('backbone',) "
                         f"can come from it, got {tuple(keys)}.")
    if not converted.is_converted(init_from):
        raise ValueError(f"config.init_from={init_from!r}: neither a training workdir ('{CHECKPOINT_SUBDIR}/') nor a "
                         f"converted checkpoint ({converted.CONFIG_FILE}).")
    return {"backbone": converted.restore_params(init_from, target["backbone"])}


def _restore_modules_from_run(workdir: str, target: dict) -> dict:
    """The newest intact checkpoint's modules ``target`` (another run's workdir: damaged ones are skipped, not
    moved)."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ValueError(f"config.init_from={workdir!r} has no finished checkpoint.")
    errors = []
    for step in reversed(steps):
        item = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR, str(step), "model")
        try:
            restored = dict(_restore_pytree(item, target, partial=True))
            integrity.verify({"model": restored}, read_meta(workdir, step)["fingerprints"], f"checkpoint {item}")
            return restored
        except Exception as err:  # pylint: disable=broad-except
            errors.append(f"step {step}: {str(err).splitlines()[0][:500]}")
            logging.error("config.init_from: checkpoint %s cannot be used (%s); trying the previous one.", item,
                          errors[-1])
    raise integrity.CheckpointError(f"config.init_from={workdir!r}: no intact checkpoint: " + "; ".join(errors))


def restore_or_init(checkpoints: RunCheckpoints, *, init_from: str, abstract_model, abstract_train,
                    init_model: Callable[[], Any], init_train: Callable[[Any], Any],
                    data_iter=None, init_from_keys=("backbone",)) -> tuple[Any, Any, int, str]:
    """The resume order, in one place. Returns ``(model_state, train_state, step, source)``.

    1. the newest intact checkpoint in this workdir (model, optimizer, step, data iterator);
    2. ``init_from``: random init, then the modules ``init_from_keys`` (default: the backbone) replaced by the
       stage-1 run's / converted checkpoint's weights;
    3. random init.
    ``init_model()`` builds the sharded model state; ``init_train(model_state)`` the optimizer state and counters.
    """
    restored = checkpoints.restore_latest(abstract_model, abstract_train, data_iter)
    if restored is not None:
        model, train, meta = restored
        logging.info("Resuming from %s step %d", checkpoints.directory, meta["step"])
        return model, train, int(meta["step"]), f"resume:{meta['step']}"
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
