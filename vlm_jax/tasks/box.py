"""Box regression: one xyxy box per caption (the object the caption names), in normalised image coordinates.

Heads: 'attention' (default) attends from the fused pair feature over the ViT patch tokens and their grid positions
(`heads.AttentionBoxHead`); 'linear' (seed recipe) is a Linear on the fused feature. Both go through
`heads.box_from_logits`, so the box always lies inside the image.
Config (`config.tasks.box`): weight (of the whole box term), l1, giou (weights of its parts: l1 * L1 + giou *
(1 - GIoU); GIoU is logged either way), head, num_heads (attention head), hidden_dim (attention head's MLP; 0 = the
vision width).
Metrics: mean IoU / GIoU / L1 and accuracy at IoU 0.5 over captions that have a box.
"""

import numpy as np

from vlm_jax import box_ops, losses, metrics
from vlm_jax.tasks import heads
from vlm_jax.tasks.base import Task

HEADS = ("attention", "linear")


class BoxTask(Task):
    name = "box"
    diagnostic_terms = ("giou", "num_boxes")
    headline_metrics = ("box_iou", "box_acc@0.5")
    batch_fields = ("box", "has_box")
    eval_outputs = ("box_pred",)
    metric_names = ("box_iou", "box_giou", "box_l1", "box_acc@0.5")

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        if cfg.head not in HEADS:
            raise ValueError(f"tasks.box.head must be one of {HEADS}, got {cfg.head!r}")
        self.l1, self.giou, self.kind = float(cfg.l1), float(cfg.giou), cfg.head
        self.reads_patches = self.kind == "attention"
        if cfg.head == "attention":
            self.head = heads.AttentionBoxHead(widths.fused, widths.vision, int(cfg.num_heads),
                                               int(cfg.hidden_dim) or widths.vision, rngs=rngs)
        else:
            self.head = heads.make_head(widths.fused, 0, 4, rngs=rngs)

    def __call__(self, features, batch, *, train):
        if self.kind == "attention":
            raw = self.head(features.fused, features.patches, features.patch_grid, features.patch_mask)
        else:
            raw = self.head(features.fused)
        return {"box_pred": heads.box_from_logits(raw)}

    def loss(self, outputs, batch, valid):
        return losses.box_loss(outputs["box_pred"], batch["box"], batch["has_box"] & valid, self.l1, self.giou)

    def metrics(self, collected):
        box = metrics.box_metrics(collected["box_pred"], collected["box"], collected["has_box"])
        return {f"box_{k}": float(v) for k, v in box.items() if k != "count"}

    def eval_pictures(self, collected, examples):
        from vlm_jax import eval_pictures

        rows = [i for i in range(len(examples.images)) if collected["has_box"][i]]
        if not rows:
            return {}
        iou = np.asarray(box_ops.box_iou_paired(collected["box_pred"][rows], collected["box"][rows])[0])
        return {"boxes": eval_pictures.stack([
            eval_pictures.boxes_picture(examples.images[i], examples.captions[i], collected["box"][i],
                                        collected["box_pred"][i], f"IoU {v:.2f} (green true, magenta predicted)")
            for i, v in zip(rows, iou)])}
