"""Two processes on 127.0.0.1 with one CPU device each train and evaluate the tiny config together, the weights
sharded across the processes (fsdp = 2) and each process reading its own half of every batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from fixtures import demo_config, subprocess_xla_flags

REPO = Path(__file__).resolve().parents[1]
SMALL_DATA = dict(num_train=256, num_validation=64, num_test=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_dataset(data_dir: str) -> None:
    """Built once up front so that the two processes do not race to generate it."""
    from vlm_jax.data import pipeline

    cfg = demo_config().data
    cfg.data_dir = data_dir
    cfg.builder_params.update(SMALL_DATA)
    pipeline.make_builder(cfg)


def _run_two(workdir: Path, data_dir: str, *extra: str) -> list[str]:
    """Both processes of the tiny config (4 steps, an evaluation at the end, weights sharded fsdp = 2); their
    outputs, after checking that both exited 0."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(1), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "vlm_jax.main", "--config", str(REPO / "configs/tiny_synthetic.py"),
               "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", "--config.num_train_steps=4",
               *[f"--config.data.builder_params.{k}={v}" for k, v in SMALL_DATA.items()],
               "--config.batch_size=16", "--config.eval_batch_size=32", "--config.log_every=2",
               "--config.eval_every=4", "--config.checkpoint.every_steps=2", "--config.mesh.data=1",
               "--config.mesh.fsdp=2", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               # Plain heads (no attention heads, no objects query): what is tested is the two processes.
               "--config.tasks.box.head=linear", "--config.tasks.spatial.query=caption",
               "--config.tasks.spatial.head=mlp", "--config.tasks.spatial.locate=0.0",
               *extra, f"--process_id={pid}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def test_two_processes_complete_the_tiny_config(tmp_path):
    data_dir = str(tmp_path / "tfds")
    _build_dataset(data_dir)
    workdir = tmp_path / "run"
    outs = _run_two(workdir, data_dir)
    assert "process 0 of 2; 1 local / 2 global devices" in outs[0]
    assert "process 1 of 2; 1 local / 2 global devices" in outs[1]
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4]
    # Every (image, caption) pair of the validation split was evaluated exactly once across the processes.
    assert records[0]["num_texts"] == 128 and records[0]["num_images"] == 64
    assert (workdir / "checkpoints" / "4").exists()


def test_two_processes_each_cache_their_own_shard(tmp_path):
    """The same run with a frozen backbone and the feature cache: each process writes the cache of its own half of
    every split (its images' record indices), and the evaluation still sees every pair once."""
    import numpy as np

    data_dir = str(tmp_path / "tfds")
    _build_dataset(data_dir)
    workdir = tmp_path / "run"
    _run_two(workdir, data_dir, "--config.feature_cache.enabled=True",
             "--config.optim.rules=((\"backbone/.*\", \"frozen\"), (\".*\", \"all\"))")
    for split, images in (("train", 256), ("validation", 64)):
        shards = sorted((workdir / "feature_cache" / split).glob("*/process_*_of_2/complete.json"),
                        key=lambda p: p.parent.name)
        assert [p.parent.name for p in shards] == ["process_0_of_2", "process_1_of_2"]
        assert [json.loads(p.read_text())["images"] for p in shards] == [images // 2] * 2
        # The two keys differ (the shard is part of the key) and neither process read the other's.
        assert len({p.parent.parent.name for p in shards}) == 2
        for path in shards:
            aspect = np.load(path.parent / "image.image_aspect.npy")
            assert aspect.shape == (images // 2,) and (aspect > 0).all()
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4]
    assert records[0]["num_texts"] == 128 and records[0]["num_images"] == 64
