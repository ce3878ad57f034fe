"""DETR-style detection on a converted InternVL3-1B: frozen backbone, the decoder and its memory projections trained
on COCO 2017 (`vlm_jax.tasks.detection`, data `coco_detection`).

100 object queries, a 6-layer decoder of width 256 (8 heads, MLP 1024) over the ViT patch tokens and the caption's
LM tokens (the caption lists the image's categories, or COCO's captions when captions_*2017.json sit beside the
instances files); the 80 COCO categories as classes; Deformable DETR's loss weights (focal objectness 2, L1 5,
GIoU 2, class CE 1) with auxiliary losses on every layer; AdamW lr 1e-4, batch 16, 12 epochs over train2017.

Run:
    python -m vlm_jax.convert --checkpoint /path/to/InternVL3-1B-hf --output /data/internvl3_1b
    python -m vlm_jax.main --config configs/internvl3_1b_detection.py --workdir /runs/internvl3_1b_detection \\
        --config.model.converted_dir=/data/internvl3_1b --config.data.manual_dir=/data/coco
(/data/coco holds annotations/instances_{train,val}2017.json, train2017/ and val2017/.)

Result: not measured here (needs the real checkpoint, COCO and an accelerator). The tiny counterpart,
configs/tiny_detection.py, is measured in the README.
"""

from vlm_jax.config_files import load_sibling
from vlm_jax.data.datasets import coco_detection


def get_config():
    c = load_sibling(__file__, "internvl3_1b_retrieval")  # converted backbone, frozen, bf16; adapters float32
    c.tasks = {"detection": dict(
        weight=1.0, num_queries=100, width=256, num_layers=6, num_heads=8, mlp_dim=1024, memory="vision_text",
        classes=coco_detection.COCO_2017_CATEGORIES, objectness=2.0, focal_alpha=0.25, focal_gamma=2.0, l1=5.0,
        giou=2.0, class_weight=1.0, aux_loss=True, matching="jax")}
    c.data.name = "coco_detection"
    c.data.builder_config = "coco2017"
    c.data.max_text_length = 40
    c.optim.grad_clip_norm = 0.1  # DETR's
    c.batch_size = 16
    c.num_epochs = 12.0
    c.eval_every = 7393  # about once per epoch (118,287 images / 16)
    c.eval_splits = ("validation",)
    c.checkpoint.best_metric = "validation/detection_AP"
    return c
