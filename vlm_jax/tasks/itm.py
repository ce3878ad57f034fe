"""Image-text matching (ITM): a head over fused pair features tells matching pairs from in-batch hard negatives.

Pairs: the B positives (image i, caption i), then per image one negative caption and per caption one negative image,
drawn from the in-batch contrastive similarities among the *true* negatives only (`Features.negatives`: a caption
of another image that is true of this one is never a negative; `sample_hard_negatives`: sampled in training, the
hardest in evaluation), so itm_logits is float32[3B, 2] with itm_labels int32[3B] (1 for the first B rows),
itm_valid bool[3B] (False where no negative exists) and itm_pairs int32[3B, 2] (image row, caption row). With 'lm'
fusion each negative pair needs its own pass of the language model (2B more rows).

Evaluation separates the head from the embeddings: per row the matching score (logit(match) - logit(no match)) of
the positive, of the hardest true negatives (most similar by the embeddings) and of random true negatives of the
eval batch (`itm_scores` float32[B, 5], `itm_found` bool[B, 5]). Metrics: balanced accuracy and ROC AUC against
random negatives (`itm_acc`, `itm_auc`: how well the head matches) and against hard negatives (`itm_acc_hard`,
`itm_auc_hard`: the pairs the embeddings confuse); chance is 0.5 for all four.
Config (`config.tasks.itm`): weight; hidden_dim (0 = a linear head, the seed recipe; else Linear-GELU-Linear).
"""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import losses, metrics
from vlm_jax.tasks import heads
from vlm_jax.tasks.base import Task


def sample_hard_negatives(sim, image_ids=None, rng=None, valid=None, negatives=None):
    """In-batch hard negatives for ITM, ALBEF/BLIP style, drawn only among true negatives.

    For each image i, one negative text j with probability softmax_j(sim[i, j]) over the texts that are false for
    it; for each text j, one negative image likewise from softmax_i(sim[i, j]). With `rng=None` the hardest negative
    (argmax) is taken: deterministic, for evaluation. With `sim` constant the draw is uniform (random negatives).

    Args:
      sim: float[B, B] image-text similarities (gradients are stopped here).
      image_ids: optional int[B]; without `negatives`, pairs showing the same image are the only non-negatives
        (None = every row is a different image).
      rng: PRNG key or None.
      valid: optional bool[B]; padding rows (False) are never drawn and get no negative.
      negatives: optional bool[B, B], True where caption j is false for image i (`Features.negatives`).
    Returns:
      dict of int32[B] "neg_text" (for image i), "neg_image" (for text j) and bool[B] "neg_text_valid",
      "neg_image_valid" (False when the row has no true negative in the batch, or is padding; the index is then the
      row itself).
    """
    batch = sim.shape[0]
    sim = jax.lax.stop_gradient(sim).astype(jnp.float32)
    valid = jnp.ones(batch, bool) if valid is None else valid.astype(bool)
    candidates = ~losses.same_image(image_ids, batch) if negatives is None else negatives.astype(bool)
    allowed = candidates & valid[:, None] & valid[None, :]  # [B, B]
    logits_i2t = jnp.where(allowed, sim, -jnp.inf)
    logits_t2i = jnp.where(allowed, sim, -jnp.inf).T  # row = text
    if rng is None:
        neg_text = jnp.argmax(logits_i2t, axis=1)
        neg_image = jnp.argmax(logits_t2i, axis=1)
    else:
        rng_t, rng_i = jax.random.split(rng)
        neg_text = jax.random.categorical(rng_t, logits_i2t, axis=1)
        neg_image = jax.random.categorical(rng_i, logits_t2i, axis=1)
    valid_t = jnp.any(allowed, axis=1)
    valid_i = jnp.any(allowed, axis=0)
    own = jnp.arange(batch)
    return {
        "neg_text": jnp.where(valid_t, neg_text, own).astype(jnp.int32),
        "neg_image": jnp.where(valid_i, neg_image, own).astype(jnp.int32),
        "neg_text_valid": valid_t,
        "neg_image_valid": valid_i,
    }


# Evaluation's random negatives: a fixed key, so every evaluation of the same model scores the same pairs.
_EVAL_RANDOM_KEY = 17


class MatchingTask(Task):
    name = "itm"
    diagnostic_terms = ("acc",)
    headline_metrics = ("itm_acc", "itm_acc_hard")
    batch_fields = ("image_id",)
    eval_outputs = ("itm_scores", "itm_found")
    metric_names = ("itm_acc", "itm_auc", "itm_acc_hard", "itm_auc_hard", "chance/itm_acc")

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        self.head = heads.make_head(widths.fused, int(cfg.hidden_dim), 2, rngs=rngs)

    def __call__(self, features, batch, *, train):
        b = features.image_emb.shape[0]
        rows = jnp.arange(b)
        sim = losses.contrastive_logits(features.image_emb, features.text_emb, features.logit_scale)  # [B, B]
        neg = sample_hard_negatives(sim, features.image_id, features.rng, features.valid, features.negatives)
        # Pair order: positives (i, i); (image i, its negative caption); (negative image of caption j, caption j).
        pair_image = jnp.concatenate([rows, rows, neg["neg_image"]])  # [3B]
        pair_text = jnp.concatenate([rows, neg["neg_text"], rows])  # [3B]
        fused = jnp.concatenate([features.fused, features.fuse(pair_image[b:], pair_text[b:])])  # [3B, F]
        found = jnp.concatenate([jnp.ones(b, bool), neg["neg_text_valid"], neg["neg_image_valid"]])
        logits = self.head(fused)
        out = {
            "itm_logits": logits,
            "itm_labels": jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)]),
            "itm_valid": found,
            "itm_pairs": jnp.stack([pair_image, pair_text], axis=-1).astype(jnp.int32),
        }
        if not train:  # + random true negatives, for the evaluation's two views
            rand = sample_hard_negatives(jnp.zeros_like(sim), features.image_id, jax.random.key(_EVAL_RANDOM_KEY),
                                         features.valid, features.negatives)
            rand_logits = self.head(features.fuse(jnp.concatenate([rows, rand["neg_image"]]),
                                                  jnp.concatenate([rand["neg_text"], rows])))  # [2B, 2]
            scores = jnp.concatenate([logits, rand_logits])
            scores = (scores[:, 1] - scores[:, 0]).reshape(5, b).T  # [B, 5]: pos, hard text/image, random text/image
            out["itm_scores"] = scores
            out["itm_found"] = jnp.stack([*found.reshape(3, b), rand["neg_text_valid"], rand["neg_image_valid"]], -1)
        return out

    def loss(self, outputs, batch, valid):
        pairs = outputs["itm_pairs"]  # a pair counts only if both its rows are real (not evaluation padding)
        pair_valid = outputs["itm_valid"] & valid[pairs[:, 0]] & valid[pairs[:, 1]]
        return losses.itm_loss(outputs["itm_logits"], outputs["itm_labels"], pair_valid)

    def metrics(self, collected):
        scores, found = np.asarray(collected["itm_scores"]), np.asarray(collected["itm_found"], bool)
        hard = metrics.matching_metrics(scores[:, 0], scores[:, 1:3][found[:, 1:3]])
        rand = metrics.matching_metrics(scores[:, 0], scores[:, 3:5][found[:, 3:5]])
        return {"itm_acc": rand["acc"], "itm_auc": rand["auc"], "itm_acc_hard": hard["acc"],
                "itm_auc_hard": hard["auc"], "chance/itm_acc": 0.5}
