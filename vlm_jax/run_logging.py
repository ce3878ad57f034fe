"""What a run writes besides checkpoints: clu metric writers (TensorBoard events, console) and metrics.jsonl.

metrics.jsonl holds one JSON object per evaluation (``split``, ``step``, metric values; ``mode="eval"`` when written
by ``--mode eval``), appended by process 0. After a resume the records past the restored step are dropped (the
steps are redone). Train scalars are averaged over each logging window, except the names the tasks declare as
last values (e.g. the contrastive temperature) and the failure counters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_jsonl(path: str, max_step: int) -> None:
    """Drops the records past ``max_step`` (an interrupted run wrote them; the resumed run redoes those steps)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= max_step]
    with open(path, "w") as f:
        f.writelines(lines)


def window_summary(pending: list[dict], last_value: Iterable[str]) -> dict[str, float]:
    """Host floats from a window of per-step metric dicts: the mean of each, or the last value of ``last_value``."""
    host = jax.device_get(pending)
    last = set(last_value)
    return {k: float(host[-1][k]) if k in last else float(np.mean([h[k] for h in host])) for k in host[-1]}


def flat_hparams(d: Mapping, prefix: str = "") -> dict:
    """A nested config dict as flat ``a.b.c`` keys with scalar values (strings for anything else)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class RunLog:
    """The writers of one run in ``workdir``: clu's default writer (TensorBoard on process 0) + metrics.jsonl."""

    def __init__(self, workdir: str):
        from clu import metric_writers  # TensorFlow-backed: loaded only when a run logs

        os.makedirs(workdir, exist_ok=True)
        self.metrics_path = os.path.join(workdir, METRICS_FILE)
        self.writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

    def resume_at(self, step: int) -> None:
        if jax.process_index() == 0:
            truncate_jsonl(self.metrics_path, step)

    def hparams(self, config_dict: Mapping) -> None:
        self.writer.write_hparams(flat_hparams(config_dict))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, values)

    def evaluation(self, step: int, split: str, results: Mapping[str, float], **extra) -> None:
        """Writes ``split/<metric>`` scalars and one metrics.jsonl record."""
        self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in results.items()})
        if jax.process_index() == 0:
            append_jsonl(self.metrics_path, dict(results, step=int(step), split=split, **extra))

    def flush(self) -> None:
        self.writer.flush()
