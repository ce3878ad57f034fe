"""Spatial relation classification: which of the relations (left, right, above, below, inside, outside) the caption
states between its two objects, from the fused pair feature.

Config (`config.tasks.spatial`): weight; num_relations; hidden_dim (0 = a linear head, the seed recipe).
Metrics: accuracy, macro-F1 and the majority-class accuracy (`chance/spatial_acc`) over captions with a relation.
"""

import numpy as np

from vlm_jax import losses, metrics
from vlm_jax.tasks import heads
from vlm_jax.tasks.base import Task


class SpatialTask(Task):
    name = "spatial"
    diagnostic_terms = ("acc",)
    headline_metrics = ("spatial_acc",)
    batch_fields = ("relation", "has_relation")
    eval_outputs = ("spatial_logits",)
    metric_names = ("spatial_acc", "spatial_f1", "chance/spatial_acc")

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        self.num_relations = int(cfg.num_relations)
        self.head = heads.make_head(widths.fused, int(cfg.hidden_dim), self.num_relations, rngs=rngs)

    def __call__(self, features, batch, *, train):
        return {"spatial_logits": self.head(features.fused)}

    def loss(self, outputs, batch, valid):
        return losses.spatial_loss(outputs["spatial_logits"], batch["relation"], batch["has_relation"] & valid)

    def metrics(self, collected):
        labels, has = collected["relation"], collected["has_relation"].astype(bool)
        spatial = metrics.spatial_metrics(collected["spatial_logits"], labels, has, num_classes=self.num_relations)
        counts = np.bincount(labels[has], minlength=self.num_relations)
        return {"spatial_acc": spatial["accuracy"], "spatial_f1": spatial["macro_f1"],
                "chance/spatial_acc": float(counts.max() / max(counts.sum(), 1))}

    def eval_pictures(self, collected, examples):
        from vlm_jax import eval_pictures
        from vlm_jax.data.datasets.relations import RELATIONS

        has = collected["has_relation"].astype(bool)
        predicted = np.asarray(collected["spatial_logits"]).argmax(-1)
        matrix = np.asarray(metrics.confusion_matrix(predicted[has], collected["relation"][has], self.num_relations))
        names = list(RELATIONS) if self.num_relations == len(RELATIONS) else [str(i) for i in range(self.num_relations)]
        return {"spatial_confusion": eval_pictures.confusion_picture(matrix, names)}
