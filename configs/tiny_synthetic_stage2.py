"""Stage 2 of the tiny demo: stage 1's backbone, frozen; adapters, projectors and heads trained afresh.

Run after configs/tiny_synthetic.py (its workdir is the init_from here):
    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir /tmp/vlm_jax_demo
    python -m vlm_jax.main --config configs/tiny_synthetic_stage2.py --workdir /tmp/vlm_jax_demo_stage2 \
        --config.init_from=/tmp/vlm_jax_demo

Measured on the 2-core CPU with nothing else running: 4 min 59 s wall (3000 steps; no backward through the
backbone). Validation split, step 3000 (stage 1 in parentheses):
    retrieval text->image R@1 / R@5 / R@10 = 7.3 / 29.7 / 40.5 %   (7.6 / 28.6 / 39.8)
              image->text R@1 / R@5 / R@10 = 4.4 / 22.0 / 34.8 %   (4.0 / 22.4 / 35.0)
    spatial relation accuracy 100 %, macro-F1 1.00                  (100 %, 1.00)
    subject box mean IoU 0.475, acc@0.5 51.5 %                      (0.464, 50.5 %)
"""

from vlm_jax.config_files import load_sibling


def get_config():
    c = load_sibling(__file__, "tiny_synthetic")
    c.init_from = "/tmp/vlm_jax_demo"
    c.optim.rules = (("backbone/.*", "frozen"), (".*", "heads"))
    c.optim.groups = {"heads": dict(lr=1e-3, weight_decay=0.01, schedule="linear", warmup_frac=0.1,
                                    end_lr_frac=0.0)}
    return c
