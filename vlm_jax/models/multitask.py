"""Multitask heads on an InternVL backbone: contrastive retrieval (ITC), matching (ITM), box, spatial relation.

Legend: B batch, L caption tokens, Lp prompt tokens, Q image tokens per tile, Dv vision width, D LM width,
A adapter width, E embedding width, F fused width (2E for late fusion, D for lm fusion).

    image --ViT--> vision hidden [B, 1+P, Dv] --pool--> [B, Dv] --vision_adapter--> [B, A] --vision_proj--> image_emb
    text_ids --LM--> text hidden [B, L, D] --pool--> [B, D] --text_adapter--> [B, A] --text_proj--> text_emb
    fusion 'late': fused = concat(image_emb, text_emb) [B, 2E]
    fusion 'lm':   prompt_ids with the image tokens (computed from the same vision hidden states) --LM-->
                   fused = hidden at the last valid prompt token [B, D]
    fused --itm_head--> [.., 2], --box_head--> [B, 4] xyxy, --spatial_head--> [B, 6]

The vision and text hidden states are computed once per call and shared by all heads. Adapters are
Linear + ReLU + Dropout; projectors are Linear followed by L2 normalisation; the temperature is a learned log-scale.

ITM: B positive pairs plus, per image, one negative text and, per text, one negative image, drawn from the in-batch
contrastive similarities (`losses.sample_hard_negatives`; sampled in training, the hardest in evaluation), so
itm_logits is [3B, 2] with itm_labels [3B] (1 for the first B rows) and itm_valid [3B]. With 'lm' fusion the
negatives need their own fused passes: the LM runs once over 3B rows (positives, image i with the prompt of its
negative text, the prompt of text j with the image tokens of its negative image), about 3x the cost of one pass.

Box head: predicts (cx, cy, w, h) with cx = sigmoid(a), w = sigmoid(c) * 2 * min(cx, 1 - cx) (same for y), then
converts to xyxy. The box always lies inside [0, 1] with x1 <= x2, without clipping (no dead gradients); at
initialisation it is the centred half-size box.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vlm_jax import box_ops, losses
from vlm_jax.models import pooling
from vlm_jax.models.internvl import InternVL, pixel_shuffle

FUSIONS = ("late", "lm")


def default_heads_config() -> ml_collections.ConfigDict:
    """The `model.heads` config section. Widths of the backbone come from its own config, not from here."""
    return ml_collections.ConfigDict(dict(
        adapter_dim=256,          # A: adapters Dv -> A and D -> A
        embed_dim=256,            # E: projectors A -> E
        dropout=0.1,              # after the adapters' ReLU
        vision_pool="cls",        # cls | mean | map
        text_pool="last",         # last | mean | first (seed recipe: first)
        fusion="late",            # late | lm
        map_num_heads=8,          # attention pooling heads (vision_pool='map')
        logit_scale_init=1 / 0.07,
        logit_scale_max=100.0,
        num_relations=6,          # left, right, above, below, inside, outside
    ))


class Adapter(nnx.Module):
    """Linear + ReLU + Dropout: float[B, in] -> float32[B, out]."""

    def __init__(self, in_features: int, out_features: int, dropout: float, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, out_features, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=_stream(rngs, "dropout"))

    def __call__(self, x, *, train: bool):
        return self.dropout(jax.nn.relu(self.linear(x.astype(jnp.float32))), deterministic=not train)


class Projector(nnx.Module):
    """Linear + L2 normalisation: float[B, A] -> float32[B, E] with unit rows."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, out_features, rngs=rngs)

    def __call__(self, x):
        return losses.l2_normalize(self.linear(x))


def box_from_logits(raw):
    """float[..., 4] unconstrained -> float[..., 4] xyxy inside [0, 1] with x1 <= x2, y1 <= y2 (see module doc)."""
    centre = jax.nn.sigmoid(raw[..., :2])
    size = jax.nn.sigmoid(raw[..., 2:]) * 2.0 * jnp.minimum(centre, 1.0 - centre)
    return box_ops.box_cxcywh_to_xyxy(jnp.concatenate([centre, size], axis=-1))


def _stream(rngs: nnx.Rngs, name: str):
    """The named rng stream, else 'default' (nnx.Rngs(0) has only 'default')."""
    if name in rngs:
        return rngs[name]
    if "default" in rngs:
        return rngs["default"]
    raise ValueError(f"rngs: need a {name!r} or 'default' stream, got {[k for k, _ in rngs.items()]}")


class MultitaskModel(nnx.Module):
    """InternVL backbone + adapters, projectors, temperature and ITM / box / spatial heads."""

    def __init__(self, backbone: InternVL, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        cfg = default_heads_config()
        unknown = sorted(set(config.keys()) - set(cfg.keys()))
        if unknown:
            raise ValueError(f"heads config: unknown keys {unknown}; expected a subset of {sorted(cfg.keys())}")
        cfg.update(config)
        pooling.check_pooling(cfg.vision_pool, cfg.text_pool)
        if cfg.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {cfg.fusion!r}")
        if cfg.logit_scale_init <= 0 or cfg.logit_scale_max < cfg.logit_scale_init:
            raise ValueError(f"logit_scale_init must lie in (0, logit_scale_max], got {cfg.logit_scale_init} and "
                             f"max {cfg.logit_scale_max}")
        self.config = ml_collections.FrozenConfigDict(cfg)
        self.backbone = backbone
        vision_width = backbone.config.vision.hidden_size
        text_width = backbone.config.text.hidden_size
        a, e = cfg.adapter_dim, cfg.embed_dim
        self.vision_pool = (pooling.MAPHead(vision_width, cfg.map_num_heads, rngs=rngs)
                            if cfg.vision_pool == "map" else None)
        self.vision_adapter = Adapter(vision_width, a, cfg.dropout, rngs=rngs)
        self.text_adapter = Adapter(text_width, a, cfg.dropout, rngs=rngs)
        self.vision_proj = Projector(a, e, rngs=rngs)
        self.text_proj = Projector(a, e, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.log(jnp.float32(cfg.logit_scale_init)))
        fused = 2 * e if cfg.fusion == "late" else text_width
        self.itm_head = nnx.Linear(fused, 2, rngs=rngs)
        self.box_head = nnx.Linear(fused, 4, rngs=rngs)
        self.spatial_head = nnx.Linear(fused, cfg.num_relations, rngs=rngs)
        self.sample_rng = _stream(rngs, "itm").fork()

    # ---- towers ------------------------------------------------------------------------------------------------

    def scale(self):
        """float32[]: exp(log-scale), clipped to logit_scale_max."""
        return jnp.exp(jnp.minimum(self.logit_scale[...], jnp.log(self.config.logit_scale_max)))

    def _image_branch(self, vision_hidden, train: bool):
        """float[B, 1+P, Dv] -> float32[B, E]."""
        pooled = pooling.pool_vision(vision_hidden, self.config.vision_pool, self.vision_pool)
        return self.vision_proj(self.vision_adapter(pooled, train=train))

    def _text_branch(self, text_hidden, mask, train: bool):
        """float[B, L, D], int[B, L] -> float32[B, E]."""
        pooled = pooling.pool_text(text_hidden, mask, self.config.text_pool)
        return self.text_proj(self.text_adapter(pooled, train=train))

    def encode_image(self, image):
        """float[B, S, S, 3] -> float32[B, E] unit-norm image embeddings (eval mode)."""
        return self._image_branch(self.backbone.vision_hidden_states(image), train=False)

    def encode_text(self, ids, mask):
        """int[B, L], int[B, L] -> float32[B, E] unit-norm text embeddings (eval mode)."""
        hidden, _ = self.backbone.language_model(input_ids=ids, attention_mask=mask)
        return self._text_branch(hidden, mask, train=False)

    def _image_tokens(self, vision_hidden, image_hw):
        """The backbone's image embeddings from already computed ViT states: float[B, 1+P, Dv] -> float[B, Q, D]."""
        h = vision_hidden[:, 1:]
        patch = self.backbone.config.vision.patch_size
        n, _, c = h.shape
        x = pixel_shuffle(h.reshape(n, image_hw[0] // patch, image_hw[1] // patch, c),
                          self.backbone.config.shuffle_factor)
        return self.backbone.multi_modal_projector(x.reshape(n, -1, x.shape[-1]))

    # ---- forward -----------------------------------------------------------------------------------------------

    def __call__(self, batch: dict, *, train: bool) -> dict:
        """Run every head on a batch (keys of the data contract; 'prompt_ids'/'prompt_mask' needed for 'lm').

        Returns dict: image_emb, text_emb float32[B, E]; logit_scale float32[]; itm_logits float32[3B, 2],
        itm_labels int32[3B], itm_valid bool[3B]; box_pred float32[B, 4] (xyxy in [0, 1]);
        spatial_logits float32[B, C]; fused float32[B, F]; itm_pairs int32[3B, 2] (image row, text row) of each
        ITM pair.
        """
        image = batch["image"]
        b = image.shape[0]
        vision_hidden = self.backbone.vision_hidden_states(image)  # [B, 1+P, Dv], shared
        text_hidden, _ = self.backbone.language_model(input_ids=batch["text_ids"], attention_mask=batch["text_mask"])
        image_emb = self._image_branch(vision_hidden, train)
        text_emb = self._text_branch(text_hidden, batch["text_mask"], train)
        scale = self.scale()

        sim = losses.contrastive_logits(image_emb, text_emb, scale)  # [B, B]
        rng = self.sample_rng() if train else None
        neg = losses.sample_hard_negatives(sim, batch.get("image_id"), rng, batch.get("valid"))
        # Pair order: positives (i, i); (image i, its negative text); (negative image of text j, text j).
        pair_image = jnp.concatenate([jnp.arange(b), jnp.arange(b), neg["neg_image"]])  # [3B]
        pair_text = jnp.concatenate([jnp.arange(b), neg["neg_text"], jnp.arange(b)])  # [3B]

        if self.config.fusion == "late":
            fused_all = jnp.concatenate([image_emb[pair_image], text_emb[pair_text]], axis=-1)  # [3B, 2E]
        else:
            tokens = self._image_tokens(vision_hidden, image.shape[1:3])  # [B, Q, D]
            prompt_ids, prompt_mask = batch["prompt_ids"][pair_text], batch["prompt_mask"][pair_text]
            embeds = self.backbone.merge_image_embeddings(prompt_ids, tokens[pair_image])  # [3B, Lp, D]
            hidden, _ = self.backbone.language_model(inputs_embeds=embeds, attention_mask=prompt_mask)
            fused_all = pooling.gather_positions(hidden, pooling.last_valid_index(prompt_mask))
            fused_all = fused_all.astype(jnp.float32)  # [3B, D]
        fused = fused_all[:b]

        labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
        valid = jnp.concatenate([jnp.ones(b, bool), neg["neg_text_valid"], neg["neg_image_valid"]])
        return {
            "image_emb": image_emb,
            "text_emb": text_emb,
            "logit_scale": scale,
            "itm_logits": self.itm_head(fused_all),
            "itm_labels": labels,
            "itm_valid": valid,
            "box_pred": box_from_logits(self.box_head(fused)),
            "spatial_logits": self.spatial_head(fused),
            "fused": fused,
            "itm_pairs": jnp.stack([pair_image, pair_text], axis=-1).astype(jnp.int32),
        }
