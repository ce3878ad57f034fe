"""The multitask model: an InternVL backbone, shared embedding layers and the configured tasks (`vlm_jax.tasks`).

Legend: B batch, L caption tokens, Lp prompt tokens, Q image tokens per tile, Dv vision width, D LM width,
A adapter width, E embedding width, F fused width (late fusion: 4E with 'interact' features, 2E with 'concat';
lm fusion: D), N tiles, T tiles per image, P patches per tile.

    tiles --ViT--> vision hidden [N, 1+P, Dv] --row_tiles--> each row's tiles [B, T, 1+P, Dv]
          --pool over the row's tiles--> [B, Dv] --vision_adapter--> [B, A] --vision_proj--> image_emb
    text_ids --LM--> text hidden [B, L, D] --pool--> [B, D] --text_adapter--> [B, A] --text_proj--> text_emb
    fusion 'late': fused = [u, v, u*v, |u - v|] [B, 4E] (fusion_features='interact', default) or [u, v] [B, 2E]
                   ('concat', seed recipe) with u = image_emb, v = text_emb
    fusion 'lm':   prompt_ids with the image tokens of all the row's tiles (from the same vision hidden states)
                   --LM--> fused = hidden at the last valid prompt token [B, D]; a pair (image i, caption j) reads
                   row i's prompt up to its image block's end, then row j's caption part
    Features(vision hidden, patch grid, embeddings, fused, ...) --> each task --> its outputs; loss = sum over tasks
    of weight * task loss.

Tiles (`vlm_jax.data.pipeline`): a batch's tiles come as one array `tiles` [N, S, S, 3] with `row_tiles` [B, T]
(indices, -1 padding) and `tile_regions` [N, 4] (what part of the whole image each tile shows); rows of the same
image may share tiles, so the ViT runs once per distinct tile. A batch with `image` [B, S, S, 3] instead is one tile
per row. `embedding.tile_pool` pools an image's tiles: 'all' applies `vision_pool` over every tile (cls: the mean of
the tiles' CLS; mean: of all their patches; map: attention over all their patches), 'thumbnail' over the last tile
only (the thumbnail when there are several). Patch positions are mapped into the whole image, so attention heads
over the patches see every tile and give boxes in whole-image coordinates.

Why the defaults differ from the seed recipe (measured in experiments/ablation.py): a linear head on [u, v] gives
logit = w1.u + w2.v + b, a sum of an image-only and a text-only score, so it cannot tell whether u and v belong
together (logit(a, a) + logit(b, b) = logit(a, b) + logit(b, a)); the products u*v make the cosine similarity a
linear function of the features.

The vision and text hidden states are computed once per call and shared by all tasks. Adapters are
Linear + ReLU + Dropout; projectors are Linear followed by L2 normalisation; the temperature is a learned log-scale.
Config: `config.model.embedding` (the shared layers) and `config.tasks` (one section per task).
"""

import einops
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
TILE_POOLING = ("all", "thumbnail")


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


def tile_layout(batch: dict):
    """(float[N, S, S, 3] tiles, int32[B, T] row_tiles, float32[N, 4] tile_regions) of a batch; a batch with
    `image` float[B, S, S, 3] is one whole-image tile per row."""
    if "tiles" in batch:
        return batch["tiles"], batch["row_tiles"], batch["tile_regions"]
    image = batch["image"]
    b = image.shape[0]
    return image, jnp.arange(b, dtype=jnp.int32)[:, None], jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0]]), (b, 1))


def rows_of_tiles(per_tile, row_tiles):
    """float[N, ...] per-tile values, int32[B, T] -> (float[B, T, ...] each row's tiles, bool[B, T] present)."""
    present = row_tiles >= 0
    return per_tile[jnp.where(present, row_tiles, 0)], present


def patch_positions(regions, grid_h: int, grid_w: int):
    """float32[N, 4] tile regions (normalised xyxy of the whole image) -> float32[N, P, 2] the (x, y) centre of
    each of a tile's row-major patches in whole-image coordinates."""
    local = heads.patch_grid(grid_h, grid_w)  # [P, 2] inside the tile
    return regions[:, None, :2] + (regions[:, None, 2:] - regions[:, None, :2]) * local


def splice_prompts(ids, mask, image_token_id: int, pair_image, pair_text):
    """int[B, Lp] prompts (each one image block, then the caption), int[M] rows -> (int[M, Lp], int[M, Lp]): row
    pair_image's prompt up to the end of its image block followed by row pair_text's prompt after its image block.
    The pipeline sizes Lp for any such pair; equal rows give the row's own prompt."""
    length = ids.shape[1]
    t = jnp.arange(length)
    end = pooling.last_valid_index(ids == image_token_id) + 2  # just after </img>
    e_image, e_text = end[pair_image][:, None], end[pair_text][:, None]
    source = jnp.clip(t - e_image + e_text, 0, length - 1)
    inside = (t - e_image + e_text) < length
    head = t < e_image
    out_ids = jnp.where(head, ids[pair_image], jnp.take_along_axis(ids[pair_text], source, axis=1))
    tail_mask = jnp.where(inside, jnp.take_along_axis(mask[pair_text], source, axis=1), 0)
    return out_ids, jnp.where(head, mask[pair_image], tail_mask)


def cached_fields(vision_pool: str, tasks) -> tuple[str, ...]:
    """The `MultitaskModel.backbone_outputs` fields that `tasks` (with `vision_pool`) read."""
    tasks = list(tasks)
    fields = [] if vision_pool == "map" else ["cached_image"]
    if vision_pool == "map" or any(t.reads_patches for t in tasks):
        fields += ["cached_patches", "cached_regions"]
    fields.append("cached_text")
    if any(t.reads_text_hidden for t in tasks):
        fields.append("cached_text_hidden")
    if any(t.reads_query for t in tasks):
        fields.append("cached_query")
    return tuple(fields)


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
    if cfg.get("tile_pool", "all") not in TILE_POOLING:
        raise ValueError(f"model.embedding.tile_pool must be one of {TILE_POOLING}, got {cfg.tile_pool!r}")
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
        self.reads_lm = any(t.reads_lm for t in self.tasks.values())
        if self.reads_query and embedding.fusion != "late":
            raise ValueError("a task reads the spatial query (tasks.spatial.query='objects'), which needs "
                             f"model.embedding.fusion='late'; got {embedding.fusion!r}")
        self.sample_rng = _stream(rngs, "itm").fork()

    # ---- shared features ---------------------------------------------------------------------------------------

    def scale(self):
        """float32[]: exp(log-scale), clipped to logit_scale_max."""
        return jnp.exp(jnp.minimum(self.logit_scale[...], jnp.log(self.config.logit_scale_max)))

    def _image_branch(self, pooled, train: bool):
        """float32[B, Dv] pooled vision features -> float32[B, E]."""
        return self.vision_proj(self.vision_adapter(pooled, train=train))

    def _text_branch(self, pooled, train: bool):
        """float32[B, D] pooled text features -> float32[B, E]."""
        return self.text_proj(self.text_adapter(pooled, train=train))

    def _pool_patches(self, patches, present):
        """float[B, T, P, Dv] each row's tiles' patches, bool[B, T] -> float32[B, Dv] (MAP pooling, trainable)."""
        cls = jnp.zeros(patches.shape[:2] + (1, patches.shape[-1]), patches.dtype)  # MAP reads no CLS
        return pooling.pool_tiles(jnp.concatenate([cls, patches], axis=2), present, self.config.vision_pool,
                                  self.config.get("tile_pool", "all"), self.vision_pool)

    def encode_image(self, image):
        """float[B, S, S, 3] -> float32[B, E] unit-norm image embeddings (eval mode)."""
        hidden = self.backbone.vision_hidden_states(image)[:, None]  # [B, 1, 1+P, Dv]
        pooled = pooling.pool_tiles(hidden, jnp.ones(hidden.shape[:2], bool), self.config.vision_pool,
                                    self.config.get("tile_pool", "all"), self.vision_pool)
        return self._image_branch(pooled, train=False)

    def encode_text(self, ids, mask):
        """int[B, L], int[B, L] -> float32[B, E] unit-norm text embeddings (eval mode)."""
        hidden, _ = self.backbone.language_model(input_ids=ids, attention_mask=mask)
        return self._text_branch(pooling.pool_text(hidden, mask, self.config.text_pool), train=False)

    @property
    def cached_fields(self) -> tuple[str, ...]:
        """The `backbone_outputs` fields this model's tasks read (what a feature cache stores per row)."""
        return cached_fields(self.config.vision_pool, self.tasks.values())

    def backbone_outputs(self, batch: dict) -> dict:
        """What the backbone gives each row, before any trainable layer: the fields `cached_fields` names.

        cached_image        float32[B, Dv]    the row's tiles pooled (`vision_pool` cls / mean, `tile_pool`)
        cached_patches      float[B, T, P, Dv]  the patch tokens of the row's tiles (zeros after num_tiles)
        cached_regions      float32[B, T, 4]  the part of the whole image each of them shows (zeros after num_tiles)
        cached_text         float32[B, D]     the caption's hidden states pooled (`text_pool`)
        cached_text_hidden  float[B, L, D]    the caption's hidden states
        cached_query        float32[B, D]     the spatial query's hidden states pooled
        A batch holding these fields (from `vlm_jax.feature_cache`) skips the backbone in `features`.
        """
        return self._run_backbone(self.backbone, batch)[0]

    def _run_backbone(self, backbone: InternVL, batch: dict):
        """(`backbone_outputs` fields, float[N, 1+P, Dv] vision hidden states, int32[B, T] row_tiles,
        float[B, L, D] text hidden states)."""
        tiles, row_tiles, regions = tile_layout(batch)
        vision_hidden = backbone.vision_hidden_states(tiles)  # [N, 1+P, Dv]
        row_hidden, present = rows_of_tiles(vision_hidden, row_tiles)  # [B, T, 1+P, Dv], [B, T]
        fields = self.cached_fields
        out = {}
        if "cached_image" in fields:
            out["cached_image"] = pooling.pool_tiles(row_hidden, present, self.config.vision_pool,
                                                     self.config.get("tile_pool", "all"))
        if "cached_patches" in fields:
            out["cached_patches"] = jnp.where(present[:, :, None, None], row_hidden[:, :, 1:], 0)
            out["cached_regions"] = jnp.where(present[:, :, None], rows_of_tiles(regions, row_tiles)[0], 0.0)
        text_hidden, _ = backbone.language_model(input_ids=batch["text_ids"], attention_mask=batch["text_mask"])
        out["cached_text"] = pooling.pool_text(text_hidden, batch["text_mask"], self.config.text_pool)
        if "cached_text_hidden" in fields:
            out["cached_text_hidden"] = text_hidden
        if self.reads_query:
            if "query_ids" not in batch:
                raise ValueError("the spatial task's query 'objects' needs query_ids in the batch: a dataset whose "
                                 "records name each caption's subjects and references (spatial_shapes)")
            query_hidden, _ = backbone.language_model(input_ids=batch["query_ids"],
                                                      attention_mask=batch["query_mask"])
            out["cached_query"] = pooling.pool_text(query_hidden, batch["query_mask"], self.config.text_pool)
        return out, vision_hidden, row_tiles, text_hidden

    def features(self, batch: dict, *, train: bool) -> tasks_lib.Features:
        """The backbone once (or its outputs from the feature cache), the shared embedding layers, and fusion of
        the matching pairs."""
        backbone = lora.training_view(self.backbone, train)  # LoRA dropout (if any) active in training only
        if "cached_text" in batch:  # rows of the feature cache: the backbone does not run
            outputs, vision_hidden, row_tiles = batch, None, None
            text_hidden = batch.get("cached_text_hidden")
        else:
            outputs, vision_hidden, row_tiles, text_hidden = self._run_backbone(backbone, batch)
        b = batch["text_ids"].shape[0]
        patches = patch_mask = patch_grid = None
        if "cached_patches" in outputs:
            row_patches = outputs["cached_patches"]  # [B, T, P, Dv]
            t, num_patches = row_patches.shape[1:3]
            present = (row_tiles >= 0) if row_tiles is not None else (
                jnp.arange(t)[None] < batch["num_tiles"][:, None])
            side = int(round(num_patches ** 0.5))  # tiles are square
            regions = outputs["cached_regions"].reshape(b * t, 4)
            patches = einops.rearrange(row_patches, "B T P D -> B (T P) D")
            patch_mask = jnp.repeat(present, num_patches, axis=1)
            patch_grid = patch_positions(regions, side, side).reshape(b, t * num_patches, 2)
        if self.config.vision_pool == "map":
            pooled_image = self._pool_patches(outputs["cached_patches"], present)
        else:
            pooled_image = outputs["cached_image"]
        image_emb = self._image_branch(pooled_image, train)
        text_emb = self._text_branch(outputs["cached_text"], train)

        row_tokens = None
        if self.config.fusion == "lm" or self.reads_lm:
            if vision_hidden is None:
                raise ValueError("features from the feature cache cannot feed the language model (fusion 'lm' or "
                                 "the lm task): they hold no image tokens")
            tiles = tile_layout(batch)[0]
            image_tokens = backbone.image_embeddings_from_hidden(vision_hidden, tiles.shape[1:3])  # [N, Q, D]
            # Each row's tiles' tokens in order; its prompt holds Q * num_tiles image tokens, so padding is never read.
            row_tokens = einops.rearrange(rows_of_tiles(image_tokens, row_tiles)[0], "B T Q D -> B (T Q) D")
        if self.config.fusion == "late":
            def fuse(pair_image, pair_text):
                return late_fusion_features(image_emb[pair_image], text_emb[pair_text], self.config.fusion_features)
        else:
            def fuse(pair_image, pair_text):
                ids, mask = splice_prompts(batch["prompt_ids"], batch["prompt_mask"],
                                           self.backbone.config.image_token_id, pair_image, pair_text)
                embeds = backbone.merge_row_image_embeddings(ids, row_tokens[pair_image])  # [M, Lp, D]
                hidden, _ = backbone.language_model(inputs_embeds=embeds, attention_mask=mask)
                return pooling.gather_positions(hidden, pooling.last_valid_index(mask)).astype(jnp.float32)

        query_fused = None
        if self.reads_query:
            query_emb = self._text_branch(outputs["cached_query"], train)
            query_fused = late_fusion_features(image_emb, query_emb, self.config.fusion_features)
        lm_hidden = None
        if self.reads_lm:
            if "lm_ids" not in batch:
                raise ValueError("the lm task needs lm_ids / lm_labels in the batch: set config.data.lm_kinds (the "
                                 "generative targets the pipeline makes)")
            embeds = backbone.merge_row_image_embeddings(batch["lm_ids"], row_tokens)
            lm_hidden, _ = backbone.language_model(inputs_embeds=embeds, attention_mask=batch["lm_mask"])
        if "image_id" in batch:
            negatives = caption_truth.batch_truth(batch) == caption_truth.FALSE
        else:
            negatives = ~jnp.eye(b, dtype=bool)
        rows = jnp.arange(b)
        return tasks_lib.Features(
            vision_hidden=vision_hidden, row_tiles=row_tiles, patches=patches, patch_mask=patch_mask,
            patch_grid=patch_grid, image_emb=image_emb, text_emb=text_emb, logit_scale=self.scale(),
            fused=fuse(rows, rows), fuse=fuse, valid=tasks_lib.batch_valid(batch, b),
            image_id=batch.get("image_id"), negatives=negatives, query_fused=query_fused,
            rng=self.sample_rng() if train else None, text_hidden=text_hidden, text_mask=batch["text_mask"],
            lm_hidden=lm_hidden, lm_head=backbone.logits)

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
