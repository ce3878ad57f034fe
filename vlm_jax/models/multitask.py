"""Multitask heads on an InternVL backbone: contrastive retrieval (ITC), matching (ITM), box, spatial relation.

Legend: B batch, L caption tokens, Lp prompt tokens, Q image tokens per tile, Dv vision width, D LM width,
A adapter width, E embedding width, F fused width (late fusion: 4E with 'interact' features, 2E with 'concat';
lm fusion: D), P patches, N attention heads of the box head.

    image --ViT--> vision hidden [B, 1+P, Dv] --pool--> [B, Dv] --vision_adapter--> [B, A] --vision_proj--> image_emb
    text_ids --LM--> text hidden [B, L, D] --pool--> [B, D] --text_adapter--> [B, A] --text_proj--> text_emb
    fusion 'late': fused = [u, v, u*v, |u - v|] [B, 4E] (fusion_features='interact', default) or [u, v] [B, 2E]
                   ('concat', seed recipe) with u = image_emb, v = text_emb
    fusion 'lm':   prompt_ids with the image tokens (computed from the same vision hidden states) --LM-->
                   fused = hidden at the last valid prompt token [B, D]
    fused --itm_head--> [.., 2], --spatial_head--> [B, 6]     (Linear, or a 2-layer MLP when head_hidden_dim > 0)
    fused --box_head--> [B, 4] xyxy: box_head='attention' (default) attends from fused over the ViT patch tokens
                   [B, P, Dv] (`AttentionBoxHead`); 'linear' (seed recipe) is a Linear on fused.

Why the defaults differ from the seed recipe (measured in experiments/ablation.py): a linear head on [u, v] gives
logit = w1.u + w2.v + b, a sum of an image-only and a text-only score, so it cannot tell whether u and v belong
together (logit(a, a) + logit(b, b) = logit(a, b) + logit(b, a)); the products u*v make the cosine similarity a
linear function of the features. The pooled, L2-normalised embeddings keep little of where things are in the image;
the attention box head reads the patch tokens and their grid positions instead.

The vision and text hidden states are computed once per call and shared by all heads. Adapters are
Linear + ReLU + Dropout; projectors are Linear followed by L2 normalisation; the temperature is a learned log-scale.

ITM: B positive pairs plus, per image, one negative text and, per text, one negative image, drawn from the in-batch
contrastive similarities (`losses.sample_hard_negatives`; sampled in training, the hardest in evaluation), so
itm_logits is [3B, 2] with itm_labels [3B] (1 for the first B rows) and itm_valid [3B]. With 'lm' fusion the
negatives need their own fused passes: the LM runs once over 3B rows (positives, image i with the prompt of its
negative text, the prompt of text j with the image tokens of its negative image), about 3x the cost of one pass.

Box output: the box head predicts (cx, cy, w, h) with cx = sigmoid(a), w = sigmoid(c) * 2 * min(cx, 1 - cx) (same
for y), then converts to xyxy. The box always lies inside [0, 1] with x1 <= x2, without clipping (no dead gradients); at
initialisation it is the centred half-size box.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vlm_jax import box_ops, losses
from vlm_jax.models import pooling
from vlm_jax.models.internvl import InternVL

FUSIONS = ("late", "lm")
FUSION_FEATURES = ("interact", "concat")
BOX_HEADS = ("attention", "linear")

# The seed recipe's heads (linear heads on the concatenated embeddings); `cfg.update(SEED_RECIPE_HEADS)` restores it.
SEED_RECIPE_HEADS = dict(fusion_features="concat", head_hidden_dim=0, box_head="linear")


def default_heads_config() -> ml_collections.ConfigDict:
    """The `model.heads` config section. Widths of the backbone come from its own config, not from here."""
    return ml_collections.ConfigDict(dict(
        adapter_dim=256,          # A: adapters Dv -> A and D -> A
        embed_dim=256,            # E: projectors A -> E
        dropout=0.1,              # after the adapters' ReLU
        vision_pool="cls",        # cls | mean | map
        text_pool="last",         # last | mean | first (seed recipe: first)
        fusion="late",            # late | lm
        fusion_features="interact",  # late fusion: interact [u, v, u*v, |u-v|] | concat [u, v] (seed recipe)
        head_hidden_dim=256,      # ITM / spatial heads: 0 = Linear (seed recipe), else Linear-GELU-Linear
        box_head="attention",     # attention (over the ViT patch tokens) | linear (on fused; seed recipe)
        box_num_heads=4,          # attention heads of the attention box head
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


def late_fusion_features(image_emb, text_emb, kind: str):
    """float[N, E] x float[N, E] -> float32[N, 4E] ('interact': [u, v, u*v, |u-v|]) or [N, 2E] ('concat')."""
    if kind == "concat":
        return jnp.concatenate([image_emb, text_emb], axis=-1)
    if kind == "interact":
        return jnp.concatenate([image_emb, text_emb, image_emb * text_emb, jnp.abs(image_emb - text_emb)], axis=-1)
    raise ValueError(f"fusion_features must be one of {FUSION_FEATURES}, got {kind!r}")


class MLPHead(nnx.Module):
    """Linear -> GELU -> Linear: float[N, in] -> float32[N, out].

    The output layer's parameters are `kernel` [hidden, out] and `bias` [out] on the head itself, so the paths
    itm_head/kernel, itm_head/bias (etc.) of the seed recipe's linear heads exist with either head; the hidden layer
    is `hidden` (hidden/kernel, hidden/bias).
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (hidden, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x):
        return jax.nn.gelu(self.hidden(x.astype(jnp.float32))) @ self.kernel[...] + self.bias[...]


def make_head(in_features: int, hidden: int, out_features: int, *, rngs: nnx.Rngs):
    """nnx.Linear when hidden == 0 (seed recipe; parameter paths head/kernel, head/bias), else an MLPHead."""
    if hidden == 0:
        return nnx.Linear(in_features, out_features, rngs=rngs)
    return MLPHead(in_features, hidden, out_features, rngs=rngs)


def patch_grid(height: int, width: int):
    """float32[h * w, 2] (x, y) centres of a row-major h x w grid of patches in normalised image coordinates."""
    ys, xs = jnp.meshgrid((jnp.arange(height) + 0.5) / height, (jnp.arange(width) + 0.5) / width, indexing="ij")
    return jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


class AttentionBoxHead(MLPHead):
    """Box from a query (the fused feature) attending over the ViT patch tokens.

    Each of N heads forms a softmax over the P patches (logits = q_n . x_p, x = the patch tokens
    normalised without parameters); its weighted mean and standard deviation of the patch centres (where the attended
    object is and how far it extends) and its weighted sum of the patch tokens, with the query itself, go through an
    MLP to the 4 box logits (`box_from_logits`). The centre logits are added to the logit of head 0's attended
    position, so the box follows where head 0 looks from the first step and the MLP learns corrections and the size
    (measured on a toy localisation task: IoU 0.43 on each of 4 initialisations vs 0.06 to 0.39 without the prior).

    Key and value projections are left out on purpose: q . (W_k x) = (W_k^T q) . x, so a key projection folds into
    the query projection, and a value projection into the MLP's first layer. The head then costs O(B N P Dv) instead
    of O(B P Dv^2), and with a frozen backbone no gradient flows into the patch tokens at all.

    float[B, F] query, float[B, P, Dv] patch tokens, float32[P, 2] patch centres (`patch_grid`) -> float32[B, 4].
    Attributes: query (F -> N Dv), and the MLP's hidden (over F + N Dv + 4 N features), kernel, bias (`MLPHead`).
    """

    def __init__(self, query_features: int, width: int, num_heads: int, hidden: int, *, rngs: nnx.Rngs):
        if num_heads < 1:
            raise ValueError(f"box head: box_num_heads must be >= 1, got {num_heads}")
        super().__init__(query_features + num_heads * width + 4 * num_heads, hidden, 4, rngs=rngs)
        self.num_heads = num_heads
        self.query = nnx.Linear(query_features, num_heads * width, rngs=rngs)

    def attention(self, query, patches):
        """float[B, F], float[B, P, Dv] -> (float32[B, N, P] attention weights, float32[B, N, Dv] pooled tokens)."""
        b, _, dv = patches.shape
        x = patches.astype(jnp.float32)
        x = (x - jnp.mean(x, -1, keepdims=True)) * jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + 1e-6)
        q = self.query(query.astype(jnp.float32)).reshape(b, self.num_heads, dv)  # [B, N, Dv]
        weights = jax.nn.softmax(jnp.einsum("BND,BPD->BNP", q, x), axis=-1)
        return weights, jnp.einsum("BNP,BPD->BND", weights, x)

    def __call__(self, query, patches, grid):
        weights, pooled = self.attention(query, patches)
        mean = jnp.einsum("BNP,PC->BNC", weights, grid)  # [B, N, 2]
        var = jnp.einsum("BNP,PC->BNC", weights, grid * grid) - mean * mean
        std = jnp.sqrt(jnp.maximum(var, 0.0) + 1e-6)  # eps: finite gradient when one patch takes all the weight
        b = query.shape[0]
        feats = [query.astype(jnp.float32), pooled.reshape(b, -1), mean.reshape(b, -1), std.reshape(b, -1)]
        raw = super().__call__(jnp.concatenate(feats, axis=-1))
        # Centre prior: head 0's attended position (a soft-argmax), as a logit of box_from_logits' sigmoid.
        centre = jnp.clip(mean[:, 0], 1e-3, 1.0 - 1e-3)  # [B, 2]
        prior = jnp.concatenate([jnp.log(centre) - jnp.log1p(-centre), jnp.zeros_like(centre)], axis=-1)
        return raw + prior


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
        if cfg.fusion_features not in FUSION_FEATURES:
            raise ValueError(f"fusion_features must be one of {FUSION_FEATURES}, got {cfg.fusion_features!r}")
        if cfg.box_head not in BOX_HEADS:
            raise ValueError(f"box_head must be one of {BOX_HEADS}, got {cfg.box_head!r}")
        if cfg.head_hidden_dim < 0:
            raise ValueError(f"head_hidden_dim must be >= 0 (0 = linear heads), got {cfg.head_hidden_dim}")
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
        if cfg.fusion == "late":
            fused = (4 if cfg.fusion_features == "interact" else 2) * e
        else:
            fused = text_width
        hidden = cfg.head_hidden_dim
        self.itm_head = make_head(fused, hidden, 2, rngs=rngs)
        if cfg.box_head == "attention":
            self.box_head = AttentionBoxHead(fused, vision_width, cfg.box_num_heads, hidden or vision_width,
                                             rngs=rngs)
        else:
            self.box_head = nnx.Linear(fused, 4, rngs=rngs)
        self.spatial_head = make_head(fused, hidden, cfg.num_relations, rngs=rngs)
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
            fused_all = late_fusion_features(image_emb[pair_image], text_emb[pair_text],
                                             self.config.fusion_features)  # [3B, F]
        else:
            tokens = self.backbone.image_embeddings_from_hidden(vision_hidden, image.shape[1:3])  # [B, Q, D]
            prompt_ids, prompt_mask = batch["prompt_ids"][pair_text], batch["prompt_mask"][pair_text]
            embeds = self.backbone.merge_image_embeddings(prompt_ids, tokens[pair_image])  # [3B, Lp, D]
            hidden, _ = self.backbone.language_model(inputs_embeds=embeds, attention_mask=prompt_mask)
            fused_all = pooling.gather_positions(hidden, pooling.last_valid_index(prompt_mask))
            fused_all = fused_all.astype(jnp.float32)  # [3B, D]
        fused = fused_all[:b]
        if self.config.box_head == "attention":
            patch = self.backbone.config.vision.patch_size
            grid = patch_grid(image.shape[1] // patch, image.shape[2] // patch)  # [P, 2]
            box_logits = self.box_head(fused, vision_hidden[:, 1:], grid)
        else:
            box_logits = self.box_head(fused)

        labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
        valid = jnp.concatenate([jnp.ones(b, bool), neg["neg_text_valid"], neg["neg_image_valid"]])
        return {
            "image_emb": image_emb,
            "text_emb": text_emb,
            "logit_scale": scale,
            "itm_logits": self.itm_head(fused_all),
            "itm_labels": labels,
            "itm_valid": valid,
            "box_pred": box_from_logits(box_logits),
            "spatial_logits": self.spatial_head(fused),
            "fused": fused,
            "itm_pairs": jnp.stack([pair_image, pair_text], axis=-1).astype(jnp.int32),
        }
