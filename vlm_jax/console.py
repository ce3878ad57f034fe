"""What a run prints: vlm_jax's own lines only, a progress line with rate and ETA, one line per evaluation.

`quiet_third_party()` (called by ``python -m vlm_jax.main`` before anything imports TensorFlow, transformers or
jax) silences notices that say nothing about the run: TensorFlow's C++ start-up lines, transformers' "PyTorch was
not found" (PyTorch is only a test dependency), and the INFO lines of other libraries (jax's backend probing,
orbax's per-save lines, tfds' dataset-info lines). Their warnings and errors still show. ``-v 1`` shows everything.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def quiet_third_party() -> None:
    """Environment switches read at import time by TensorFlow and transformers (no effect once they are loaded)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # oneDNN and CPU-feature notices
    # TensorFlow 2.21 prints its "oneDNN custom operations are on" notice whatever the level on some CPUs; here it
    # only reads and writes dataset records, so its oneDNN kernels (and the notice) are switched off.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found ..."
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


class OwnInfoOnly(logging.Filter):
    """Passes warnings and errors from everyone, INFO lines only from vlm_jax (and the script being run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        return record.pathname.startswith(PACKAGE_DIR) or record.name == "__main__"


class ShortFormatter(logging.Formatter):
    """``HH:MM:SS message`` (warnings and errors prefixed with their level): absl's default prefix carries the
    thread id and source line, which are noise on a console."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno <= logging.INFO else f"{record.levelname}: "
        text = f"{stamp} {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(handler: logging.Handler, verbose: bool) -> None:
    """Sets the console handler (absl's) to short lines and, unless ``verbose``, vlm_jax's own INFO lines."""
    handler.setFormatter(ShortFormatter())
    if not verbose:
        handler.addFilter(OwnInfoOnly())
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        tfds.disable_progress_bar()  # a dataset build logs one line when it starts and one when it is done


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """One console line after the first step (which includes compilation), then every ``every_secs`` seconds and
    at the last step: ``step 120/3000 (4 %) · 5.2 steps/s · ETA 9 min 14 s · loss 3.214``.

    The rate counts training time only (evaluations are timed separately and added to the ETA per evaluation
    still to come). ``loss`` is read from the device only when a line is printed.
    """

    def __init__(self, num_steps: int, start_step: int, *, num_evals_left, every_secs: float = 20.0,
                 clock=time.monotonic):
        self.num_steps, self.every_secs, self.clock = num_steps, every_secs, clock
        self.num_evals_left = num_evals_left  # step -> evaluations after `step`
        self.start = self.last_time = clock()
        self.first_step, self.last_step = start_step, start_step
        self.eval_seconds: list[float] = []
        self.paused = 0.0  # seconds of evaluation since the last line
        self.lines = 0

    def add_eval_time(self, seconds: float) -> None:
        self.eval_seconds.append(seconds)
        self.paused += seconds

    def rate(self, step: int, now: float) -> float:
        return (step - self.last_step) / max(now - self.last_time - self.paused, 1e-9)

    def __call__(self, step: int, loss) -> str | None:
        """The line to print after ``step`` (None when it is not time yet); ``loss`` is a device scalar."""
        now = self.clock()
        first = self.lines == 0
        if not (first or step == self.num_steps or now - self.last_time >= self.every_secs):
            return None
        if first and step == self.first_step + 1:
            text = f"step {step}/{self.num_steps} · first step (with compilation) took {duration(now - self.start)}"
        else:
            rate = self.rate(step, now)
            eta = (self.num_steps - step) / rate + self.num_evals_left(step) * (
                sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else 0.0)
            text = (f"step {step}/{self.num_steps} ({100 * step / self.num_steps:.0f} %) · {rate:.2f} steps/s · "
                    f"ETA {duration(eta)}")
        text += f" · loss {float(loss):.4f}"
        self.last_time, self.last_step, self.paused = now, step, 0.0
        self.lines += 1
        return text


def headline(split: str, step: int, results: Mapping[str, float], names: Iterable[str], seconds: float) -> str:
    """One line per evaluation: ``validation @ step 1000: t2i_r1 0.071 · box_iou 0.431 · loss 3.20 (14 s)``."""
    shown = [f"{k} {results[k]:.3f}" for k in names if k in results]
    if "loss/total" in results:
        shown.append(f"loss {results['loss/total']:.4f}")
    return f"{split} @ step {step}: " + " · ".join(shown) + f" ({duration(seconds)})"
