"""Stage 2 of the tiny demo: stage 1's backbone, frozen; only adapters, projectors and heads train.

Run after configs/tiny_synthetic.py (its workdir is the init_from here):
    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir /tmp/tiny_synthetic
    python -m vlm_jax.main --config configs/tiny_synthetic_stage2.py --workdir /tmp/tiny_synthetic_stage2 \
        --config.init_from=/tmp/tiny_synthetic

Measured on the shared 2-core CPU: 2.4 min wall (3000 steps, ~32 steps/s: no backward through the backbone).
Validation split, step 3000 (stage 1 in parentheses):
    retrieval text->image R@1 / R@5 / R@10 = 7.8 / 29.5 / 41.8 %   (7.3 / 29.0 / 42.3)
              image->text R@1 / R@5 / R@10 = 4.8 / 21.0 / 37.0 %   (3.2 / 17.0 / 32.4)
    spatial relation accuracy 76.3 %, macro-F1 0.76                 (41.1 %, 0.40)
    subject box mean IoU 0.262, acc@0.5 16.7 %                      (0.130, 3.2 %)
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
