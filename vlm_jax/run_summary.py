"""The summary a run prints when it ends (and when it is started again on a finished workdir): the last
evaluation of each split as a table, the checkpoints kept (and the best one by ``checkpoint.best_metric``), the
files the run wrote and the TensorBoard command. Everything is read back from the workdir (metrics.jsonl and the
checkpoints' metadata), so the summary is the same whichever process prints it.
"""

from __future__ import annotations

import os

from vlm_jax import run_logging
from vlm_jax.console import duration
from vlm_jax.checkpoints import run as run_checkpoints


def last_evaluations(workdir: str) -> tuple[int | None, dict[str, dict[str, float]]]:
    """(step, {split: metrics}) of the newest training-time evaluation in WORKDIR/metrics.jsonl."""
    path = os.path.join(workdir, run_logging.METRICS_FILE)
    if not os.path.exists(path):
        return None, {}
    records = [r for r in run_logging.read_jsonl(path) if r.get("mode") != "eval" and "split" in r]
    if not records:
        return None, {}
    step = max(r["step"] for r in records)
    return step, {r["split"]: r for r in records if r["step"] == step}


def metrics_table(results: dict[str, dict[str, float]]) -> list[str]:
    """Rows ``metric  value (chance, ceiling) ...``, one column per split; losses last, counts (``num_*``) left
    out. ``chance/<name>`` and ``ceiling/<name>`` (what a model ignoring its input scores, the best reachable) are
    shown beside ``<name>``."""
    splits = list(results)
    names = sorted({k for r in results.values() for k, v in r.items()
                    if isinstance(v, (int, float)) and not k.startswith(("chance/", "ceiling/")) and "num_" not in k
                    and k != "step"},
                   key=lambda k: (k.startswith("loss/"), k))

    def cell(split, name):
        r = results[split]
        if name not in r:
            return "-"
        notes = [f"{kind} {r[f'{kind}/{name}']:.4f}" for kind in ("chance", "ceiling") if f"{kind}/{name}" in r]
        return f"{r[name]:.4f}" + (f" ({', '.join(notes)})" if notes else "")

    rows = [["metric", *splits]] + [[n, *(cell(s, n) for s in splits)] for n in names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def checkpoint_lines(workdir: str, best_metric: str, best_mode: str) -> list[str]:
    steps = run_checkpoints.checkpoint_steps(workdir)
    if not steps:
        return ["Checkpoints: none"]
    directory = os.path.join(workdir, run_checkpoints.CHECKPOINT_SUBDIR)
    lines = [f"Checkpoints: {directory} (steps {', '.join(map(str, steps))}); newest: step {steps[-1]}"]
    if best_metric:
        scored = {}
        for step in steps:
            value = (run_checkpoints.read_meta(workdir, step).get("metrics") or {}).get(best_metric)
            if value is not None:
                scored[step] = value
        if scored:
            pick = max if best_mode == "max" else min
            best = pick(scored, key=scored.get)
            lines.append(f"Best by {best_metric} ({best_mode}): step {best} ({scored[best]:.4f})")
    return lines


def summary(workdir: str, config, num_steps: int, *, complete: bool, seconds: float | None = None) -> str:
    """The multi-line summary of the run in ``workdir``."""
    step = (run_checkpoints.checkpoint_steps(workdir) or [0])[-1]
    head = (f"Run complete: step {step} of {num_steps}" if complete else f"Run stopped at step {step} of {num_steps}")
    head += f" in {workdir}" + (f" ({duration(seconds)} in this session)." if seconds is not None else ".")
    lines = [head]
    eval_step, results = last_evaluations(workdir)
    if results:
        lines.append(f"Evaluation at step {eval_step}:")
        lines += metrics_table(results)
    lines += checkpoint_lines(workdir, config.checkpoint.best_metric, config.checkpoint.best_mode)
    lines.append(f"Metrics: {os.path.join(workdir, run_logging.METRICS_FILE)}; config and parameter tables: "
                 f"{os.path.join(workdir, run_logging.CONFIG_FILE)}, {os.path.join(workdir, run_logging.PARAMS_FILE)}")
    lines.append(f"TensorBoard: tensorboard --logdir {workdir}")
    return "\n".join(lines)

