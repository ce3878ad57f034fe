"""Faulty training runs, played in one process on one CPU device: ``python tests/fault_scenarios.py OUT DATA_DIR``.

Each scenario damages or disturbs a real run (tests/scenario_config.py: the demo config at tiny sizes, 8 steps of
batch 8, a checkpoint every 2 steps, the 3 newest kept) and records what happened (exception type and message, checkpoint steps, fingerprints)
in ``OUT/results.json``; tests/test_faults_runs.py asserts on it. One process with one device compiles the train
step once for all scenarios (the persistent compilation cache serves the later runs).
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from scenario_config import STEPS  # noqa: E402


def run_config(data_dir, **changes):
    """tests/scenario_config.py's config on ``data_dir`` with ``changes`` ({"a.b": value})."""
    import scenario_config

    cfg = scenario_config.get_config()
    cfg.data.data_dir = data_dir
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        target = cfg
        for part in parents:
            target = target[part]
        target[leaf] = value
    return cfg


def fingerprints(workdir, step):
    from vlm_jax.checkpoints import run as run_checkpoints

    return run_checkpoints.read_meta(str(workdir), step)["fingerprints"]


def steps(workdir):
    from vlm_jax.checkpoints import run as run_checkpoints

    return run_checkpoints.checkpoint_steps(str(workdir))


def flip_bytes(item_dir: Path, count=64):
    """XORs ``count`` bytes in the middle of the largest data file under ``item_dir`` (a damaged disk block)."""
    target = max((p for p in item_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + count):
        data[i] ^= 0x5A
    target.write_bytes(bytes(data))


def scramble_arrays(item_dir: Path):
    """XORs every byte of the array data files (``d/``) under ``item_dir``: every array is damaged."""
    for path in item_dir.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))


def truncate_largest(item_dir: Path, keep=100):
    target = max((p for p in item_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    target.write_bytes(target.read_bytes()[:keep])


def error_of(fn):
    """``{"type", "message"}`` of what ``fn()`` raised (None when it returned)."""
    try:
        fn()
    except BaseException as err:  # pylint: disable=broad-except
        return {"type": type(err).__name__, "message": str(err), "errno": getattr(err, "errno", None)}
    return None


def share_trainers() -> None:
    """Makes `vlm_jax.train` reuse one Trainer per (model, tasks, optimizer, mesh, seed, steps): its jitted train and
    eval steps are then traced once for all the runs here instead of once per run (~13 s each). What these runs
    test (checkpoints, restore, the loop) is outside the Trainer; the Trainer holds no arrays between runs."""
    from vlm_jax import train

    made = {}
    make = train.make_trainer

    def shared(config, mesh, num_steps, backbone_config=None):
        key = (json.dumps({k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
                           for k in ("model", "tasks", "optim", "mesh", "seed", "logical_rules")}, default=str),
               num_steps)
        if key not in made:
            made[key] = make(config, mesh, num_steps, backbone_config)
        return made[key]

    train.make_trainer = shared


class Scenarios:
    def __init__(self, out: Path, data_dir: str):
        self.out, self.data_dir = out, data_dir

    def train(self, workdir, **changes):
        from vlm_jax import train

        allow = changes.pop("allow_config_change", False)
        return train.train_and_evaluate(run_config(self.data_dir, **changes), str(workdir), allow_config_change=allow)

    def copy_reference(self, name):
        target = self.out / name
        shutil.copytree(self.out / "reference", target)
        return target

    def reference(self):
        self.train(self.out / "reference")
        return {"steps": steps(self.out / "reference"),
                "fingerprints": {s: fingerprints(self.out / "reference", s) for s in steps(self.out / "reference")}}

    def damaged_latest_two(self):
        """8: 64 flipped bytes in the model; 6: a truncated data file; 4 intact -> resume from 4."""
        workdir = self.copy_reference("damaged_latest_two")
        flip_bytes(workdir / "checkpoints" / "8" / "model")
        truncate_largest(workdir / "checkpoints" / "6" / "train")
        self.train(workdir)
        return {"steps": steps(workdir), "damaged": sorted(os.listdir(workdir / "damaged_checkpoints")),
                "fingerprints_8": fingerprints(workdir, 8)}

    def all_damaged(self):
        workdir = self.copy_reference("all_damaged")
        for step in (4, 6, 8):
            flip_bytes(workdir / "checkpoints" / str(step) / "train")
        return {"error": error_of(lambda: self.train(workdir))}

    def restore_damaged(self):
        from vlm_jax import runs

        workdir = self.copy_reference("restore_damaged")
        flip_bytes(workdir / "checkpoints" / "6" / "model")
        (workdir / "checkpoints" / "4" / "meta" / "metadata").write_text("{not json")
        return {"flipped": error_of(lambda: runs.restore_run(str(workdir), step=6)),
                "meta": error_of(lambda: runs.restore_run(str(workdir), step=4))}

    def init_from_damaged(self):
        import fixtures
        from vlm_jax import sharding
        from vlm_jax.checkpoints import integrity
        from vlm_jax.checkpoints import run as run_checkpoints
        from vlm_jax.trainer import make_trainer

        workdir = self.copy_reference("init_from_damaged")
        scramble_arrays(workdir / "checkpoints" / "8" / "model")
        cfg = fixtures.demo_config()
        trainer = make_trainer(cfg, sharding.make_mesh(cfg.mesh), 1)
        restored = run_checkpoints.restore_modules(str(workdir), trainer.abstract_model, ("backbone",))
        got, _ = integrity.scan({"model": restored})
        return {"fingerprints": got, "steps_after": steps(workdir)}

    def nan_learning_rate(self):
        """lr = NaN: finite gradients, NaN updates from step 1; limit 3."""
        from vlm_jax import sharding
        from vlm_jax.checkpoints import integrity
        from vlm_jax.trainer import make_trainer

        workdir = self.out / "nan_lr"
        changes = {"optim.groups.all.lr": math.nan, "max_consecutive_nonfinite": 3, "log_every": 100}
        error = error_of(lambda: self.train(workdir, **changes))
        cfg = run_config(self.data_dir, **changes)
        init, _ = integrity.scan({"model": make_trainer(cfg, sharding.make_mesh(cfg.mesh), STEPS).init_model_state()})
        return {"error": error, "steps": steps(workdir), "init": init,
                "saved": {s: fingerprints(workdir, s) for s in steps(workdir)}}

    def loop_error(self):
        """The input source fails at step 5, while the step-4 checkpoint is being written."""
        import grain

        from vlm_jax import runs

        class Failing(grain.DatasetIterator):
            count = 0

            def __next__(self):
                self.count += 1
                if self.count == 5:
                    raise RuntimeError("input source failed")
                return next(self._parent)

            def get_state(self):
                return self._parent.get_state()

            def set_state(self, state):
                self._parent.set_state(state)

        real = runs.make_data
        runs.make_data = lambda c, i, s, train: Failing(real(c, i, s, train=train))
        workdir = self.out / "loop_error"
        try:
            error = error_of(lambda: self.train(workdir))
        finally:
            runs.make_data = real
        return {"error": error, "steps": steps(workdir)}

    def full_disk(self):
        """WORKDIR/checkpoints on a 4 MiB tmpfs (one checkpoint is ~2.6 MiB), then grown: the same command resumes."""
        workdir = self.out / "full_disk"
        mount = workdir / "checkpoints"
        mount.mkdir(parents=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True).returncode:
            return {"skipped": "mounting a tmpfs needs root (CAP_SYS_ADMIN)"}
        try:
            error = error_of(lambda: self.train(workdir))
            first = steps(workdir)
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
            self.train(workdir)
            return {"error": error, "steps_after_error": first, "steps": steps(workdir),
                    "fingerprints_8": fingerprints(workdir, 8), "leftovers": sorted(os.listdir(mount))}
        finally:
            subprocess.run(["umount", "-l", str(mount)])

    def locked(self):
        workdir = self.out / "locked"
        holder = subprocess.Popen(
            [sys.executable, "-c", "import time; from vlm_jax.workdir import WorkdirLock\n"
             f"with WorkdirLock({str(workdir)!r}):\n    print('locked', flush=True); time.sleep(300)"],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            start = time.monotonic()
            error = error_of(lambda: self.train(workdir))
            return {"error": error, "seconds": time.monotonic() - start, "holder_pid": holder.pid,
                    "wrote": sorted(os.listdir(workdir))}
        finally:
            holder.kill()
            holder.wait()

    def changed_lr(self):
        workdir = self.copy_reference("changed_lr")
        error = error_of(lambda: self.train(workdir, **{"optim.groups.all.lr": 5e-4, "num_train_steps": 10}))
        return {"error": error, "steps_after_error": steps(workdir)}

    def finished(self):
        """The same command on a finished workdir: nothing trained, the run says it is complete with a summary."""
        import logging

        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)  # as under `python -m vlm_jax.main` (absl); the default drops INFO
        workdir = self.copy_reference("finished")
        try:
            start = time.monotonic()
            self.train(workdir)
        finally:
            root.removeHandler(handler)
            root.setLevel(logging.WARNING)
        return {"log": lines, "seconds": time.monotonic() - start, "steps": steps(workdir)}

    def best_n(self):
        """Evaluations at 2, 4, 6, 8; keep the 2 "best" by the HIGHEST validation loss (the earliest steps, so that
        best and newest differ), and the newest."""
        from vlm_jax.checkpoints import run as run_checkpoints

        workdir = self.out / "best_n"
        self.train(workdir, eval_every=2, eval_splits=("validation",),
                   **{"checkpoint.every_steps": 100, "checkpoint.keep": 2,
                      "checkpoint.best_metric": "validation/loss/total", "checkpoint.best_mode": "max"})
        with open(workdir / "metrics.jsonl") as f:
            evals = {r["step"]: r["loss/total"] for r in map(json.loads, f) if r.get("split") == "validation"}
        return {"evals": evals, "steps": steps(workdir),
                "stored": {s: run_checkpoints.read_meta(str(workdir), s)["metrics"] for s in steps(workdir)}}

    def eval_mode(self):
        """``--mode eval`` (`runs.evaluate_checkpoint`) on best_n's newest checkpoint: appends mode="eval" records."""
        from vlm_jax import runs

        workdir = self.out / "best_n"
        runs.evaluate_checkpoint(run_config(self.data_dir, eval_splits=("validation",)), str(workdir))
        with open(workdir / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        return {"trained": [r for r in records if r["step"] == 8 and "mode" not in r],
                "evaluated": [r for r in records if r.get("mode") == "eval"]}


def main(out: str, data_dir: str):
    share_trainers()
    scenarios = Scenarios(Path(out), data_dir)
    results = {}
    for name in ("reference", "damaged_latest_two", "all_damaged", "restore_damaged", "init_from_damaged",
                 "nan_learning_rate", "loop_error", "full_disk", "locked", "changed_lr", "finished", "best_n", "eval_mode"):
        start = time.monotonic()
        try:
            results[name] = getattr(scenarios, name)()
        except BaseException:  # pylint: disable=broad-except  (reported to the test that reads it)
            results[name] = {"crashed": traceback.format_exc()}
        results[name]["seconds"] = round(time.monotonic() - start, 1)
        print(name, results[name]["seconds"], "s", flush=True, file=sys.stderr)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
