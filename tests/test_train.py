"""The trainer end to end on the tiny config: train, eval, checkpoint, kill -9 + resume, sharded numerics, FLOPs."""

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

from fixtures import subprocess_xla_flags
from vlm_jax import config_files, sharding
from vlm_jax.checkpoints import run as run_checkpoints
from vlm_jax import build
from vlm_jax.trainer import make_trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import benchmark_train_step  # noqa: E402


# A small spatial_shapes (256 / 64 / 64 images) instead of the demo's 4000 / 500 / 500.
SMALL_DATA = dict(num_train=256, num_validation=64, num_test=64)


def load_config(name: str):
    cfg = config_files.load_config_file(REPO / "configs" / f"{name}.py")
    cfg.data.builder_params.update(SMALL_DATA)
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny spatial_shapes dataset, built once for every run in this module."""
    from vlm_jax.data import pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    cfg = load_config("tiny_synthetic").data
    cfg.data_dir = path
    pipeline.make_builder(cfg)
    return path


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    """Subprocess environment: one CPU device, a shared persistent compilation cache (runs reuse executables)."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=subprocess_xla_flags(1), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(REPO))
    return env


def _cmd(workdir, data_dir, *extra):
    return [sys.executable, "-m", "vlm_jax.main", "--config", str(REPO / "configs/tiny_synthetic.py"),
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", "--config.num_train_steps=40",
            *[f"--config.data.builder_params.{k}={v}" for k, v in SMALL_DATA.items()],
            "--config.batch_size=8", "--config.eval_batch_size=32", "--config.log_every=5",
            "--config.eval_every=20", "--config.checkpoint.every_steps=10", *extra]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_same_metrics(a, b):
    assert a["step"] == b["step"] and a["split"] == b["split"]
    for key in ("loss/total", "loss/itc", "loss/box", "loss/spatial", "t2i_r1", "i2t_r5", "spatial_acc", "box_iou"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _assert_quiet_console_with_a_summary(console: str) -> None:
    """vlm_jax's own short lines: progress, evaluations, the summary; no third-party notices."""
    lines = console.splitlines()
    assert len(lines) < 60, console
    for noise in ("PyTorch was not found", "libtpu", "oneDNN", "Using custom data configuration", "Hyperparameters",
                  "Generating splits"):
        assert noise not in console, noise
    assert any(line.endswith(" · first step (with compilation) took " + line.split("took ")[-1])
               for line in lines if "first step" in line)
    assert "step 40/40 (100 %)" in console and "validation @ step 20: " in console
    summary = console[console.index("Run complete: step 40 of 40"):]
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


def test_kill_resume_and_eval_match_an_uninterrupted_run(tmp_path, data_dir, run_env):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.run(_cmd(ref_dir, data_dir), env=run_env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_metrics = _jsonl(ref_dir / "metrics.jsonl")
    assert [m["step"] for m in ref_metrics] == [20, 40]
    _assert_quiet_console_with_a_summary(ref.stderr + ref.stdout)
    _assert_tensorboard_layout(ref_dir)

    # Same command, killed with SIGKILL once the first checkpoint is committed, then run again to the end.
    proc = subprocess.Popen(_cmd(run_dir, data_dir), env=run_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "10" / "_CHECKPOINT_METADATA").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "40").exists()
    again = subprocess.run(_cmd(run_dir, data_dir), env=run_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from" in again.stderr
    metrics = _jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [20, 40]
    for a, b in zip(metrics, ref_metrics):
        _assert_same_metrics(a, b)

    # --mode eval on the final checkpoint reproduces the last in-training evaluation.
    ev = subprocess.run(_cmd(run_dir, data_dir, "--mode=eval"), env=run_env, capture_output=True, text=True,
                        timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    last = _jsonl(run_dir / "metrics.jsonl")[-1]
    assert last["mode"] == "eval"
    _assert_same_metrics(last, ref_metrics[-1])
    assert (ref_dir / "checkpoints" / "40").exists() and any(ref_dir.glob("events.out.tfevents*"))


def _tiny(batch_size=8):
    cfg = load_config("tiny_synthetic")
    cfg.batch_size = batch_size
    return cfg


def _losses(cfg, mesh, steps=3):
    mc = build.resolve_backbone(cfg.model).config
    trainer = make_trainer(cfg, mesh, 100, mc)
    model_state = trainer.init_model_state()
    state = trainer.assemble(model_state, trainer.init_train_items(model_state))
    out = []
    for i in range(steps):
        batch = sharding.global_batch(benchmark_train_step.synthetic_batch(cfg, mc, cfg.batch_size, seed=i), mesh)
        state, metrics = trainer.train_step(state, batch, jax.random.key(1))
        out.append(float(metrics["total"]))
    return np.asarray(out), state


def mesh_losses(mesh_axes: dict, num_devices: int) -> list[float]:
    """Losses of 3 steps of the tiny config on a mesh over the first ``num_devices`` devices."""
    cfg = _tiny()
    cfg.mesh = dict(mesh_axes)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:num_devices])
    losses, state = _losses(cfg, mesh)
    if num_devices > 1:
        leaves = jax.tree.leaves(state.params["backbone"]["language_model"])
        assert any("fsdp" in str(x.sharding.spec) for x in leaves), "nothing was fsdp-sharded"
    return losses.tolist()


def test_mesh_data4_fsdp2_matches_one_device(run_env):
    # A fresh process with 8 fake devices and a generous collective timeout: on an overloaded machine one of the
    # 8 device threads can miss XLA's rendezvous deadline, which aborts the whole process.
    env = dict(run_env, XLA_FLAGS=subprocess_xla_flags(8))
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_train as t; "
            "print('LOSSES', json.dumps([t.mesh_losses({'data': 1}, 1), "
            "t.mesh_losses({'data': 4, 'fsdp': 2, 'tensor': 1}, 8)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, eight = json.loads(out.stdout.split("LOSSES", 1)[1])
    np.testing.assert_allclose(eight, one, rtol=2e-5)
    assert one[-1] < one[0]


def test_unmatched_parameters_fail_fast_listing_them():
    cfg = _tiny()
    cfg.optim.rules = (("backbone/.*", "frozen"), ("(vision|text)_adapter/.*", "all"))
    with pytest.raises(ValueError) as e:
        make_trainer(cfg, sharding.make_mesh({"data": -1}), 10)
    for name in ("tasks/itm/head/kernel", "tasks/box/head/bias", "logit_scale", "vision_proj/linear/kernel"):
        assert name in str(e.value)


def test_frozen_backbone_step_costs_one_forward_and_holds_no_frozen_state():
    cfg = load_config("tiny_synthetic_stage2")
    width = dict(hidden_size=64, intermediate_size=128)
    cfg.model.tiny = dict(image_size=64, vision=width, text=width)
    # Heads small next to the backbone (as at InternVL3-1B scale, where they are < 1 % of its size).
    cfg.model.embedding.adapter_dim = cfg.model.embedding.embed_dim = 16
    cfg.tasks.itm.hidden_dim = cfg.tasks.spatial.hidden_dim = 16
    cfg.tasks.box.head = "linear"
    cfg.optim.accum_steps = 2  # optax.MultiSteps; the step also logs per-group gradient norms
    cfg.batch_size = 8
    cfg.mesh = {"data": 1}
    r = benchmark_train_step.measure(cfg, full_reference=True, abstract=True, devices=jax.devices()[:1])
    assert r["flop_ratio"] <= 1.01, r  # XLA's compiled count
    assert r["jaxpr_flop_ratio"] <= 1.01, r  # matmul count with every scanned layer
    # With every parameter trainable the same step costs about 3 forwards: the backbone's backward is really gone.
    assert r["jaxpr_full_train_step_matmul_flops"] > 2.5 * r["jaxpr_forward_matmul_flops"], r
    assert r["opt_state_bytes"]["frozen"] == 0 and r["params_bytes"]["frozen"] > 0
    # mu + nu + accumulator for the trainable parameters only.
    assert r["opt_state_bytes"]["trainable"] == 3 * r["params_bytes"]["trainable"]


def test_init_from_converted_backbone_then_from_a_stage1_run(tmp_path):
    from fixtures import make_tiny_hf_checkpoint

    from vlm_jax import convert
    from vlm_jax.checkpoints import converted
    from flax import nnx

    ckpt = make_tiny_hf_checkpoint(tmp_path / "hf")
    out = str(tmp_path / "converted")
    convert.convert(ckpt.path, out, show_progress=False)
    cfg = load_config("tiny_synthetic_stage2")
    cfg.model.backbone, cfg.model.converted_dir, cfg.model.tokenizer = "converted", out, ""
    cfg.init_from = ""
    cfg.mesh = {"data": 1}
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])  # one device compiles fastest; meshes are tested above

    def start(workdir, config):
        trainer = make_trainer(config, mesh, 10)
        manager = run_checkpoints.RunCheckpoints(str(workdir), config.checkpoint)
        model, items, step, source = run_checkpoints.restore_or_init(
            manager, init_from=config.init_from, abstract_model=trainer.abstract_model,
            abstract_train=trainer.abstract_train_items(), init_model=trainer.init_model_state,
            init_train=trainer.init_train_items, init_from_keys=tuple(config.init_from_keys))
        return trainer, manager, trainer.assemble(model, items), source

    trainer, manager, state, source = start(tmp_path / "stage1", cfg)
    assert source == "scratch"  # a 'converted' backbone's weights are the model's own init
    reference, _ = converted.load(out)
    ref = nnx.state(reference, nnx.Param)
    got = nnx.split_state(state.frozen["backbone"], nnx.Param, ...)[0]
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    assert set(state.params.keys()) and "backbone" not in state.params  # the backbone is frozen

    # One step, a checkpoint; then a stage-2 start takes backbone + vision adapter from that run.
    batch = sharding.global_batch(benchmark_train_step.synthetic_batch(cfg, trainer.backbone_config, 8), mesh)
    state, _ = trainer.train_step(state, batch, jax.random.key(0))
    manager.save(1, state.model_state(), state.train_items())
    manager.close()
    stage2 = cfg.copy_and_resolve_references()
    stage2.init_from = str(tmp_path / "stage1")
    stage2.init_from_keys = ("backbone", "vision_adapter")
    stage2.seed = 7  # different random heads, so equality below can only come from the restore
    _, _, state2, source2 = start(tmp_path / "stage2", stage2)
    assert source2 == f"init_from:{tmp_path / 'stage1'}"
    for key in ("vision_adapter",):
        for a, b in zip(jax.tree.leaves(state2.params[key]), jax.tree.leaves(state.params[key])):
            np.testing.assert_array_equal(a, b)
    itm_kernel = lambda s: s.params["tasks"]["itm"]["head"]["kernel"][...]  # noqa: E731
    assert not np.array_equal(itm_kernel(state2), itm_kernel(state))
