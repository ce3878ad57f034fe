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


def test_two_processes_complete_the_tiny_config(tmp_path):
    data_dir = str(tmp_path / "tfds")
    _build_dataset(data_dir)
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(1), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    workdir = tmp_path / "run"
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
               f"--process_id={pid}"]
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
    assert "process 0 of 2; 1 local / 2 global devices" in outs[0]
    assert "process 1 of 2; 1 local / 2 global devices" in outs[1]
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4]
    # Every (image, caption) pair of the validation split was evaluated exactly once across the processes.
    assert records[0]["num_texts"] == 128 and records[0]["num_images"] == 64
    assert (workdir / "checkpoints" / "4").exists()
