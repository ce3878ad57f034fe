"""The multitask model: an InternVL backbone, shared embedding layers and the configured tasks (`vlm_jax.tasks`).

Legend: B batch, L caption tokens, Lp prompt tokens, Q image tokens per tile, Dv vision width, D LM width,
A adapter width, E embedding width, F fused width (late fusion: 4E with 'interact' features, 2E with 'concat';
lm fusion: D), P patches.

    image --ViT--> vision hidden [B, 1+P, Dv] --pool--> [B, Dv] --vision_adapter--> [B, A] --vision_proj--> image_emb
    text_ids --LM--> text hidden [B, L, D] --pool--> [B, D] --text_adapter--> [B, A] --text_proj--> text_emb
    fusion 'late': fused = [u, v, u*v, |u - v|] [B, 4E] (fusion_features='interact', default) or [u, v] [B, 2E]
                   ('concat', seed recipe) with u = image_emb, v = text_emb
    fusion 'lm':   prompt_ids with the image tokens (computed from the same vision hidden states) --LM-->
                   fused = hidden at the last valid prompt token [B, D]
    Features(vision hidden, patch grid, embeddings, fused, ...) --> each task --> its outputs; loss = sum over tasks
    of weight * task loss.

Why the defaults differ from the seed recipe (measured in experiments/ablation.py): a linear head on [u, v] gives
logit = w1.u + w2.v + b, a sum of an image-only and a text-only score, so it cannot tell whether u and v belong
together (logit(a, a) + logit(b, b) = logit(a, b) + logit(b, a)); the products u*v make the cosine similarity a
linear function of the features.

The vision and text hidden states are computed once per call and shared by all tasks. Adapters are
Linear + ReLU + Dropout; projectors are Linear followed by L2 normalisation; the temperature is a learned log-scale.
Config: `config.model.embedding` (the shared layers) and `config.tasks` (one section per task).
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vlm_jax import caption_truth, lora
from vlm_jax import tasks as tasks_lib
from vlm_jax.models import layers, pooling
from vlm_jax.models.internvl import InternVL
from vlm_jax.tasks import heads

FUSIONS = ("late", "lm")
FUSION_FEATURES = ("interact", "concat")


class Adapter(nnx.Module):
    """Linear + ReLU + Dropout: float[B, in] -> float32[B, out]."""

    def __init__(self, in_features: int, out_features: int, dropout: float, *, rngs: nnx.Rngs):
        self.linear = layers.Linear(in_features, out_features, ("embed", "mlp"), rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=_stream(rngs, "dropout"))

    def __call__(self, x, *, train: bool):
        return self.dropout(jax.nn.relu(self.linear(x.astype(jnp.float32))), deterministic=not train)


class EmbeddingProjector(nnx.Module):
    """Linear + L2 normalisation: float[B, A] -> float32[B, E] with unit rows."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.linear = layers.Linear(in_features, out_features, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return pooling.l2_normalize(self.linear(x))


def late_fusion_features(image_emb, text_emb, kind: str):
    """float[N, E] x float[N, E] -> float32[N, 4E] ('interact': [u, v, u*v, |u-v|]) or [N, 2E] ('concat')."""
    if kind == "concat":
        return jnp.concatenate([image_emb, text_emb], axis=-1)
    if kind == "interact":
        return jnp.concatenate([image_emb, text_emb, image_emb * text_emb, jnp.abs(image_emb - text_emb)], axis=-1)
    raise ValueError(f"fusion_features must be one of {FUSION_FEATURES}, got {kind!r}")


def _stream(rngs: nnx.Rngs, name: str):
    """The named rng stream, else 'default' (nnx.Rngs(0) has only 'default')."""
    if name in rngs:
        return rngs[name]
    if "default" in rngs:
        return rngs["default"]
    raise ValueError(f"rngs: need a {name!r} or 'default' stream, got {[k for k, _ in rngs.items()]}")


def check_embedding_config(cfg: ml_collections.ConfigDict) -> None:
    """ValueError naming the field for values no model can use."""
    pooling.check_pooling(cfg.vision_pool, cfg.text_pool)
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"model.embedding.fusion must be one of {FUSIONS}, got {cfg.fusion!r}")
    if cfg.fusion_features not in FUSION_FEATURES:
        raise ValueError(f"model.embedding.fusion_features must be one of {FUSION_FEATURES}, "
                         f"got {cfg.fusion_features!r}")
    if cfg.logit_scale_init <= 0 or cfg.logit_scale_max < cfg.logit_scale_init:
        raise ValueError(f"model.embedding.logit_scale_init must lie in (0, logit_scale_max], got "
                         f"{cfg.logit_scale_init} and max {cfg.logit_scale_max}")


class MultitaskModel(nnx.Module):
    """InternVL backbone + adapters, projectors and temperature (shared) + one module per configured task.

    Parameters: backbone/..., vision_adapter, text_adapter, vision_proj, text_proj, logit_scale, vision_pool (MAP
    pooling only), tasks/<name>/... .
    """

    def __init__(self, backbone: InternVL, embedding: ml_collections.ConfigDict,
                 task_configs: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        check_embedding_config(embedding)
        unknown = sorted(set(task_configs.keys()) - set(tasks_lib.TASKS))
        if unknown or not task_configs.keys():
            raise ValueError(f"config.tasks: unknown tasks {unknown}; expected one or more of {sorted(tasks_lib.TASKS)}")
        self.config = ml_collections.FrozenConfigDict(embedding)
        self.backbone = backbone
        vision_width = backbone.config.vision.hidden_size
        text_width = backbone.config.text.hidden_size
        a, e = embedding.adapter_dim, embedding.embed_dim
        self.vision_pool = (pooling.MAPHead(vision_width, embedding.map_num_heads, rngs=rngs)
                            if embedding.vision_pool == "map" else None)
        self.vision_adapter = Adapter(vision_width, a, embedding.dropout, rngs=rngs)
        self.text_adapter = Adapter(text_width, a, embedding.dropout, rngs=rngs)
        self.vision_proj = EmbeddingProjector(a, e, rngs=rngs)
        self.text_proj = EmbeddingProjector(a, e, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.log(jnp.float32(embedding.logit_scale_init)))
        if embedding.fusion == "late":
            fused = (4 if embedding.fusion_features == "interact" else 2) * e
        else:
            fused = text_width
        widths = tasks_lib.Widths(vision=vision_width, text=text_width, embed=e, fused=fused)
        self.tasks = nnx.Dict({name: tasks_lib.TASKS[name](task_configs[name], widths, rngs=rngs)
                               for name in sorted(task_configs.keys())})
        self.reads_query = any(t.reads_query for t in self.tasks.values())
        if self.reads_query and embedding.fusion != "late":
            raise ValueError("a task reads the spatial query (tasks.spatial.query='objects'), which needs "
                             f"model.embedding.fusion='late'; got {embedding.fusion!r}")
        self.sample_rng = _stream(rngs, "itm").fork()

    # ---- shared features ---------------------------------------------------------------------------------------

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

    def features(self, batch: dict, *, train: bool) -> tasks_lib.Features:
        """The backbone once, the shared embedding layers, and fusion of the matching pairs."""
        image = batch["image"]
        backbone = lora.training_view(self.backbone, train)  # LoRA dropout (if any) active in training only
        b = image.shape[0]
        vision_hidden = backbone.vision_hidden_states(image)  # [B, 1+P, Dv]
        text_hidden, _ = backbone.language_model(input_ids=batch["text_ids"], attention_mask=batch["text_mask"])
        image_emb = self._image_branch(vision_hidden, train)
        text_emb = self._text_branch(text_hidden, batch["text_mask"], train)

        if self.config.fusion == "late":
            def fuse(pair_image, pair_text):
                return late_fusion_features(image_emb[pair_image], text_emb[pair_text], self.config.fusion_features)
        else:
            image_tokens = backbone.image_embeddings_from_hidden(vision_hidden, image.shape[1:3])  # [B, Q, D]

            def fuse(pair_image, pair_text):
                ids, mask = batch["prompt_ids"][pair_text], batch["prompt_mask"][pair_text]
                embeds = backbone.merge_image_embeddings(ids, image_tokens[pair_image])  # [N, Lp, D]
                hidden, _ = backbone.language_model(inputs_embeds=embeds, attention_mask=mask)
                return pooling.gather_positions(hidden, pooling.last_valid_index(mask)).astype(jnp.float32)

        query_fused = None
        if self.reads_query:
            if "query_ids" not in batch:
                raise ValueError("the spatial task's query 'objects' needs query_ids in the batch: a dataset whose "
                                 "records name each caption's subjects and references (spatial_shapes)")
            query_hidden, _ = backbone.language_model(input_ids=batch["query_ids"],
                                                           attention_mask=batch["query_mask"])
            query_emb = self._text_branch(query_hidden, batch["query_mask"], train)
            query_fused = late_fusion_features(image_emb, query_emb, self.config.fusion_features)
        if "image_id" in batch:
            negatives = caption_truth.batch_truth(batch) == caption_truth.FALSE
        else:
            negatives = ~jnp.eye(b, dtype=bool)

        patch = self.backbone.config.vision.patch_size
        rows = jnp.arange(b)
        return tasks_lib.Features(
            vision_hidden=vision_hidden,
            patch_grid=heads.patch_grid(image.shape[1] // patch, image.shape[2] // patch),
            image_emb=image_emb, text_emb=text_emb, logit_scale=self.scale(), fused=fuse(rows, rows), fuse=fuse,
            valid=tasks_lib.batch_valid(batch, b),
            image_id=batch.get("image_id"), negatives=negatives, query_fused=query_fused,
            rng=self.sample_rng() if train else None, text_hidden=text_hidden, text_mask=batch["text_mask"])

    # ---- tasks -------------------------------------------------------------------------------------------------

    def __call__(self, batch: dict, *, train: bool) -> dict:
        """Every configured task on a batch -> the union of their output dicts (keys are unique per task)."""
        features = self.features(batch, train=train)
        outputs = {}
        for task in self.tasks.values():
            outputs.update(task(features, batch, train=train))
        return outputs

    def loss(self, outputs: dict, batch: dict):
        """(total float32[], {term: float32[]}): `vlm_jax.tasks.total_loss` over the configured tasks."""
        return tasks_lib.total_loss(dict(self.tasks.items()), outputs, batch)
