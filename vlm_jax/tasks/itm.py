"""Image-text matching (ITM): a head over fused pair features tells matching pairs from in-batch hard negatives.

Pairs: the B positives (image i, caption i), then per image one negative caption and per caption one negative image,
drawn from the in-batch contrastive similarities (`sample_hard_negatives`: sampled in training, the hardest in
evaluation), so itm_logits is float32[3B, 2] with itm_labels int32[3B] (1 for the first B rows), itm_valid bool[3B] (False where no negative exists)
and itm_pairs int32[3B, 2] (image row, caption row). With 'lm' fusion each negative pair needs its own pass of the
language model (2B more rows).
Config (`config.tasks.itm`): weight; hidden_dim (0 = a linear head, the seed recipe; else Linear-GELU-Linear).
"""

import jax
import jax.numpy as jnp

from vlm_jax import losses
from vlm_jax.tasks import heads
from vlm_jax.tasks.base import Task


def sample_hard_negatives(sim, image_ids=None, rng=None, valid=None):
    """In-batch hard negatives for ITM, ALBEF/BLIP style.

    For each image i, one negative text j with probability softmax_j(sim[i, j]) over texts of *other* images; for
    each text j, one negative image likewise from softmax_i(sim[i, j]). Pairs showing the same image (the positive
    and other captions of that image) are never drawn. With `rng=None` the hardest negative (argmax) is taken:
    deterministic, for evaluation.

    Args:
      sim: float[B, B] image-text similarities (gradients are stopped here).
      image_ids: optional int[B]; None = every row is a different image.
      rng: PRNG key or None.
      valid: optional bool[B]; padding rows (False) are never drawn and get no negative.
    Returns:
      dict of int32[B] "neg_text" (for image i), "neg_image" (for text j) and bool[B] "neg_text_valid",
      "neg_image_valid" (False when no other valid pair shows another image, or the row itself is padding; the
      index is then the row itself).
    """
    batch = sim.shape[0]
    sim = jax.lax.stop_gradient(sim).astype(jnp.float32)
    valid = jnp.ones(batch, bool) if valid is None else valid.astype(bool)
    allowed = ~losses.same_image(image_ids, batch) & valid[:, None] & valid[None, :]  # [B, B]
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


class MatchingTask(Task):
    name = "itm"
    diagnostic_terms = ("acc",)
    headline_metrics = ("itm_acc",)
    batch_fields = ("image_id",)

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        self.head = heads.make_head(widths.fused, int(cfg.hidden_dim), 2, rngs=rngs)

    def __call__(self, features, batch, *, train):
        b = features.image_emb.shape[0]
        rows = jnp.arange(b)
        sim = losses.contrastive_logits(features.image_emb, features.text_emb, features.logit_scale)  # [B, B]
        neg = sample_hard_negatives(sim, features.image_id, features.rng, features.valid)
        # Pair order: positives (i, i); (image i, its negative caption); (negative image of caption j, caption j).
        pair_image = jnp.concatenate([rows, rows, neg["neg_image"]])  # [3B]
        pair_text = jnp.concatenate([rows, neg["neg_text"], rows])  # [3B]
        fused = jnp.concatenate([features.fused, features.fuse(pair_image[b:], pair_text[b:])])  # [3B, F]
        found = jnp.concatenate([jnp.ones(b, bool), neg["neg_text_valid"], neg["neg_image_valid"]])
        return {
            "itm_logits": self.head(fused),
            "itm_labels": jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)]),
            "itm_valid": found,
            "itm_pairs": jnp.stack([pair_image, pair_text], axis=-1).astype(jnp.int32),
        }

    def loss(self, outputs, batch, valid):
        pairs = outputs["itm_pairs"]  # a pair counts only if both its rows are real (not evaluation padding)
        pair_valid = outputs["itm_valid"] & valid[pairs[:, 0]] & valid[pairs[:, 1]]
        return losses.itm_loss(outputs["itm_logits"], outputs["itm_labels"], pair_valid)
