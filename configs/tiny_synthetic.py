"""Tiny InternVL trained from scratch with the multitask heads on `spatial_shapes` (the default demo).

Run (2-core CPU, about N minutes):
    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir /tmp/tiny_synthetic

Result: filled in from a measured run (see the README).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "tiny"
    c.model.tiny = ml_collections.ConfigDict(dict(vocab_size=256))
    c.model.dtype = "float32"
    c.model.backbone_param_dtype = "float32"
    c.model.heads = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.name = "spatial_shapes"
    c.data.train_split = "train"

    c.loss = ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, box=0.1, spatial=0.1))

    c.optim = ml_collections.ConfigDict()
    c.optim.rules = ((".*", "all"),)
    c.optim.groups = ml_collections.ConfigDict(dict(
        all=dict(lr=1e-3, weight_decay=0.01, schedule="cosine", warmup_frac=0.1, end_lr_frac=0.0)))
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.grad_clip_norm = 1.0
    c.optim.accum_steps = 1
    c.optim.decay_vectors = False

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.logical_rules = ()

    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_train_steps = 100
    c.log_every = 10
    c.eval_every = 50
    c.eval_splits = ("validation",)
    c.max_consecutive_nonfinite = 5

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, keep=2, best_metric="", best_mode="max",
                                                  async_save=True))
    c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="vlm_jax", run_id=""))
    return c
