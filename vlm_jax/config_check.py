"""Checks of a run's config that must fail before any data is built or any step compiled.

``validate(config)`` lists every problem it finds in one `ConfigError`: step counts and intervals, retention,
batch sizes against the mesh's data-parallel size, ``best_metric`` against the metrics the configured tasks
produce. ``validate_splits`` checks split names against the built dataset. ``check_override_keys`` is for the
command line: an override of a field the config file does not have is named with the nearest valid fields.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence

import ml_collections

from vlm_jax.data import generative


class ConfigError(ValueError):
    pass


def _metric_problem(config, task_classes: dict) -> str | None:
    """Why ``config.checkpoint.best_metric`` cannot be read from an evaluation (None when it can)."""
    name = config.checkpoint.best_metric
    split, _, metric = name.partition("/")
    if split not in tuple(config.eval_splits):
        return (f"checkpoint.best_metric={name!r}: its split {split!r} is not evaluated "
                f"(eval_splits={tuple(config.eval_splits)}); expected 'split/metric'")
    diagnostics = {f"{t.name}_{k}" for t in task_classes.values() for k in t.diagnostic_terms}
    produced = sorted({m for t in task_classes.values() for m in t.metric_names} | diagnostics)
    if metric in produced or metric == "loss/total":
        return None
    term = metric.removeprefix("loss/")
    if term != metric and term not in diagnostics and any(term == t or term.startswith(f"{t}_") for t in task_classes):
        return None
    near = difflib.get_close_matches(metric, produced + ["loss/total"], n=3)
    return (f"checkpoint.best_metric={name!r}: no configured task produces {metric!r} (tasks "
            f"{sorted(task_classes)} produce {produced}, and loss/<term>)" + (f"; did you mean {near}?" if near else ""))


DTYPES = ("float32", "bfloat16", "float16")


def _model_problems(model_cfg) -> list[str]:
    """Precision, attention and remat settings of ``config.model``."""
    import jax

    from vlm_jax.models import layers

    problems = [f"model.{field}={model_cfg[field]!r}: expected one of {DTYPES}"
                for field in ("dtype", "frozen_param_dtype") if model_cfg[field] not in DTYPES]
    if model_cfg.attention not in layers.ATTENTION_IMPLEMENTATIONS:
        problems.append(f"model.attention={model_cfg.attention!r}: expected one of {layers.ATTENTION_IMPLEMENTATIONS}")
    elif model_cfg.attention == "cudnn" and jax.default_backend() not in ("gpu", "cuda"):
        problems.append(f"model.attention='cudnn' needs an NVIDIA GPU (backend here: {jax.default_backend()}); "
                        "'auto' picks it where it applies")
    if model_cfg.remat not in layers.REMAT_POLICIES:
        problems.append(f"model.remat={model_cfg.remat!r}: expected one of {layers.REMAT_POLICIES}")
    return problems


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises `ConfigError` listing every problem of ``config`` found without data or compilation.
    ``num_devices`` (default: all devices) sizes the mesh for the batch-size check."""
    from vlm_jax import sharding, tasks

    problems = []

    def need(ok: bool, message: str):
        if not ok:
            problems.append(message)

    need(int(config.num_train_steps) > 0 or float(config.num_epochs) > 0,
         f"num_train_steps={config.num_train_steps} and num_epochs={config.num_epochs}: one must be > 0")
    need(int(config.log_every) >= 1, f"log_every={config.log_every}: expected >= 1")
    need(int(config.eval_every) >= 0, f"eval_every={config.eval_every}: expected >= 0 (0 = only at the end)")
    need(int(config.max_consecutive_nonfinite) >= 1,
         f"max_consecutive_nonfinite={config.max_consecutive_nonfinite}: expected >= 1")
    ckpt = config.checkpoint
    need(int(ckpt.every_steps) >= 1, f"checkpoint.every_steps={ckpt.every_steps}: expected >= 1")
    need(int(ckpt.keep) >= 1, f"checkpoint.keep={ckpt.keep}: expected >= 1 (the newest checkpoint is always kept)")
    need(ckpt.best_mode in ("max", "min"), f"checkpoint.best_mode={ckpt.best_mode!r}: expected 'max' or 'min'")
    need(int(config.optim.accum_steps) >= 1, f"optim.accum_steps={config.optim.accum_steps}: expected >= 1")
    unknown = sorted(set(config.tasks.keys()) - set(tasks.TASKS))
    need(not unknown, f"tasks {unknown} are unknown; known tasks: {sorted(tasks.TASKS)}")
    need(bool(config.tasks), "config.tasks names no task")
    problems.extend(_model_problems(config.model))
    rank = int(config.lora.rank)
    need(rank >= 0, f"lora.rank={rank}: expected >= 0 (0 = no LoRA)")
    need(rank <= 0 or (bool(tuple(config.lora.targets)) and float(config.lora.alpha) > 0),
         f"lora.rank={rank} needs lora.targets (regexes over linear paths) and lora.alpha > 0, got "
         f"targets={tuple(config.lora.targets)}, alpha={config.lora.alpha}")
    rate = float(config.lora.dropout)
    objects = ("spatial_shapes", "coco_detection")  # datasets whose records list every object of an image
    need("detection" not in config.tasks or config.data.name in objects,
         f"tasks.detection needs a dataset that lists every object of an image ({', '.join(objects)}); "
         f"data.name={config.data.name!r} has none")
    need(0 <= rate < 1, f"lora.dropout={rate}: expected a rate in [0, 1)")
    data = config.data
    kinds = tuple(data.get("lm_kinds", ()))
    need(set(kinds) <= set(generative.KINDS),
         f"data.lm_kinds={kinds}: expected some of {generative.KINDS}")
    need("lm" not in config.tasks or bool(kinds),
         "tasks.lm needs generative targets: set data.lm_kinds (e.g. ('caption', 'grounding', 'relation'))")
    need(1 <= int(data.min_tiles) <= int(data.max_tiles),
         f"data.min_tiles={data.min_tiles}, data.max_tiles={data.max_tiles}: expected 1 <= min_tiles <= max_tiles")
    need(float(data.tile_budget) == 0 or float(data.tile_budget) >= 1,
         f"data.tile_budget={data.tile_budget}: expected 0 (no limit) or >= 1 tile per image")
    need(int(data.tile_buckets) >= 1, f"data.tile_buckets={data.tile_buckets}: expected >= 1")
    if feature_cache_enabled(config):
        problems.extend(feature_cache_problems(config))
    if ckpt.best_metric and not unknown:
        problem = _metric_problem(config, {k: tasks.TASKS[k] for k in config.tasks.keys()})
        need(problem is None, problem or "")
    try:
        import jax

        mesh_shape = sharding.mesh_shape(config.mesh, num_devices or jax.device_count())
        data_parallel = math.prod(s for a, s in zip(sharding.MESH_AXES, mesh_shape) if a in sharding.BATCH_AXES)
        for field in ("batch_size", "eval_batch_size"):
            size = int(config[field])
            need(size >= 1 and size % data_parallel == 0,
                 f"{field}={size}: expected a positive multiple of the data-parallel size {data_parallel} "
                 f"(mesh {dict(zip(sharding.MESH_AXES, mesh_shape))})")
    except ValueError as err:
        problems.append(f"mesh={config.mesh.to_dict()}: {err}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def feature_cache_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` trains (and evaluates) from the frozen backbone's cached outputs (older configs have no
    `feature_cache`)."""
    return bool(config.get("feature_cache", {}).get("enabled", False))


def feature_cache_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Why `config`'s model cannot train from cached backbone outputs, decided from the config alone (the
    trainable-parameter check needs the model: `vlm_jax.feature_cache.check_cacheable`)."""
    problems = []
    fusion = config.model.embedding.fusion
    if fusion != "late":
        problems.append(f"feature_cache.enabled with model.embedding.fusion={fusion!r}: the language model runs over "
                        "trained image tokens for every pair; only 'late' fusion can be cached")
    if "lm" in config.tasks:
        problems.append("feature_cache.enabled with tasks.lm: the lm task trains through the language model over "
                        "the image tokens, which the cache does not hold")
    return problems


def validate_splits(config: ml_collections.ConfigDict, available: Iterable[str], *, train: bool = True) -> None:
    """Raises `ConfigError` when ``data.train_split`` (if ``train``) or an ``eval_splits`` entry is not one of the
    dataset's splits ``available``."""
    available = sorted(available)
    wanted = ([("data.train_split", config.data.train_split)] if train else []) + [
        ("eval_splits", s) for s in config.eval_splits]
    missing = [f"{field}={name!r}" for field, name in wanted if name not in available]
    if missing:
        raise ConfigError(f"dataset {config.data.name!r} has no split {', '.join(missing)}; its splits: {available}")


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(_leaf_keys(value, f"{prefix}{key}."))
    return out


def unknown_override_keys(config: ml_collections.ConfigDict, argv: Sequence[str]) -> list[str]:
    """One line per ``--config.<key>=...`` argument whose key ``config`` lacks, with the nearest valid keys."""
    keys = _leaf_keys(config)
    lines = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            lines.append(f"unknown config field {key!r}" + (f"; nearest: {', '.join(near)}" if near else
                                                             " (--print_config lists the fields)"))
    return lines


def config_file_argument(argv: Sequence[str]) -> tuple[str, str | None] | None:
    """``(path, argument or None)`` from ``--config path[:argument]``, or None without ``--config``."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if value is not None:
            path, _, argument = value.partition(":")
            return path, argument or None
    return None
