"""Image-text contrastive retrieval (ITC): symmetric InfoNCE over the batch, recall@K over a split.

Owns no head: it trains the shared embeddings (`Features.image_emb`, `text_emb`, `logit_scale`).
Config (`config.tasks.itc`): weight; matryoshka (weight of the mean loss over the nested widths `matryoshka_dims`,
0 = off).
Negatives: only pairs whose caption is false for the image (`Features.negatives`, `vlm_jax.caption_truth`) are in
the InfoNCE denominators; other captions of the same image, captions with the same text and captions true of the
image by its scene are left out instead of being pushed away.
Evaluation: captions of the same image share an `image_id`; images are deduplicated by id and every caption counts
as a positive of its image (the multi-caption COCO protocol: `t2i_r1`, ...). Because a caption can be true of other
images too, `t2i_r1_true` / `i2t_r1_true` count a hit on any image the caption is true of, and `ceiling/t2i_r1`,
`ceiling/i2t_r1` are the best expected R@1 of the strict protocol (an oracle that knows which images each caption is
true of: `metrics.retrieval_ceilings`). Chance levels are reported as `chance/...`.
"""

import numpy as np

from vlm_jax import caption_truth, losses, metrics
from vlm_jax.models.pooling import l2_normalize
from vlm_jax.tasks.base import Task


class ContrastiveTask(Task):
    name = "itc"
    diagnostic_terms = ("logit_scale",)
    headline_metrics = ("t2i_r1", "i2t_r1")
    batch_fields = ("image_id", *caption_truth.CAPTION_FIELDS, *caption_truth.SCENE_FIELDS)
    eval_outputs = ("image_emb", "text_emb")
    last_value_terms = ("logit_scale",)
    metric_names = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_r1_true", "i2t_r1_true",
                    "chance/i2t_r1", "chance/t2i_r1", "ceiling/t2i_r1", "ceiling/i2t_r1", "num_images", "num_texts")

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        self.matryoshka = float(cfg.matryoshka)
        self.matryoshka_dims = tuple(int(d) for d in cfg.matryoshka_dims)
        if self.matryoshka and any(d <= 0 or d > widths.embed for d in self.matryoshka_dims):
            raise ValueError(f"tasks.itc.matryoshka_dims: expected widths in (0, {widths.embed}] (the embedding "
                             f"width), got {self.matryoshka_dims}")

    def __call__(self, features, batch, *, train):
        return {"image_emb": features.image_emb, "text_emb": features.text_emb, "logit_scale": features.logit_scale,
                "itc_negatives": features.negatives}

    def loss(self, outputs, batch, valid):
        args = (outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"], batch.get("image_id"), valid,
                outputs.get("itc_negatives"))
        itc = losses.contrastive_loss(*args)
        terms = {"loss": itc["loss"], "i2t": itc["i2t"], "t2i": itc["t2i"], "logit_scale": outputs["logit_scale"]}
        if self.matryoshka:
            mrl = losses.matryoshka_contrastive_loss(*args[:3], self.matryoshka_dims, *args[3:])
            terms["loss"] = itc["loss"] + self.matryoshka * mrl.pop("loss")
            terms["contrastive"] = itc["loss"]
            terms.update({f"matryoshka_{k}": v for k, v in mrl.items()})
        return terms

    @staticmethod
    def similarity(collected):
        """(float[I, T] image-caption cosine similarities over the split's distinct images, int[I] their ids,
        int[T] each caption's image row)."""
        ids, first, text_to_image = np.unique(collected["image_id"], return_index=True, return_inverse=True)
        image_emb = np.asarray(l2_normalize(collected["image_emb"][first]))
        return image_emb @ np.asarray(l2_normalize(collected["text_emb"])).T, ids, text_to_image

    def metrics(self, collected):
        sim, _, text_to_image = self.similarity(collected)
        out = {k.replace("@", "_r"): v for k, v in metrics.retrieval_recall(sim, text_to_image).items()}
        true_pairs = caption_truth.split_truth(collected)[0] == caption_truth.TRUE
        recall_true = metrics.retrieval_recall_true(sim, true_pairs, ks=(1,))
        out["t2i_r1_true"], out["i2t_r1_true"] = recall_true["t2i@1"], recall_true["i2t@1"]
        ceilings = metrics.retrieval_ceilings(true_pairs, text_to_image)
        out["ceiling/t2i_r1"], out["ceiling/i2t_r1"] = ceilings["t2i@1"], ceilings["i2t@1"]
        num_images, num_texts = sim.shape
        out["chance/i2t_r1"] = float(np.mean(np.bincount(text_to_image) / num_texts))
        out["chance/t2i_r1"] = 1.0 / num_images
        out["num_images"], out["num_texts"] = float(num_images), float(num_texts)
        return out

    def eval_pictures(self, collected, examples):
        from vlm_jax import eval_pictures

        sim, ids, _ = self.similarity(collected)
        return {"retrieved_captions": eval_pictures.retrieval_text(sim, ids, collected["image_id"], examples.captions)}
