"""Stage 2 of the tiny demo: stage 1's backbone, frozen; only adapters, projectors and heads train.

Run after configs/tiny_synthetic.py (its workdir is the init_from here):
    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir /tmp/tiny_synthetic
    python -m vlm_jax.main --config configs/tiny_synthetic_stage2.py --workdir /tmp/tiny_synthetic_stage2 \\
        --config.init_from=/tmp/tiny_synthetic

Result: filled in from a measured run (see the README).
"""

import importlib.util
import os


def _base():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_synthetic.py")
    spec = importlib.util.spec_from_file_location("tiny_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _base()
    c.init_from = "/tmp/tiny_synthetic"
    c.optim.rules = (("backbone/.*", "frozen"), (".*", "heads"))
    c.optim.groups = {"heads": dict(lr=1e-3, weight_decay=0.01, schedule="linear", warmup_frac=0.1,
                                    end_lr_frac=0.0)}
    return c
