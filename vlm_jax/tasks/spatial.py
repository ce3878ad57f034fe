"""Spatial relation classification: which of the relations (left, right, above, below, inside, outside) holds
between a caption's two objects.

Queries (`config.tasks.spatial.query`):
  'objects'  the head reads "the red circle and the blue square" (`relations.pair_query`: the two objects, subject
             first, without the relation) fused with the image, so the relation must come from the image. Needs a
             dataset whose records name each caption's subject and reference (`spatial_shapes`) and late fusion.
  'caption'  the head reads the caption's own fused pair feature; the caption states the relation, so this measures
             reading the word (the seed recipe's form).
Heads (`head`): 'mlp' (on the fused feature; hidden_dim 0 = a linear head, the seed recipe) or 'attention'
(`heads.PatchAttentionHead`: the query attends over the ViT patch tokens with num_heads heads, each head's attended
position and extent feed the MLP, so a relation between two attended objects is a function of where they are).
With the attention head, `locate` > 0 adds locate * the mean L1 distance between the attended positions of heads 0
and 1 and the centres of the subject's and the reference's boxes (`losses.locate_loss`, logged as
`spatial_locate`): it tells the heads where to look, as the box head's centre prior does, instead of leaving them to
find it through the classifier alone.
Config: weight; num_relations; query; head; num_heads (>= 2 with locate); hidden_dim; locate.
Metrics: accuracy, macro-F1 and the majority-class accuracy (`chance/spatial_acc`) over captions with a relation.
"""

import jax.numpy as jnp
import numpy as np

from vlm_jax import losses, metrics
from vlm_jax.tasks import heads
from vlm_jax.tasks.base import Task

QUERIES = ("caption", "objects")
HEADS = ("mlp", "attention")


class SpatialTask(Task):
    name = "spatial"
    headline_metrics = ("spatial_acc",)
    batch_fields = ("relation", "has_relation")
    diagnostic_terms = ("acc",)
    eval_outputs = ("spatial_logits",)
    metric_names = ("spatial_acc", "spatial_f1", "chance/spatial_acc")

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        self.num_relations = int(cfg.num_relations)
        self.query, self.kind = cfg.get("query", "caption"), cfg.get("head", "mlp")
        if self.query not in QUERIES:
            raise ValueError(f"tasks.spatial.query must be one of {QUERIES}, got {self.query!r}")
        if self.kind not in HEADS:
            raise ValueError(f"tasks.spatial.head must be one of {HEADS}, got {self.kind!r}")
        self.reads_query = self.query == "objects"
        self.reads_patches = self.kind == "attention"
        hidden = int(cfg.hidden_dim)
        self.locate = float(cfg.get("locate", 0.0)) if self.kind == "attention" else 0.0
        if self.kind == "attention":
            num_heads = int(cfg.get("num_heads", 4))
            if self.locate and num_heads < 2:
                raise ValueError(f"tasks.spatial.locate needs num_heads >= 2 (subject and reference), got {num_heads}")
            self.head = heads.PatchAttentionHead(widths.fused, widths.vision, num_heads,
                                                 hidden or widths.vision, self.num_relations, rngs=rngs)
        else:
            self.head = heads.make_head(widths.fused, hidden, self.num_relations, rngs=rngs)

    def __call__(self, features, batch, *, train):
        query = features.query_fused if self.reads_query else features.fused
        if self.kind == "attention":
            logits, centres = self.head.attended(query, features.patches, features.patch_grid, features.patch_mask)
            return {"spatial_logits": logits, "spatial_centres": centres[:, :2]}  # [B, 6], [B, 2, 2]
        return {"spatial_logits": self.head(query)}

    def loss(self, outputs, batch, valid):
        has = batch["has_relation"] & valid
        terms = losses.spatial_loss(outputs["spatial_logits"], batch["relation"], has)
        if self.locate:
            boxes = jnp.stack([batch["box"], batch["reference_box"]], axis=1)  # [B, 2, 4]
            terms["locate"] = losses.locate_loss(outputs["spatial_centres"], boxes, has & batch["has_box"])
            terms["loss"] = terms["loss"] + self.locate * terms["locate"]
        return terms

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
