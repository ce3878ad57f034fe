"""Stage 2 of the tiny demo: stage 1's backbone, frozen; adapters, projectors and heads trained afresh.

Run after configs/tiny_synthetic.py (its workdir is the init_from here):
    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir /tmp/tiny_synthetic
    python -m vlm_jax.main --config configs/tiny_synthetic_stage2.py --workdir /tmp/tiny_synthetic_stage2 \
        --config.init_from=/tmp/tiny_synthetic

Measured on the shared 2-core CPU: 2 min 15 s wall (3000 steps; no backward through the backbone).
Validation split, step 3000 (stage 1 in parentheses):
    retrieval text->image R@1 / R@5 / R@10 = 8.2 / 30.5 / 41.6 %   (8.8 / 29.5 / 41.0)
              image->text R@1 / R@5 / R@10 = 6.8 / 22.2 / 35.4 %   (6.4 / 24.6 / 37.0)
    spatial relation accuracy 100 %, macro-F1 1.00                  (100 %, 1.00)
    subject box mean IoU 0.348, acc@0.5 24.1 %                      (0.336, 23.2 %)
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
