"""Evaluation over a dataset split: run the eval step over every batch, gather the per-example outputs on the host,
and let each task compute its metrics from them.

Metric names are the tasks' own (`t2i_r1`, `box_iou`, `spatial_acc`, ...), ``loss/<term>``: the loss terms averaged
over the split's batches, and the tasks' diagnostic terms (e.g. `itm_acc`) where no metric of that name exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax.tasks.base import TILE_FIELDS, batch_rows


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a short (last) batch to ``size`` rows by repeating row 0 (tile fields stay: padding rows show row 0's
    image); ``valid`` marks the real rows."""
    n = batch_rows(batch)
    out = {k: np.asarray(v) for k, v in batch.items()}
    valid = np.asarray(out.pop("valid", np.ones(n, bool)), bool)
    if n > size:
        raise ValueError(f"Eval batch has {n} rows; expected at most {size}.")
    if n < size:
        out = {k: v if k in TILE_FIELDS else np.concatenate([v, np.repeat(v[:1], size - n, axis=0)])
               for k, v in out.items()}
        valid = np.concatenate([valid, np.zeros(size - n, bool)])
    out["valid"] = valid
    return out


def collect(predict: Callable[[dict], Mapping], batches: Iterable[Mapping[str, np.ndarray]], batch_size: int,
            to_device: Callable[[dict], dict]) -> dict:
    """Runs ``predict`` (the eval step) over every batch; returns the valid rows of the concatenated host outputs
    and batch fields, and ``loss_terms``: the loss terms averaged over batches.

    ``batch_size`` is this process's rows per batch; ``to_device`` makes global arrays from a host batch.
    """
    parts: dict[str, list] = {}
    sums: dict[str, float] = {}
    num_batches = 0
    for batch in batches:
        out = predict(to_device(pad_batch(batch, batch_size)))
        for k, v in {**out["outputs"], **out["batch"]}.items():
            parts.setdefault(k, []).append(_to_host(v))
        for k, v in out["terms"].items():
            sums[k] = sums.get(k, 0.0) + float(_to_host(v))
        num_batches += 1
    if not num_batches:
        raise ValueError("Evaluation split yielded no batches.")
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    valid = cat.pop("valid")
    cat = {k: v[valid] for k, v in cat.items()}
    cat["loss_terms"] = {k: v / num_batches for k, v in sums.items()}
    return cat


def compute_metrics(tasks: Iterable, collected: Mapping) -> dict[str, float]:
    """Every task's metrics over the collected outputs, ``loss/<term>`` for the loss terms, and the diagnostic
    terms that no metric already reports (averaged over batches)."""
    from vlm_jax.tasks.base import diagnostic_names

    tasks = list(tasks)
    out: dict[str, float] = {}
    for task in tasks:
        out.update(task.metrics(collected))
    diagnostics = diagnostic_names(tasks)
    for k, v in collected["loss_terms"].items():
        if k not in diagnostics:
            out[f"loss/{k}"] = float(v)
        elif k not in out:
            out[k] = float(v)
    return out
