"""Evaluation over a dataset split: retrieval R@K both directions, box quality, spatial accuracy / F1.

The evaluator takes a predict function (the jitted eval step) and an iterable of host batches, gathers the per-
example outputs on the host and hands them to the pure metric functions of ``vlm_jax.metrics``. Captions of the same
image share an ``image_id``: images are deduplicated by id and every caption counts as a positive of its image
(the multi-caption COCO protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax import metrics

# What the eval step returns per example, and the batch fields the metrics read.
OUTPUT_KEYS = ("image_emb", "text_emb", "box_pred", "spatial_logits")
BATCH_KEYS = ("image_id", "box", "has_box", "relation", "has_relation")


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a short (last) batch to ``size`` rows by repeating row 0; ``valid`` marks the real rows."""
    n = len(next(iter(batch.values())))
    out = {k: np.asarray(v) for k, v in batch.items()}
    valid = np.asarray(out.pop("valid", np.ones(n, bool)), bool)
    if n > size:
        raise ValueError(f"Eval batch has {n} rows; expected at most {size}.")
    if n < size:
        out = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for k, v in out.items()}
        valid = np.concatenate([valid, np.zeros(size - n, bool)])
    out["valid"] = valid
    return out


def collect(predict: Callable[[dict], Mapping[str, jax.Array]], batches: Iterable[Mapping[str, np.ndarray]],
            batch_size: int, to_device: Callable[[dict], dict]) -> dict[str, np.ndarray]:
    """Runs ``predict`` over every batch; returns the concatenated host outputs + batch fields of valid rows.

    ``batch_size`` is this process's rows per batch; ``to_device`` makes global arrays from a host batch.
    """
    parts: dict[str, list] = {}
    sums: dict[str, float] = {}
    num_batches = 0
    for batch in batches:
        batch = pad_batch(batch, batch_size)
        out = predict(to_device(batch))
        host = {k: _to_host(out[k]) for k in OUTPUT_KEYS}
        host.update({k: _to_host(out["batch"][k]) for k in (*BATCH_KEYS, "valid")})
        for k, v in host.items():
            parts.setdefault(k, []).append(v)
        for k, v in out.get("terms", {}).items():
            sums[k] = sums.get(k, 0.0) + float(_to_host(v))
        num_batches += 1
    if not num_batches:
        raise ValueError("Evaluation split yielded no batches.")
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    valid = cat.pop("valid")
    cat = {k: v[valid] for k, v in cat.items()}
    cat["loss_terms"] = {k: v / num_batches for k, v in sums.items()}
    return cat


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def compute_metrics(c: Mapping[str, np.ndarray], ks=(1, 5, 10)) -> dict[str, float]:
    """Metrics from collected outputs; chance levels are reported alongside (``chance/...``)."""
    ids = c["image_id"]
    _, first, text_to_image = np.unique(ids, return_index=True, return_inverse=True)
    sim = _normalise(c["image_emb"][first]) @ _normalise(c["text_emb"]).T  # [I, T]
    out = {k.replace("@", "_r"): v for k, v in metrics.retrieval_recall(sim, text_to_image, ks).items()}
    num_images, num_texts = sim.shape
    out["chance/i2t_r1"] = float(np.mean(np.bincount(text_to_image) / num_texts))
    out["chance/t2i_r1"] = 1.0 / num_images
    box = metrics.box_metrics(c["box_pred"], c["box"], c["has_box"])
    out.update({f"box_{k}": float(v) for k, v in box.items() if k != "count"})
    spatial = metrics.spatial_metrics(c["spatial_logits"], c["relation"], c["has_relation"],
                                      num_classes=c["spatial_logits"].shape[-1])
    out["spatial_acc"] = spatial["accuracy"]
    out["spatial_f1"] = spatial["macro_f1"]
    counts = np.bincount(c["relation"][c["has_relation"].astype(bool)], minlength=c["spatial_logits"].shape[-1])
    out["chance/spatial_acc"] = float(counts.max() / max(counts.sum(), 1))
    out["num_images"], out["num_texts"] = float(num_images), float(num_texts)
    out.update({f"loss/{k}": float(v) for k, v in c.get("loss_terms", {}).items()})
    return out


def evaluate(predict, batches, batch_size: int, to_device) -> dict[str, float]:
    return compute_metrics(collect(predict, batches, batch_size, to_device))
