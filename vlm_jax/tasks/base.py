"""What a task is: one unit that owns its head parameters, its loss terms, its evaluation metrics and the batch
fields it reads. The multitask model runs the backbone once and hands the shared `Features` to every configured task.

A task is an `nnx.Module` subclass of `Task` with
  name               its key in `config.tasks` and the prefix of its logged terms (`itm`, `itm_acc`, ...);
  batch_fields       batch keys its loss and metrics read (collected per example for evaluation);
  eval_outputs       keys of its outputs collected per example for evaluation (leading axis = batch rows);
  last_value_terms   loss terms logged as their last value instead of the mean over the logging window;
  diagnostic_terms   terms of `loss` that are not losses (accuracies, counts, the temperature): logged under
                     ``train/`` in training and as plain metrics in evaluation, never under ``loss/``;
  headline_metrics   the few metrics the console shows after each evaluation;
  reads_query        (attribute) True when the task reads `Features.query_fused` (the model then encodes the
                     batch's `query_ids`);
  reads_lm           (attribute) True when the task reads `Features.lm_hidden` (the model then runs the language
                     model over the batch's `lm_ids` with the image tokens);
  reads_patches      (attribute) True when the task reads `Features.patches` / `patch_grid` / `patch_mask`;
  reads_text_hidden  (attribute) True when the task reads `Features.text_hidden` (the caption's hidden states);
                     the feature cache (`vlm_jax.feature_cache`) stores these only for the tasks that read them;
  metric_names       the keys `metrics` returns (``config.checkpoint.best_metric`` is checked against them);
  __init__(cfg, widths, *, rngs)        cfg = config.tasks.<name>, widths = `Widths` of the shared features;
  __call__(features, batch, *, train)   -> dict of outputs;
  loss(outputs, batch, valid)           -> dict of float32[] terms, "loss" being what the task optimises;
  metrics(collected)                    -> {name: float} over a split's collected outputs and batch fields;
  eval_pictures(collected, examples)    -> {name: uint8[N, H, W, 3] image | markdown str} for TensorBoard
                                           (`vlm_jax.eval_pictures.EvalExamples`: the split's first images and
                                           every row's caption); default none.
`config.tasks.<name>.weight` scales the task's "loss" in the total.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Widths:
    """Widths of the shared features: vision tower Dv, language model D, embeddings E, fused pair features F."""

    vision: int
    text: int
    embed: int
    fused: int


@dataclasses.dataclass(frozen=True)
class Features:
    """What the backbone and the shared embedding layers computed for one batch (B rows).

    vision_hidden  float[N, 1+P, Dv]  ViT output of the batch's N tiles (CLS first); `row_tiles` says whose
                                      (None when the features come from the feature cache)
    row_tiles      int32[B, T]        indices into the tiles of each row's image tiles (-1: none; None: cached)
    patches        float[B, T*P, Dv]  every patch token of each row's tiles (the heads attend over them); None
                                      with the next two unless a task `reads_patches` or vision_pool is 'map'
    patch_mask     bool[B, T*P]       False on the patches of missing tiles
    patch_grid     float32[B, T*P, 2] (x, y) centre of each patch in normalised coordinates of the whole image
    image_emb      float32[B, E]      unit-norm image embeddings
    text_emb       float32[B, E]      unit-norm caption embeddings
    logit_scale    float32[]          contrastive temperature (exp of the learned log-scale, clipped)
    fused          float32[B, F]      fused features of the matching pairs (image i, caption i)
    fuse           (int[N] image rows, int[N] caption rows) -> float32[N, F]: fused features of other pairs
    valid          bool[B]            False on evaluation padding rows (they count nowhere)
    image_id       int[B] or None     rows with equal ids show the same image
    negatives      bool[B, B]         caption j is false for image i (`vlm_jax.caption_truth`): the only pairs the
                                      contrastive and matching losses may treat as negatives
    query_fused    float32[B, F] or None  fused features of (image i, query i), the spatial query that names the two
                                      objects without the relation; None unless a task reads queries
    rng            PRNG key or None   for sampling in training (None in evaluation: deterministic)
    text_hidden    float[B, L, D]     the caption's LM hidden states (the detection decoder's text memory)
    text_mask      int[B, L]          1 on the caption's tokens
    lm_hidden      float[B, Lg, D] or None  the LM over `lm_ids` (prompt with the row's image tokens + answer);
                                      None unless a task reads it (`reads_lm`)
    lm_head        float[..., D] -> float32[..., V]: the LM's output layer (logits from `lm_hidden`)
    """

    vision_hidden: jax.Array | None
    row_tiles: jax.Array | None
    patches: jax.Array | None
    patch_mask: jax.Array | None
    patch_grid: jax.Array | None
    image_emb: jax.Array
    text_emb: jax.Array
    logit_scale: jax.Array
    fused: jax.Array
    fuse: Callable[[jax.Array, jax.Array], jax.Array]
    valid: jax.Array
    image_id: jax.Array | None
    negatives: jax.Array
    query_fused: jax.Array | None
    rng: jax.Array | None
    text_hidden: jax.Array | None = None
    text_mask: jax.Array | None = None
    lm_hidden: jax.Array | None = None
    lm_head: Callable[[jax.Array], jax.Array] | None = None


class Task(nnx.Module):
    """Base class of the tasks; see the module docstring for the contract."""

    name: ClassVar[str]
    batch_fields: ClassVar[tuple[str, ...]] = ()
    eval_outputs: ClassVar[tuple[str, ...]] = ()
    last_value_terms: ClassVar[tuple[str, ...]] = ()
    metric_names: ClassVar[tuple[str, ...]] = ()  # the keys `metrics` returns (checked before a run starts)
    diagnostic_terms: ClassVar[tuple[str, ...]] = ()
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    reads_query: bool = False
    reads_lm: bool = False
    reads_patches: bool = False
    reads_text_hidden: bool = False

    def __init__(self, cfg: ml_collections.ConfigDict, widths: Widths, *, rngs: nnx.Rngs):
        self.weight = float(cfg.weight)

    def __call__(self, features: Features, batch: Mapping[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        raise NotImplementedError

    def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
             valid: jax.Array) -> dict[str, jax.Array]:
        raise NotImplementedError

    def metrics(self, collected: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {}

    def eval_pictures(self, collected: Mapping[str, np.ndarray], examples) -> dict[str, Any]:
        return {}


def prefixed_terms(name: str, terms: Mapping[str, Any]) -> dict[str, Any]:
    """A task's terms as logged: "loss" -> name, other k -> name_k."""
    return {name if k == "loss" else f"{name}_{k}": v for k, v in terms.items()}


def diagnostic_names(tasks) -> frozenset[str]:
    """The logged names (`<task>_<term>`) of the tasks' diagnostic terms."""
    return frozenset(f"{t.name}_{k}" for t in tasks for k in t.diagnostic_terms)


TILE_FIELDS = ("tiles", "tile_regions")  # batch fields whose leading axis is the batch's tiles, not its rows


def batch_rows(batch: Mapping[str, Any]) -> int:
    """B: the leading size of the batch's row fields (tile fields have N tiles instead)."""
    return next(v.shape[0] for k, v in batch.items() if k not in TILE_FIELDS)


def batch_valid(batch: Mapping[str, jax.Array], rows: int) -> jax.Array:
    """bool[B]: the batch's `valid` field (False on evaluation padding rows), all True when absent."""
    return batch["valid"].astype(bool) if "valid" in batch else jnp.ones(rows, bool)


def total_loss(tasks: Mapping[str, Task], outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
    """(float32[] sum over tasks of weight * task loss, {term: float32[]}) with terms `<task>`, `<task>_<term>`
    and `total`. Padding rows (`batch["valid"]` False) count in no task."""
    valid = batch_valid(batch, batch_rows(batch))
    total = jnp.zeros((), jnp.float32)
    terms = {}
    for name, task in tasks.items():
        task_terms = task.loss(outputs, batch, valid)
        total = total + task.weight * task_terms["loss"]
        terms.update(prefixed_terms(name, task_terms))
    terms["total"] = total
    return total, terms
