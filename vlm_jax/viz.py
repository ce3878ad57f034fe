"""Small matplotlib figures for the notebooks: tiles, similarity heat maps, boxes, curves, confusion matrices.

matplotlib is imported inside the functions, so `vlm_jax` does not depend on it (`pip install vlm_jax[notebooks]`).
Every plotting function returns the `matplotlib.figure.Figure` it drew (notebooks display it; scripts save it).

Images are either uint8[H, W, 3] or the model's normalised float32[H, W, 3] tiles (`to_uint8` undoes the ImageNet
normalisation of `vlm_jax.data.preprocess`). Boxes are normalised xyxy in [0, 1] (x right, y down).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from vlm_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

# Colours for true (green) and predicted (magenta) boxes: both stand out on the grey spatial_shapes background.
TRUE_COLOUR = "#00c853"
PRED_COLOUR = "#ff00ff"
REFERENCE_COLOUR = "#00b0ff"


def _plt():
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    return plt


def to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] as is; a normalised float[H, W, 3] tile back to uint8 (clipped)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    x = image.astype(np.float32) * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _grid(n: int, ncols: int | None, size: float, extra_height: float = 0.0):
    """(figure, flat list of n axes, ticks off) for an n-panel grid; unused panels are hidden."""
    plt = _plt()
    ncols = max(1, min(n, ncols or math.ceil(math.sqrt(n))))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + extra_height) * nrows), squeeze=False,
                             layout="constrained")  # also makes room for a suptitle added later
    flat = list(axes.ravel())
    for ax in flat:
        ax.set_axis_off()
    return fig, flat[:n]


def show_tiles(tiles: np.ndarray, *, titles: Sequence[str] | None = None, ncols: int | None = None,
               size: float = 2.0):
    """The tiles of `dynamic_tiles` (float32[N, S, S, 3]) side by side; the last is the thumbnail when N > 1."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4:
        raise ValueError(f"tiles must be [N, S, S, 3], got shape {tiles.shape}")
    n = len(tiles)
    if titles is None:
        titles = [f"tile {i}" for i in range(n)]
        if n > 1:
            titles[-1] = "thumbnail"
    fig, axes = _grid(n, ncols or n, size, 0.3)
    for ax, tile, title in zip(axes, tiles, titles):
        ax.imshow(to_uint8(tile))
        ax.set_title(title, fontsize=9)
    return fig


def similarity_heatmap(sim: np.ndarray, row_labels: Sequence[str] | None = None,
                       col_labels: Sequence[str] | None = None, *, title: str = "cosine similarity",
                       annotate: bool | None = None):
    """Heat map of float[N, M] (rows: images, columns: texts) with the best column of each row outlined."""
    plt = _plt()
    sim = np.asarray(sim, np.float32)
    if sim.ndim != 2:
        raise ValueError(f"sim must be [N, M], got shape {sim.shape}")
    n, m = sim.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * m + 2.5, 1.0 + 0.45 * n + 2.0))
    im = ax.imshow(sim, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_xticks(range(m), labels=list(col_labels) if col_labels is not None else range(m), rotation=60,
                  ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=list(row_labels) if row_labels is not None else range(n), fontsize=8)
    if annotate if annotate is not None else n * m <= 100:
        lo, hi = float(sim.min()), float(sim.max())
        for i in range(n):
            for j in range(m):
                bright = (sim[i, j] - lo) > 0.6 * (hi - lo)  # viridis is light at the top of its range
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
    for i, j in enumerate(np.argmax(sim, axis=1)):
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def draw_box(ax, box: Sequence[float], size: tuple[int, int], *, colour: str, label: str | None = None,
             linestyle: str = "-", linewidth: float = 2.0) -> None:
    """One normalised xyxy box on an `imshow` axis of an image of `size` = (height, width) pixels."""
    plt = _plt()
    h, w = size
    x0, y0, x1, y1 = (float(v) for v in box)
    # imshow puts pixel centres at integers; pixel-exclusive edges sit half a pixel before.
    rect = plt.Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h, fill=False, edgecolor=colour,
                         linestyle=linestyle, linewidth=linewidth)
    ax.add_patch(rect)
    if label:
        ax.text(x0 * w - 0.5, y0 * h - 1.0, label, color=colour, fontsize=7, va="bottom",
                bbox=dict(facecolor="black", alpha=0.5, pad=0.5, linewidth=0))


def examples_grid(images: Sequence[np.ndarray], captions: Sequence[str], boxes: np.ndarray | None = None,
                  pred_boxes: np.ndarray | None = None, reference_boxes: np.ndarray | None = None, *,
                  ncols: int = 4, size: float = 2.6, box_labels: Sequence[str] | None = None):
    """Images with their captions (wrapped under each) and boxes: true subject box (solid green), predicted box
    (dashed magenta), reference object's box (dotted blue). Any of the box arrays may be None; float[N, 4]."""
    import textwrap  # pylint: disable=g-import-not-at-top

    n = len(images)
    if len(captions) != n:
        raise ValueError(f"got {n} images but {len(captions)} captions")
    for name, b in (("boxes", boxes), ("pred_boxes", pred_boxes), ("reference_boxes", reference_boxes)):
        if b is not None and np.shape(b) != (n, 4):
            raise ValueError(f"{name} must be [{n}, 4] (one normalised xyxy box per image), got {np.shape(b)}")
    titles = ["\n".join(textwrap.wrap(str(c), 30)) for c in captions]
    if box_labels is not None:
        titles = [f"{t}\n{label}" for t, label in zip(titles, box_labels)]
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig, axes = _grid(n, ncols, size, 0.13 * lines + 0.1)  # room for the titles above each panel
    for i, ax in enumerate(axes):
        image = to_uint8(images[i])
        ax.imshow(image, interpolation="nearest")
        hw = image.shape[:2]
        if reference_boxes is not None:
            draw_box(ax, reference_boxes[i], hw, colour=REFERENCE_COLOUR, linestyle=":")
        if boxes is not None:
            draw_box(ax, boxes[i], hw, colour=TRUE_COLOUR)
        if pred_boxes is not None:
            draw_box(ax, pred_boxes[i], hw, colour=PRED_COLOUR, linestyle="--")
        ax.set_title(titles[i], fontsize=7)
    return fig


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a `metrics.jsonl` (one JSON object per line, each with `step` and usually `split`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"no metrics file at {path!r} (train_and_evaluate writes WORKDIR/metrics.jsonl)")
    from vlm_jax.run_logging import read_jsonl

    return read_jsonl(path)


def metric_series(records: Sequence[dict], key: str, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the records of `split` (all records when None) that hold it, sorted by step."""
    rows = sorted((r["step"], r[key]) for r in records
                  if key in r and (split is None or r.get("split") == split))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    steps, values = zip(*rows)
    return np.asarray(steps), np.asarray(values, np.float64)


def plot_metrics(records_or_path, keys: Sequence[str] | None = None, *, ncols: int = 3, size: float = 3.2,
                 chance: bool = True):
    """One panel per metric key, one line per split, from `metrics.jsonl` records (or its path / workdir).

    keys: default = every numeric key but `step`, `num_*` and `chance/*`. With `chance`, a key whose
    `chance/<key>` is recorded gets a dashed horizontal line at that level.
    """
    records = read_metrics(records_or_path) if isinstance(records_or_path, (str, os.PathLike)) else \
        list(records_or_path)
    if not records:
        raise ValueError("no metric records to plot")
    if keys is None:
        found = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
        keys = sorted(k for k in found if k != "step" and not k.startswith(("num_", "chance/")))
    splits = sorted({r.get("split", "") for r in records})
    fig, axes = _grid(len(keys), ncols, size, 0.0)
    for ax, key in zip(axes, keys):
        ax.set_axis_on()
        for split in splits:
            steps, values = metric_series(records, key, split or None)
            if len(steps):
                ax.plot(steps, values, marker="o", markersize=3, label=split or None)
            if chance:
                _, level = metric_series(records, f"chance/{key}", split or None)
                if len(level):
                    ax.axhline(level[-1], color="grey", linestyle="--", linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(splits) > 1:
            ax.legend(fontsize=7)
    return fig


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], *, title: str = "confusion matrix",
                          normalise: bool = True):
    """int[C, C] counts (rows: true class, columns: predicted) as a heat map; cells show counts, colours the
    row-normalised fraction when `normalise`."""
    plt = _plt()
    matrix = np.asarray(matrix)
    c = len(labels)
    if matrix.shape != (c, c):
        raise ValueError(f"matrix must be [{c}, {c}] for {c} labels, got shape {matrix.shape}")
    colours = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalise else matrix
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * c, 1.2 + 0.6 * c))
    ax.imshow(colours, cmap="Blues", vmin=0, vmax=1 if normalise else None)
    ax.set_xticks(range(c), labels=labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), labels=labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if colours[i, j] > 0.5 * (colours.max() or 1) else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def retrieval_examples(images: Sequence[np.ndarray], ranked: Sequence[Sequence[str]],
                       correct: Sequence[Sequence[bool]], scores: Sequence[Sequence[float]] | None = None, *,
                       titles: Sequence[str] | None = None, size: float = 2.2):
    """One row per image: the image (with an optional title, e.g. its own captions), then its top-k captions
    ranked (correct ones in green, others in red), with their scores when given."""
    import textwrap  # pylint: disable=g-import-not-at-top

    plt = _plt()
    n = len(images)
    if not (len(ranked) == len(correct) == n):
        raise ValueError(f"need one ranked list and one correctness list per image: {n} images, "
                         f"{len(ranked)} ranked, {len(correct)} correct")
    fig, axes = plt.subplots(n, 2, figsize=(size + 4.8, size * n), squeeze=False,
                             gridspec_kw=dict(width_ratios=[size, 4.8]))
    for i in range(n):
        axes[i, 0].imshow(to_uint8(images[i]), interpolation="nearest")
        axes[i, 0].set_axis_off()
        if titles is not None:
            axes[i, 0].set_title("\n".join(textwrap.wrap(titles[i], 34)), fontsize=7)
        ax = axes[i, 1]
        ax.set_axis_off()
        k = len(ranked[i])
        for r, (text, ok) in enumerate(zip(ranked[i], correct[i])):
            score = f" ({scores[i][r]:.2f})" if scores is not None else ""
            ax.text(0.0, 1.0 - (r + 0.5) / max(k, 1), f"{r + 1}. {text}{score}", fontsize=8, va="center",
                    color="#1b5e20" if ok else "#b71c1c", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def top_k_captions(sim: np.ndarray, k: int = 5) -> np.ndarray:
    """int[N, k]: column indices of the k highest scores of each row of float[N, M], best first."""
    sim = np.asarray(sim)
    k = min(k, sim.shape[1])
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


__all__ = ["to_uint8", "show_tiles", "similarity_heatmap", "draw_box", "examples_grid", "read_metrics",
           "metric_series", "plot_metrics", "plot_confusion_matrix", "retrieval_examples", "top_k_captions"]
