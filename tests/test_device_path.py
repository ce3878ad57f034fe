"""The accelerator path, checked on the CPU: `experiments/benchmark_device.py --smoke` runs every measurement of
the device benchmark in a process where the data, logging and TensorFlow stacks cannot be imported (as on a lent
GPU machine that has jax, flax, optax, torch and transformers only), and vlm_jax's forward gives transformers'
logits on the same random weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNAVAILABLE = ("tensorflow", "tensorflow_datasets", "grain", "clu")


def test_device_benchmark_smoke_runs_without_the_data_and_logging_stacks():
    # The absent packages are found with no origin (as a namespace without files) and fail when imported, so
    # `import x` raises ModuleNotFoundError while a probe with importlib.util.find_spec sees nothing to load.
    code = f"""
import importlib.machinery, runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {UNAVAILABLE!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (absent on the device)")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Absent())
import vlm_jax.pretrained, vlm_jax.generation, vlm_jax.trainer
sys.argv = ["benchmark_device.py", "--smoke"]
runpy.run_path("experiments/benchmark_device.py", run_name="__main__")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert not [r for r in rows if "error" in r], rows
    assert [(r["measurement"], r.get("impl")) for r in rows] == [
        ("device", None), *[("forward", "jax"), ("forward", "torch")] * 2, ("train_step", "jax"),
        ("train_step", "torch")]
    assert rows[0]["attention_chosen"] == {"vision": "map", "text": "map"}  # 'auto' on the CPU
    for r in rows[1:]:
        assert r["median_s"] > 0 and r["images_per_s"] > 0 and r["tflops"] > 0, r
    for r in rows:
        if r.get("impl") == "jax":
            assert r["compile_s"] > 0 and r["program_bytes"] > 0, r
        if r.get("impl") == "torch" and r["measurement"] == "forward":
            # Both in bf16 (weights and compute): the last token's logits agree to bf16 rounding.
            assert r["last_token_logits_max_rel_diff"] < 0.03, r
    assert [r["tiles"] for r in rows if r["measurement"] == "forward"] == [1, 1, 2, 2]
