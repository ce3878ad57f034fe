"""What keeps a workdir to one run: an exclusive lock while a run trains in it, and the rule for resuming a
workdir with another config.

Lock: process 0 holds ``WORKDIR/run.lock`` (an ``flock``, released by the kernel when the process ends, even by
kill -9) for the whole run; a second run on the same workdir fails at once, naming the holder.

Resume: a checkpoint stores the config it was trained with. Resuming with a config that differs in any field
outside `SAFE_TO_CHANGE` is refused with the differing fields listed, unless the change is allowed explicitly
(``--allow_config_change``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

LOCK_FILE = "run.lock"

# Fields that change how a run is watched or how long it lasts, not what a step computes.
SAFE_TO_CHANGE = (
    "num_train_steps", "num_epochs", "log_every", "eval_every", "eval_splits", "eval_batch_size",
    "max_consecutive_nonfinite", "checkpoint.every_steps", "checkpoint.keep", "checkpoint.best_metric",
    "checkpoint.best_mode", "checkpoint.async_save", "data.data_dir", "data.manual_dir", "model.attention",
    "model.remat", "feature_cache.enabled", "feature_cache.dir",
)


class WorkdirBusyError(RuntimeError):
    pass


class ConfigChangedError(ValueError):
    pass


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir's lock (a no-op on processes other than 0)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusyError(f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it "
                                   f"to finish or choose another --workdir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                     since=time.strftime("%Y-%m-%d %H:%M:%S"))).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(field, stored value, current value)]`` over every leaf field that differs (missing = None); both
    configs as JSON dicts (``json.loads(config.to_json())``)."""
    a, b = _flatten(stored), _flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(stored: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str,
                        allow_change: bool = False) -> list[tuple[str, Any, Any]]:
    """Returns the changes; raises `ConfigChangedError` listing those outside `SAFE_TO_CHANGE` unless
    ``allow_change``."""
    changes = config_changes(stored, current)
    unsafe = [c for c in changes if c[0] not in SAFE_TO_CHANGE]
    if unsafe and not allow_change:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in unsafe[:10])
        more = f" and {len(unsafe) - 10} more" if len(unsafe) > 10 else ""
        raise ConfigChangedError(
            f"the config differs from the one {checkpoint} was trained with in {len(unsafe)} field(s): {listed}{more}. "
            f"Resume with the stored config, use another --workdir, or pass --allow_config_change to resume "
            f"anyway (safe to change without it: {', '.join(SAFE_TO_CHANGE)}).")
    return changes
