"""Stage 2 of the tiny demo: stage 1's backbone, frozen; adapters, projectors and heads trained afresh.

Run after configs/tiny_synthetic.py (its workdir is the init_from here):
    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir /tmp/tiny_synthetic
    python -m vlm_jax.main --config configs/tiny_synthetic_stage2.py --workdir /tmp/tiny_synthetic_stage2 \
        --config.init_from=/tmp/tiny_synthetic

Measured on the shared 2-core CPU: 2 min 36 s wall (3000 steps; no backward through the backbone).
Validation split, step 3000 (stage 1 in parentheses):
    retrieval text->image R@1 / R@5 / R@10 = 7.1 / 29.0 / 40.3 %   (7.6 / 27.8 / 39.3)
              image->text R@1 / R@5 / R@10 = 4.8 / 21.4 / 32.4 %   (5.4 / 21.4 / 31.0)
    spatial relation accuracy 100 %, macro-F1 1.00                  (100 %, 1.00)
    subject box mean IoU 0.466, acc@0.5 50.9 %                      (0.458, 47.4 %)
"""

from vlm_jax.config_files import load_sibling


def get_config():
    c = load_sibling(__file__, "tiny_synthetic")
    c.init_from = "/tmp/tiny_synthetic"
    c.optim.rules = (("backbone/.*", "frozen"), (".*", "heads"))
    c.optim.groups = {"heads": dict(lr=1e-3, weight_decay=0.01, schedule="linear", warmup_frac=0.1,
                                    end_lr_frac=0.0)}
    return c
