"""The trainer on the tiny config: sharded numerics (8-device mesh vs one device), parameter groups, the frozen
backbone's cost, init_from. (Whole runs from the command line, killed and resumed: tests/test_faults_runs.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from fixtures import subprocess_xla_flags
from vlm_jax import config_files, sharding
from vlm_jax.checkpoints import run as run_checkpoints
from vlm_jax import build
from vlm_jax import trainer as trainer_lib
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
def run_env(tmp_path_factory):
    """Subprocess environment: one CPU device, a shared persistent compilation cache (runs reuse executables)."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=subprocess_xla_flags(1), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(REPO))
    return env


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
    # ITC and the attention box head: dense and attention heads shard like the rest; fewer heads, a quicker compile.
    cfg.tasks = {name: cfg.tasks[name].to_dict() for name in ("itc", "box")}
    # LoRA with dropout on top of the trained backbone: its factors shard by the kernels' logical axes, and the
    # dropout masks do not depend on the mesh.
    cfg.lora.update(dict(rank=4, dropout=0.1, targets=("backbone/language_model/layers/self_attn/(q|v)_proj",
                                                       "backbone/vision_tower/layers/attn/qkv")))
    cfg.mesh = dict(mesh_axes)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:num_devices])
    losses, state = _losses(cfg, mesh)
    if num_devices > 1:
        leaves = jax.tree.leaves(state.params["backbone"]["language_model"])
        assert any("fsdp" in str(x.sharding.spec) for x in leaves), "nothing was fsdp-sharded"
        q_proj = state.params["backbone"]["language_model"]["layers"]["self_attn"]["q_proj"]
        specs = {k: tuple(q_proj[k][...].sharding.spec) for k in ("kernel", "lora_a", "lora_b")}
        assert "fsdp" in specs["lora_a"] and specs["lora_a"][:2] == specs["kernel"][:2], specs
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


def test_bf16_compute_keeps_float32_master_weights_and_tracks_the_float32_run():
    """Frozen LM stored in bf16, everything else trained: master copies and optimizer moments stay float32, and
    the bf16-compute losses follow the float32 run's to bf16 rounding (but are not the same numbers)."""
    def run(**model):
        cfg = _tiny(8)
        cfg.tasks = {"itc": cfg.tasks.itc.to_dict()}  # the backbone's precision is the subject, not the heads
        cfg.checkpoint.best_metric = ""
        cfg.optim.rules = (("backbone/language_model/.*", "frozen"), (".*", "all"))
        cfg.model.update(model)
        return _losses(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]), steps=3)

    reference, _ = run()
    losses, state = run(dtype="bfloat16", frozen_param_dtype="bfloat16", attention="einsum",
                        remat="dots_with_no_batch_dims_saveable")
    dtypes = lambda tree: {str(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")}  # noqa: E731
    assert dtypes(state.params) == {"float32"}
    assert dtypes(state.frozen) == {"bfloat16"}
    assert dtypes(state.opt_state) <= {"float32", "int32"}  # Adam moments and counts
    assert "embed_tokens" in str(jax.tree_util.tree_structure(state.frozen))
    np.testing.assert_allclose(losses, reference, rtol=1e-2)
    assert np.abs(losses - reference).max() > 1e-6  # bf16 really computed


def test_attention_and_remat_come_from_the_config():
    cfg = _tiny()
    cfg.model.attention, cfg.model.remat = "einsum", "dots_saveable"
    model = nnx.eval_shape(lambda: trainer_lib._create(cfg, build.resolve_backbone(cfg.model).config))
    for tower in (model.backbone.vision_tower, model.backbone.language_model):
        assert (tower.attention_impl, tower.remat) == ("einsum", "dots_saveable")


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
    cfg.tasks.box.head, cfg.tasks.spatial.head = "linear", "mlp"  # the attention heads' backward is no head's size
    cfg.optim.accum_steps = 2  # optax.MultiSteps; the step also logs per-group gradient norms
    cfg.batch_size = 8
    cfg.mesh = {"data": 1}
    r = benchmark_train_step.measure(cfg, full_reference=True, abstract=True, devices=jax.devices()[:1],
                                     full_reference_xla=False)
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
    cfg.tasks = {name: cfg.tasks[name].to_dict() for name in ("itc", "itm")}  # the heads below; a quicker compile
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
