"""Detection: every object in the image, each with a box, an objectness score and (optionally) a class.

DETR-style (Carion et al. 2020, with Deformable DETR's focal objectness): Q learned object queries go through a
decoder (`models.detr.DetrDecoder`) over a memory of the ViT patch tokens (with their positions) and, with
memory 'vision_text', the caption's LM tokens. Per query: a box [cx, cy, w, h] (sigmoid, normalised image
coordinates; reported as xyxy), an objectness logit and, with `classes`, logits over that vocabulary.
Training: each image's ground truth (every object the dataset lists: `scene_boxes` / `scene_keys`) is matched to the
queries by an optimal bipartite assignment (`vlm_jax.matching`) on the cost
    objectness * focal(q) + l1 * |box_q - box_g|_1 + giou * (-GIoU(q, g)) [+ class_weight * (-p_q(class_g))],
then the losses are objectness * sigmoid focal loss over all queries (matched = 1), l1 * L1 and giou * (1 - GIoU)
over the matched pairs, each normalised by the number of ground-truth boxes in the batch, and class_weight * the
cross-entropy of the matched queries. `aux_loss`: the same heads and losses on every decoder layer's output.

Classes: `classes` lists object names (e.g. `spatial_shapes.OBJECT_NAMES`, COCO's category names); an object's
class is the entry whose `caption_truth.text_key` equals its name key. () = class-agnostic (objectness only).
Config (`config.tasks.detection`): weight, num_queries, width, num_layers, num_heads, mlp_dim, memory
('vision' | 'vision_text'), classes, objectness, focal_alpha, focal_gamma, l1, giou, class_weight, aux_loss, matching
('jax' | 'scipy', see `vlm_jax.matching`).
Metrics over the split's images (each once): COCO-style AP@[.5:.95], AP50, AP75 and AR@100, class-agnostic
(`detection_AP`, ...) and, with classes, per class (`detection_class_AP`, `detection_class_AP50`: the mean over the
classes present); `chance/detection_AP50`: one constant box per image (the split's mean ground-truth box), the
baseline a model must beat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from vlm_jax import box_ops, caption_truth, detection_metrics, losses, matching
from vlm_jax.models import detr, layers
from vlm_jax.tasks import heads
from vlm_jax.tasks.base import Task

MEMORIES = ("vision", "vision_text")
_DUMMY_BOX = (0.25, 0.25, 0.75, 0.75)  # stands in for padding ground truth before any arithmetic


class DetectionTask(Task):
    name = "detection"
    headline_metrics = ("detection_AP50", "detection_AP")
    batch_fields = ("scene_boxes", "scene_keys", "image_id")
    eval_outputs = ("det_boxes", "det_scores", "det_labels", "det_label_probs")
    diagnostic_terms = ("giou", "num_gt", "unknown_classes")
    metric_names = ("detection_AP", "detection_AP50", "detection_AP75", "detection_AR100", "chance/detection_AP50",
                    "detection_class_AP", "detection_class_AP50")

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        if cfg.memory not in MEMORIES:
            raise ValueError(f"tasks.detection.memory must be one of {MEMORIES}, got {cfg.memory!r}")
        if cfg.matching not in matching.METHODS:
            raise ValueError(f"tasks.detection.matching must be one of {matching.METHODS}, got {cfg.matching!r}")
        width = int(cfg.width)
        self.classes = tuple(str(c) for c in cfg.classes)
        self.class_keys = tuple(caption_truth.text_key(c) for c in self.classes)
        if len(set(self.class_keys)) != len(self.classes):
            raise ValueError(f"tasks.detection.classes has duplicate names: {self.classes}")
        self.weights = dict(objectness=float(cfg.objectness), l1=float(cfg.l1), giou=float(cfg.giou),
                            class_weight=float(cfg.class_weight))
        self.alpha, self.gamma = float(cfg.focal_alpha), float(cfg.focal_gamma)
        self.aux_loss, self.matching = bool(cfg.aux_loss), str(cfg.matching)
        self.reads_patches, self.reads_text_hidden = True, cfg.memory == "vision_text"
        self.memory = detr.DetectionMemory(widths.vision, widths.text if cfg.memory == "vision_text" else None,
                                           width, rngs=rngs)
        self.decoder = detr.DetrDecoder(int(cfg.num_queries), width, int(cfg.num_layers), int(cfg.num_heads),
                                        int(cfg.mlp_dim), rngs=rngs)
        self.box_head = heads.MLPHead(width, width, 4, rngs=rngs)
        self.objectness = layers.Linear(width, 1, ("embed", None), rngs=rngs)
        self.class_head = layers.Linear(width, len(self.classes), ("embed", None), rngs=rngs) if self.classes else None

    # ---- forward -----------------------------------------------------------------------------------------------

    def __call__(self, features, batch, *, train):
        text = (features.text_hidden, features.text_mask) if self.memory.text is not None else (None, None)
        memory, mask = self.memory(features.patches, features.patch_grid, features.patch_mask, *text)
        hidden = self.decoder(memory, mask)  # [layers, B, Q, W]
        boxes = box_ops.box_cxcywh_to_xyxy(jax.nn.sigmoid(self.box_head(hidden)))  # [layers, B, Q, 4]
        objectness = self.objectness(hidden)[..., 0]  # [layers, B, Q]
        out = {"det_layer_boxes": boxes, "det_layer_objectness": objectness, "det_boxes": boxes[-1],
               "det_scores": jax.nn.sigmoid(objectness[-1])}
        if self.class_head is not None:
            logits = self.class_head(hidden)  # [layers, B, Q, C]
            probs = jax.nn.softmax(logits[-1], axis=-1)
            out.update(det_layer_class_logits=logits, det_labels=jnp.argmax(probs, -1).astype(jnp.int32),
                       det_label_probs=jnp.max(probs, -1))
        else:
            out.update(det_labels=jnp.zeros(boxes.shape[1:3], jnp.int32),
                       det_label_probs=jnp.ones(boxes.shape[1:3], jnp.float32))
        return out

    # ---- loss --------------------------------------------------------------------------------------------------

    def gt_classes(self, scene_keys):
        """int[..., G] name keys -> (int32[..., G] class index (0 where unknown), bool[..., G] known)."""
        if not self.classes:
            return jnp.zeros(scene_keys.shape, jnp.int32), jnp.ones(scene_keys.shape, bool)
        hit = scene_keys[..., None] == jnp.asarray(self.class_keys, jnp.int32)  # [..., G, C]
        return jnp.argmax(hit, -1).astype(jnp.int32), jnp.any(hit, -1)

    def loss(self, outputs, batch, valid):
        gt_valid = (batch["scene_keys"] != caption_truth.NO_KEY) & valid[:, None]  # [B, G]
        gt_boxes = jnp.where(gt_valid[..., None], batch["scene_boxes"].astype(jnp.float32), jnp.asarray(_DUMMY_BOX))
        labels, known = self.gt_classes(batch["scene_keys"])
        num_gt = jnp.maximum(jnp.sum(gt_valid), 1).astype(jnp.float32)
        layers = range(outputs["det_layer_boxes"].shape[0]) if self.aux_loss else [-1]
        total, terms = jnp.zeros((), jnp.float32), {}
        for layer in layers:
            logits = outputs["det_layer_class_logits"][layer] if self.class_head is not None else None
            terms = self.layer_loss(outputs["det_layer_boxes"][layer], outputs["det_layer_objectness"][layer],
                                    logits, gt_boxes, gt_valid, labels, known & gt_valid, valid, num_gt)
            total = total + terms["loss"]
        unknown = jnp.sum(gt_valid & ~known).astype(jnp.float32) if self.classes else jnp.zeros((), jnp.float32)
        # The last layer's parts are logged; the loss sums every layer's (aux_loss).
        return dict(terms, loss=total, num_gt=jnp.sum(gt_valid).astype(jnp.float32), unknown_classes=unknown)

    def layer_loss(self, boxes, objectness, class_logits, gt_boxes, gt_valid, labels, labelled, valid, num_gt):
        """One decoder layer's matched losses.

        boxes float[B, Q, 4] xyxy, objectness float[B, Q], class_logits float[B, Q, C] or None, gt_boxes
        float[B, G, 4], gt_valid / labelled bool[B, G], labels int[B, G], valid bool[B], num_gt float[]."""
        w = self.weights
        pred_c, gt_c = box_ops.box_xyxy_to_cxcywh(boxes), box_ops.box_xyxy_to_cxcywh(gt_boxes)
        l1_cost = jnp.sum(jnp.abs(pred_c[:, :, None] - gt_c[:, None]), -1)  # [B, Q, G]
        giou_all = box_ops.generalized_box_iou_paired(boxes[:, :, None], gt_boxes[:, None])  # [B, Q, G]
        p = jax.nn.sigmoid(objectness.astype(jnp.float32))
        # Deformable DETR's focal matching cost: the focal loss of "object" minus that of "no object".
        focal_cost = (losses.sigmoid_focal_loss(objectness, jnp.ones_like(p), self.alpha, self.gamma)
                      - losses.sigmoid_focal_loss(objectness, jnp.zeros_like(p), self.alpha, self.gamma))
        cost = w["objectness"] * focal_cost[:, :, None] + w["l1"] * l1_cost - w["giou"] * giou_all
        if class_logits is not None:
            probs = jax.nn.softmax(class_logits.astype(jnp.float32), -1)  # [B, Q, C]
            cost = cost - w["class_weight"] * jnp.take_along_axis(probs, labels[:, None, :], axis=-1)
        match = matching.hungarian_matching(cost, gt_valid, method=self.matching)  # [B, G]: query per gt
        safe = jnp.maximum(match, 0)

        def pick(x):  # [B, Q, ...] -> [B, G, ...] the matched queries' values
            return jnp.take_along_axis(x, safe.reshape(*safe.shape, *([1] * (x.ndim - 2))), axis=1)

        matched = pick(boxes)
        l1 = jnp.sum(jnp.where(gt_valid, jnp.sum(jnp.abs(pick(pred_c) - gt_c), -1), 0.0)) / num_gt
        giou = box_ops.generalized_box_iou_paired(matched, gt_boxes)  # [B, G]
        giou_loss = jnp.sum(jnp.where(gt_valid, 1.0 - giou, 0.0)) / num_gt
        is_object = jnp.any((match[:, None, :] == jnp.arange(boxes.shape[1])[None, :, None]) & gt_valid[:, None, :],
                            axis=-1)  # [B, Q]
        focal = losses.sigmoid_focal_loss(objectness, is_object, self.alpha, self.gamma)
        focal = jnp.sum(jnp.where(valid[:, None], focal, 0.0)) / num_gt
        loss = w["objectness"] * focal + w["l1"] * l1 + w["giou"] * giou_loss
        terms = {"objectness": focal, "l1": l1, "giou": losses._masked_mean(giou, gt_valid)}
        if class_logits is not None:
            ce = losses._cross_entropy(pick(class_logits).reshape(-1, class_logits.shape[-1]), labels.reshape(-1))
            terms["class"] = losses._masked_mean(ce.reshape(labels.shape), labelled)
            loss = loss + w["class_weight"] * terms["class"]
        return dict(terms, loss=loss)

    # ---- evaluation --------------------------------------------------------------------------------------------

    def images(self, collected):
        """The split's images once each (evaluation visits every (image, caption) pair): the collected rows'
        detections and ground truth, host arrays with a leading image axis."""
        _, first = np.unique(np.asarray(collected["image_id"]), return_index=True)
        take = lambda k: np.asarray(collected[k])[first]  # noqa: E731
        keys = take("scene_keys")
        return dict(image_id=take("image_id"), boxes=np.clip(take("det_boxes"), 0.0, 1.0), scores=take("det_scores"),
                    labels=take("det_labels"), label_probs=take("det_label_probs"), gt_boxes=take("scene_boxes"),
                    gt_keys=keys, gt_valid=keys != caption_truth.NO_KEY)

    def metrics(self, collected):
        im = self.images(collected)
        agnostic = detection_metrics.detection_metrics(im["boxes"], im["scores"], im["gt_boxes"], im["gt_valid"])
        out = {f"detection_{k}": float(agnostic[k]) for k in ("AP", "AP50", "AP75", "AR100")}
        out["chance/detection_AP50"] = constant_box_ap50(im["gt_boxes"], im["gt_valid"])
        if self.classes:
            labels, known = (np.asarray(x) for x in self.gt_classes(jnp.asarray(im["gt_keys"])))
            unknown = im["gt_valid"] & ~known
            if unknown.any():
                rows = np.nonzero(unknown.any(-1))[0][:5]
                raise ValueError(f"detection: objects of images {im['image_id'][rows].tolist()} have names outside "
                                 f"tasks.detection.classes ({len(self.classes)} names, e.g. {self.classes[:3]})")
            labelled = detection_metrics.detection_metrics(
                im["boxes"], im["scores"] * im["label_probs"], im["gt_boxes"], im["gt_valid"],
                pred_labels=im["labels"], gt_labels=labels, num_classes=len(self.classes))
            out["detection_class_AP"] = float(labelled["AP"])
            out["detection_class_AP50"] = float(labelled["AP50"])
        return out

    def eval_pictures(self, collected, examples):
        """One picture per image among the examples' rows: true boxes, detections with objectness >= 0.5 and their
        predicted classes."""
        from vlm_jax import eval_pictures

        im = self.images(collected)
        row_ids = np.asarray(collected["image_id"])[: len(examples.images)]
        pictures = []
        for row, image_id in enumerate(row_ids):
            if image_id in row_ids[:row]:  # the same image with its next caption
                continue
            i = int(np.nonzero(im["image_id"] == image_id)[0][0])
            keep = im["scores"][i] >= 0.5
            names = ", ".join(self.classes[c] for c in im["labels"][i][keep]) if self.classes else ""
            pictures.append(eval_pictures.boxes_picture(
                examples.images[row], names or f"{int(keep.sum())} detections (score >= 0.5)",
                im["gt_boxes"][i][im["gt_valid"][i]], im["boxes"][i][keep], "green true, magenta predicted"))
        return {"detections": eval_pictures.stack(pictures)} if pictures else {}


def constant_box_ap50(gt_boxes, gt_valid) -> float:
    """AP50 of predicting one box per image, the mean of all ground-truth boxes (in cx, cy, w, h), score 1."""
    if not gt_valid.any():
        return 0.0
    mean = np.asarray(box_ops.box_xyxy_to_cxcywh(jnp.asarray(gt_boxes[gt_valid]))).mean(0)
    box = np.asarray(box_ops.box_cxcywh_to_xyxy(jnp.asarray(mean)))
    n = len(gt_boxes)
    result = detection_metrics.detection_metrics(np.broadcast_to(box, (n, 1, 4)), np.ones((n, 1)), gt_boxes, gt_valid)
    return float(result["AP50"])
