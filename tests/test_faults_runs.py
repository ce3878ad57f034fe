"""Faults of a training run, each with its outcome asserted: a named error before any work, a fallback to the newest
intact checkpoint, or a finished run equal to an uninterrupted one (every array's fingerprint compared), including
a command-line run killed with SIGKILL.

The runs are played by tests/fault_scenarios.py in one subprocess on one CPU device (see there); the checks of
configs and of single checkpoints run here.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import fixtures
from fault_scenarios import run_config
from fixtures import subprocess_xla_flags
from vlm_jax import config_check, train
from vlm_jax import workdir as workdir_lib
from vlm_jax.checkpoints import integrity
from vlm_jax.checkpoints import run as run_checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fixtures.build_tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def played(tmp_path_factory, data_dir):
    """The results of every scenario of tests/fault_scenarios.py."""
    out = tmp_path_factory.mktemp("scenarios")
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(1), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fault_scenarios.py"), str(out), data_dir],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print("scenario seconds:", [line for line in proc.stderr.splitlines() if line.endswith(" s")])
    with open(out / "results.json") as f:
        results = json.load(f)
    results["jax_cache"] = str(out / "jax_cache")  # the command-line runs here reuse its compiled steps
    return results


def scenario(played, name):
    result = played[name]
    assert "crashed" not in result, result.get("crashed")
    return result


@pytest.fixture(scope="module")
def reference(played):
    result = scenario(played, "reference")
    assert result["steps"] == [4, 6, 8]
    return result["fingerprints"]


# ---- checkpoint integrity ------------------------------------------------------------------------------------------

def test_damaged_latest_checkpoints_are_set_aside_and_the_rerun_equals_the_uninterrupted_run(played, reference):
    """Step 8 with 64 flipped bytes, step 6 with a truncated file: the run resumes from 4 and ends equal."""
    r = scenario(played, "damaged_latest_two")
    assert r["damaged"] == ["6", "8"]  # moved to WORKDIR/damaged_checkpoints, kept for inspection
    assert r["steps"] == [4, 6, 8]
    assert r["fingerprints_8"] == reference["8"]


def test_every_checkpoint_damaged_is_an_error_naming_them(played):
    error = scenario(played, "all_damaged")["error"]
    assert error["type"] == "CheckpointError"
    assert "every checkpoint" in error["message"]
    for step in (8, 6, 4):
        assert f"step {step}: " in error["message"]


def test_a_damaged_checkpoint_names_the_array_and_a_damaged_metadata_file_names_it(played):
    r = scenario(played, "restore_damaged")
    assert r["flipped"]["type"] == "CheckpointError"
    assert "checkpoints/6 is damaged: 1 array(s) differ" in r["flipped"]["message"]
    assert "model/" in r["flipped"]["message"] and "expected" in r["flipped"]["message"]
    assert r["meta"]["type"] == "CheckpointError" and "checkpoints/4/meta/metadata" in r["meta"]["message"]


def test_init_from_a_run_whose_latest_checkpoint_is_damaged_uses_the_previous_one(played, reference):
    r = scenario(played, "init_from_damaged")
    expected = {k: v for k, v in reference["6"].items() if k.startswith("model/backbone/")}
    assert r["fingerprints"] == expected
    assert r["steps_after"] == [4, 6, 8]  # another run's workdir: nothing moved


# ---- the non-finite guard ------------------------------------------------------------------------------------------

def test_a_nan_learning_rate_never_reaches_the_parameters_and_stops_by_step_5(played):
    """Finite gradients, NaN updates from step 1, limit 3: every step is skipped and the run stops with the initial
    (finite) parameters checkpointed."""
    r = scenario(played, "nan_learning_rate")
    assert r["error"]["type"] == "NonFiniteError" and "3 consecutive steps" in r["error"]["message"]
    assert r["steps"] and 3 <= r["steps"][-1] <= 5
    for step, saved in r["saved"].items():
        assert {k: v for k, v in saved.items() if k.startswith("model/")} == r["init"], step


# ---- crashes and full disks ----------------------------------------------------------------------------------------

def test_an_error_in_the_loop_waits_for_the_checkpoint_being_written(played):
    r = scenario(played, "loop_error")
    assert r["error"] == {"type": "RuntimeError", "message": "input source failed", "errno": None}
    assert r["steps"] == [2, 4]  # the step-4 save in flight when step 5's input failed is committed


def test_a_full_disk_names_errno_28_then_a_resume_equals_the_uninterrupted_run(played, reference):
    r = scenario(played, "full_disk")
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert r["error"]["type"] == "OSError" and r["error"]["errno"] == 28
    assert "No space left on device" in r["error"]["message"] and "/checkpoints/4" in r["error"]["message"]
    assert r["steps_after_error"] == [2]
    assert r["steps"] == [4, 6, 8] and r["fingerprints_8"] == reference["8"]
    assert r["leftovers"] == ["4", "6", "8"]  # no half-written directory left


def test_a_write_error_without_a_file_name_is_named_with_the_checkpoint_directory():
    """A full disk can surface from write() or flush(), whose OSError names no file (here: /dev/full, ENOSPC on every
    write); the checkpoint layer names the step's directory instead, and leaves named errors as they are."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError) as raised, open("/dev/full", "wb", buffering=0) as full:
        full.write(b"x")
    assert raised.value.filename is None
    named = run_checkpoints._os_error(raised.value, "/w/checkpoints/4")
    assert isinstance(named, OSError) and named.errno == 28
    assert str(named) == "[Errno 28] No space left on device: '/w/checkpoints/4'"
    already = OSError(28, "No space left on device", "/w/checkpoints/4/model/x")
    assert run_checkpoints._os_error(already, "/elsewhere") is already


# ---- workdir safety ------------------------------------------------------------------------------------------------

def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(played):
    r = scenario(played, "locked")
    assert r["error"]["type"] == "WorkdirBusyError"
    assert "in use by another run" in r["error"]["message"] and f'"pid": {r["holder_pid"]}' in r["error"]["message"]
    assert r["seconds"] < 10 and r["wrote"] == ["run.lock"]


def test_resuming_with_a_changed_learning_rate_is_refused_unless_allowed(played):
    r = scenario(played, "changed_lr")
    assert r["error"]["type"] == "ConfigChangedError"
    assert "optim.groups.all.lr: 0.001 -> 0.0005" in r["error"]["message"]
    assert "num_train_steps" not in r["error"]["message"].split("safe to change")[0]  # a safe change is not listed
    assert r["steps_after_error"] == [4, 6, 8]


def test_an_allowed_config_change_returns_the_changes():
    stored = json.loads(fixtures.demo_config().to_json())
    current = fixtures.demo_config()
    current.optim.groups.all.lr = 5e-4
    changes = workdir_lib.check_resume_config(stored, json.loads(current.to_json()), "ckpt", allow_change=True)
    assert changes == [("optim.groups.all.lr", 1e-3, 5e-4)]


# ---- killed from the command line ------------------------------------------------------------------------------------

def _cli(workdir, data_dir, *extra):
    return [sys.executable, "-m", "vlm_jax.main", "--config", f"{REPO / 'tests' / 'scenario_config.py'}:eval",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *extra]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_a_run_killed_with_sigkill_resumes_equal_to_the_uninterrupted_run(played, reference, data_dir, tmp_path):
    """`python -m vlm_jax.main` killed (SIGKILL) once its first checkpoint is committed, then the same command: the
    final weights equal the uninterrupted run's array for array. The resumed run's console and TensorBoard events
    are checked too."""
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(1), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               JAX_COMPILATION_CACHE_DIR=played["jax_cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(run_dir, data_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "2" / "_CHECKPOINT_METADATA").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "8").exists()

    again = subprocess.run(_cli(run_dir, data_dir), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from" in again.stderr
    assert run_checkpoints.read_meta(str(run_dir), 8)["fingerprints"] == reference["8"]
    metrics = _jsonl(run_dir / "metrics.jsonl")
    assert [(m["step"], m["split"]) for m in metrics] == [(4, "validation"), (8, "validation")]
    _assert_quiet_console_with_a_summary(again.stderr + again.stdout)
    _assert_tensorboard_layout(run_dir)



def _assert_quiet_console_with_a_summary(console: str) -> None:
    """vlm_jax's own short lines: progress, evaluations, the summary; no third-party notices."""
    lines = console.splitlines()
    assert len(lines) < 50, console
    for noise in ("PyTorch was not found", "libtpu", "oneDNN", "Using custom data configuration", "Hyperparameters",
                  "Generating splits", "orbax"):
        assert noise not in console, noise
    assert any(" · first step (with compilation) took " in line for line in lines), console
    assert "step 8/8 (100 %)" in console and "validation @ step 4: " in console, console
    summary = console[console.index("Run complete: step 8 of 8"):]
    assert "t2i_r1" in summary and "(chance" in summary and "tensorboard --logdir" in summary


def _assert_tensorboard_layout(workdir) -> None:
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    for tag in ("loss/train/total", "loss/train/itc", "loss/validation/total", "validation/t2i_r1",
                "train/itm_acc", "train/lr/all", "train/steps_per_sec", "validation/boxes",
                "validation/spatial_confusion", "validation/retrieved_captions"):
        assert tag in tags, (tag, sorted(tags))
    assert not {"total", "grad_norm/all", "loss/validation/itm_acc", "validation/loss/total"} & tags
    boxes = events.Tensors("validation/boxes")[-1].tensor_proto
    assert len(boxes.string_val) >= 3  # width, height, then one encoded PNG per example


def test_eval_mode_reproduces_the_last_training_evaluation(played):
    r = scenario(played, "eval_mode")
    (trained,), (evaluated,) = r["trained"], r["evaluated"]
    assert evaluated.pop("mode") == "eval" and evaluated.keys() == trained.keys()
    for key, value in trained.items():
        if isinstance(value, str):
            assert evaluated[key] == value, key
        else:
            np.testing.assert_allclose(evaluated[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


# ---- a finished workdir ---------------------------------------------------------------------------------------------

def test_a_finished_workdir_trains_nothing_and_prints_the_summary(played):
    r = scenario(played, "finished")
    text = "\n".join(r["log"])
    assert "Run complete: step 8 of 8" in text, text
    assert "Checkpoints: " in text and "newest: step 8" in text and "tensorboard --logdir" in text
    assert not any(line.startswith("step ") for line in r["log"])  # no training step ran
    assert r["steps"] == [4, 6, 8]


# ---- best-N retention ----------------------------------------------------------------------------------------------

def test_best_n_retention_keeps_the_best_evaluations_and_the_newest(played):
    r = scenario(played, "best_n")
    evals = {int(k): v for k, v in r["evals"].items()}
    assert sorted(evals) == [2, 4, 6, 8]
    best_two = sorted(evals, key=evals.get, reverse=True)[:2]  # best_mode "max"
    assert 8 not in best_two  # the loss fell: retention by metric differs from keeping the newest
    assert r["steps"] == sorted(set(best_two) | {8})
    for step, metrics in r["stored"].items():  # each checkpoint carries the evaluation of its own weights
        assert metrics["validation/loss/total"] == pytest.approx(evals[int(step)], rel=1e-6)


# ---- single checkpoints and configs, in this process -------------------------------------------------------------

def test_a_nonfinite_state_is_never_saved_nor_restored(tmp_path):
    cfg = fixtures.demo_config().checkpoint
    cfg.async_save = False
    ckpts = run_checkpoints.RunCheckpoints(str(tmp_path / "a"), cfg)
    bad = {"w": jax.numpy.array([1.0, np.nan, 3.0])}
    with pytest.raises(integrity.CheckpointError, match=r"step 1: 1 array\(s\) hold NaN or Inf.*w"):
        ckpts.save(1, bad, {"step": jax.numpy.int32(1)})
    assert ckpts.steps() == []
    # A checkpoint holding NaN written by other means (fingerprints recorded over the NaN) is refused at restore.
    import orbax.checkpoint as ocp

    fps, _ = integrity.scan({"model": bad, "train": {"step": jax.numpy.int32(1)}})
    ckpts.manager.save(1, args=ocp.args.Composite(
        model=ocp.args.StandardSave(bad), train=ocp.args.StandardSave({"step": jax.numpy.int32(1)}),
        meta=ocp.args.JsonSave({"step": 1, "fingerprints": fps})))
    ckpts.manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bad)
    with pytest.raises(integrity.CheckpointError, match=r"hold NaN or Inf.*model/w"):
        ckpts.restore(1, abstract, {"step": jax.ShapeDtypeStruct((), np.int32)})


def test_safe_fields_change_without_the_flag():
    stored = json.loads(fixtures.demo_config().to_json())
    current = fixtures.demo_config()
    current.num_train_steps, current.eval_every, current.checkpoint.keep = 9000, 100, 5
    changes = workdir_lib.check_resume_config(stored, json.loads(current.to_json()), "ckpt")
    assert {c[0] for c in changes} == {"num_train_steps", "eval_every", "checkpoint.keep"}


# ---- config checked before any work --------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"checkpoint.keep": 0}, r"checkpoint\.keep=0: expected >= 1"),
    ({"checkpoint.every_steps": 0}, r"checkpoint\.every_steps=0: expected >= 1"),
    ({"log_every": 0}, r"log_every=0: expected >= 1"),
    ({"batch_size": 12}, r"batch_size=12: expected a positive multiple of the data-parallel size 8"),
    ({"checkpoint.best_metric": "validation/t2i_r2", "eval_splits": ("validation",)},
     r"no configured task produces 't2i_r2'.*did you mean \[.*'t2i_r1'"),
    ({"checkpoint.best_metric": "valdation/t2i_r1", "eval_splits": ("validation",)},
     r"its split 'valdation' is not evaluated"),
    ({"model.dtype": "bf16"}, r"model\.dtype='bf16': expected one of \('float32', 'bfloat16', 'float16'\)"),
    ({"model.attention": "flash"}, r"model\.attention='flash': expected one of \('auto', 'xla', 'cudnn'"),
    ({"model.attention": "cudnn"}, r"model\.attention='cudnn' needs an NVIDIA GPU \(backend here: cpu\)"),
    ({"model.remat": "dots"}, r"model\.remat='dots': expected one of \('none', 'full', 'dots_saveable'"),
    ({"lora.rank": 8}, r"lora\.rank=8 needs lora\.targets \(regexes over linear paths\)"),
    ({"lora.dropout": 1.0}, r"lora\.dropout=1\.0: expected a rate in \[0, 1\)"),
    ({"tasks": {"detection": {}}, "data.name": "coco_captions"},
     r"tasks\.detection needs a dataset that lists every object of an image"),
])
def test_invalid_configs_fail_before_any_work(tmp_path, data_dir, change, message):
    with pytest.raises(config_check.ConfigError, match=message):
        train.train_and_evaluate(run_config(data_dir, **change), str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written


def test_a_mistyped_eval_split_fails_before_compiling(tmp_path, data_dir):
    with pytest.raises(config_check.ConfigError, match=r"no split eval_splits='valid'; its splits: \['test', 'train'"):
        train.train_and_evaluate(run_config(data_dir, eval_splits=("valid",)), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_an_unknown_override_is_one_line_with_the_nearest_fields():
    out = subprocess.run([sys.executable, "-m", "vlm_jax.main", "--config", "configs/tiny_synthetic.py",
                          "--workdir", "/nonexistent", "--config.optim.grups.all.lr=0.1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip() == ("error: unknown config field 'optim.grups.all.lr'; nearest: optim.groups.all.lr, "
                                  "optim.groups.all, optim.groups.all.schedule")




@pytest.mark.parametrize("name", ["tiny_synthetic.py", "tiny_synthetic_stage2.py", "internvl3_1b_retrieval.py",
                                  "internvl3_1b_retrieval_stage2.py", "internvl3_1b_retrieval_stage2.py:stage1"])
def test_every_shipped_config_passes_the_checks(name):
    from vlm_jax import config_files

    path, _, argument = name.partition(":")
    config_check.validate(config_files.load_config_file(REPO / "configs" / path, argument or None), num_devices=1)


def test_fingerprints_follow_the_formula_on_host_and_on_device():
    """fingerprint = sum_i word_i * (2i + 1) mod 2**32, from the float32 bits (direct formula in Python ints)."""
    x = np.array([1.0, 2.0, -0.5], np.float32)
    words = [int(w) for w in x.view(np.uint32)]
    expected = f"{sum(w * (2 * i + 1) for i, w in enumerate(words)) % 2**32:08x}"
    assert integrity.scan({"x": x})[0] == {"x": expected}
    on_device = jax.jit(lambda a: integrity._fingerprint(a, jax.numpy))(jax.numpy.asarray(x))
    assert f"{int(on_device[0]):08x}" == expected
    flipped = x.copy()
    flipped.view(np.uint8)[5] ^= 1
    assert integrity.scan({"x": flipped})[0] != {"x": expected}
