"""What a run writes besides checkpoints: TensorBoard events (clu), metrics.jsonl, and its config and parameter
tables (config.txt, parameters.txt), all in the workdir and all by process 0.

metrics.jsonl holds one JSON object per evaluation (``split``, ``step``, metric values; ``mode="eval"`` when written
by ``--mode eval``). After a resume the records past the restored step are dropped (the steps are redone). Train
scalars are averaged over each logging window, except the names the tasks declare as last values (e.g. the
contrastive temperature) and the failure counters.

TensorBoard tags: ``loss/train/<term>`` and ``loss/<split>/<term>`` (losses only), ``<split>/<metric>`` (evaluation
metrics), ``train/<name>`` (learning rates, gradient norms, steps/s, skip counters, the tasks' diagnostic terms such
as accuracies), and at each evaluation the tasks' images and texts under ``<split>/<name>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.txt"
PARAMS_FILE = "parameters.txt"


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


def train_tags(summary: Mapping[str, float], diagnostics: Iterable[str]) -> dict[str, float]:
    """TensorBoard tags of a window of train metrics: loss terms under ``loss/train/``, everything else (learning
    rates, gradient norms, counters, diagnostic terms) under ``train/``. A single group's gradient norm is the
    global one and is not written twice."""
    diagnostics = set(diagnostics)
    group_norms = [k for k in summary if k.startswith("grad_norm/")]
    out = {}
    for k, v in summary.items():
        if k in group_norms and len(group_norms) == 1:
            continue
        is_loss = k not in diagnostics and k not in ("grad_norm", "nonfinite", "skipped", "steps_per_sec") \
            and not k.startswith(("grad_norm/", "lr/", "data/"))
        out[f"loss/train/{k}" if is_loss else f"train/{k}"] = v
    return out


def data_window(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, float]:
    """The input pipeline over a logging window (`PipelineIterator.stats` at its start and end): the padding
    fractions of the tile arrays and prompts, and the images re-tiled to fit the tile budget."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("tiles", "padding_tiles", "prompt_tokens",
                                                             "padding_tokens", "retiled_images")}
    fraction = lambda pad, real: pad / max(pad + real, 1)  # noqa: E731
    return {"data/tile_padding": fraction(delta["padding_tiles"], delta["tiles"]),
            "data/token_padding": fraction(delta["padding_tokens"], delta["prompt_tokens"]),
            "data/retiled_images": float(delta["retiled_images"])}


def eval_tags(split: str, results: Mapping[str, float]) -> dict[str, float]:
    """``loss/<split>/<term>`` for the loss terms, ``<split>/<metric>`` for the rest."""
    return {f"loss/{split}/{k[5:]}" if k.startswith("loss/") else f"{split}/{k}": v for k, v in results.items()}


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
    """The writers of one run in ``workdir``: TensorBoard events (clu, asynchronous) + metrics.jsonl, on process 0.
    The console gets its own short lines (`vlm_jax.console`), not every scalar."""

    def __init__(self, workdir: str):
        from clu import metric_writers  # TensorFlow-backed: loaded only when a run logs

        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.metrics_path = os.path.join(workdir, METRICS_FILE)
        writers = [metric_writers.SummaryWriter(workdir)] if jax.process_index() == 0 else []
        self.writer = metric_writers.AsyncMultiWriter(writers)

    def run_files(self, config_text: str, parameters_text: str) -> tuple[str, str]:
        """Writes the config and parameter tables to WORKDIR/config.txt and parameters.txt; returns their paths."""
        paths = os.path.join(self.workdir, CONFIG_FILE), os.path.join(self.workdir, PARAMS_FILE)
        if jax.process_index() == 0:
            for path, text in zip(paths, (config_text, parameters_text)):
                with open(path, "w") as f:
                    f.write(text.rstrip() + "\n")
        return paths

    def resume_at(self, step: int) -> None:
        if jax.process_index() == 0:
            truncate_jsonl(self.metrics_path, step)

    def hparams(self, config_dict: Mapping) -> None:
        self.writer.write_hparams(flat_hparams(config_dict))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, values)

    def evaluation(self, step: int, split: str, results: Mapping[str, float], **extra) -> None:
        """Writes the evaluation's scalars (`eval_tags`) and one metrics.jsonl record."""
        self.writer.write_scalars(step, eval_tags(split, results))
        if jax.process_index() == 0:
            append_jsonl(self.metrics_path, dict(results, step=int(step), split=split, **extra))

    def pictures(self, step: int, split: str, summaries: Mapping[str, Any]) -> None:
        """The tasks' evaluation summaries: uint8[N, H, W, 3] arrays as images, strings as (markdown) texts."""
        images = {f"{split}/{k}": v for k, v in summaries.items() if isinstance(v, np.ndarray)}
        texts = {f"{split}/{k}": v for k, v in summaries.items() if isinstance(v, str)}
        if images:
            self.writer.write_images(step, images)
        if texts:
            self.writer.write_texts(step, texts)

    def flush(self) -> None:
        self.writer.flush()
