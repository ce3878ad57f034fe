"""Two-stage pair of configs/internvl3_1b_retrieval.py: contrastive alignment first, then the task heads.

Stage 1 (configs/internvl3_1b_retrieval.py with `:stage1`, the ITC task alone) trains the adapters, projectors
and temperature; stage 2 restores them (with the frozen backbone) from stage 1's workdir, freezes them too, and
trains the ITM, box and spatial tasks on the fixed embeddings, so the retrieval metrics of stage 1 are kept exactly.

Run:
    python -m vlm_jax.main --config configs/internvl3_1b_retrieval_stage2.py:stage1 --workdir /runs/stage1 \\
        --config.model.converted_dir=/data/internvl3_1b --config.data.manual_dir=/data/coco
    python -m vlm_jax.main --config configs/internvl3_1b_retrieval_stage2.py --workdir /runs/stage2 \\
        --config.init_from=/runs/stage1 --config.model.converted_dir=/data/internvl3_1b \\
        --config.data.manual_dir=/data/coco

Result: not measured here (needs the real checkpoint, COCO and an accelerator).
"""

from vlm_jax.config_files import load_sibling


def get_config(stage: str = "stage2"):
    """stage1: the ITC task alone (contrastive alignment); stage2: the other tasks on stage 1's fixed embeddings."""
    c = load_sibling(__file__, "internvl3_1b_retrieval")
    if stage == "stage1":
        del c.tasks["itm"], c.tasks["box"], c.tasks["spatial"]
        return c
    if stage != "stage2":
        raise ValueError(f"internvl3_1b_retrieval_stage2.py: stage must be 'stage1' or 'stage2', got {stage!r}")
    c.init_from = ""  # required: stage 1's workdir
    c.model.converted_dir = ""  # required: the converted InternVL3-1B (config + tokenizer)
    c.init_from_keys = ("backbone", "vision_adapter", "text_adapter", "vision_proj", "text_proj", "logit_scale")
    c.optim.rules = (
        ("backbone/.*", "frozen"),
        ("(vision_adapter|text_adapter|vision_proj|text_proj)/.*", "frozen"),
        ("logit_scale", "frozen"),
        (".*", "heads"),
    )
    del c.tasks["itc"]  # the embeddings are fixed
    c.checkpoint.best_metric = "validation/box_iou"  # the retrieval metrics are stage 1's, unchanged here
    c.num_epochs = 2.0
    c.eval_every = 28322
    return c
