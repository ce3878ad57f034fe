"""Pictures of an evaluation for TensorBoard: the first examples of a split with their true and predicted boxes, the
top captions retrieved for the first images, and a confusion matrix, drawn with PIL (no plotting stack needed).

`EvalExamples.load` reads what the drawings need from the split's records (the images of the first rows and every
row's caption text, in the order the evaluation collects its rows); each task turns its collected outputs into
pictures in `Task.eval_pictures(collected, examples)`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TRUE_COLOUR, PRED_COLOUR = (40, 200, 60), (230, 40, 200)
PANEL = 192  # pixels per drawn image side
NUM_SHOWN = 6


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


@dataclasses.dataclass(frozen=True)
class EvalExamples:
    """images: uint8[H, W, 3] of the first rows (one per row); captions: str per row of the split."""

    images: list
    captions: list

    @classmethod
    def load(cls, data_config, split: str, image_ids: np.ndarray, num_rows: int = NUM_SHOWN) -> EvalExamples | None:
        """The examples of ``split`` (rows: record i, caption k, in order), or None (with a warning) when the
        collected rows (``image_ids``, int[N]) are not in that order."""
        from vlm_jax.data import pipeline

        _, source = pipeline.load_source(data_config, split)
        images, captions, ids = [], [], []
        for i in range(len(source)):
            record = source[i]
            for caption in record["captions"]:
                if len(images) < num_rows:
                    images.append(np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB")))
                captions.append(_text(caption))
                ids.append(int(record["image_id"]))
        if ids != [int(i) for i in image_ids]:
            logging.warning("Evaluation rows of split %r are not in record order; no pictures are drawn.", split)
            return None
        return cls(images=images, captions=captions)


def _panel(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).resize((PANEL, PANEL), Image.NEAREST)


def _caption_strip(lines: list[str], width: int) -> Image.Image:
    font = ImageFont.load_default()
    strip = Image.new("RGB", (width, 12 * len(lines) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 12 * i), line, fill=(0, 0, 0), font=font)
    return strip


def boxes_picture(image: np.ndarray, caption: str, true_box, pred_box, note: str = "") -> np.ndarray:
    """uint8[H, W, 3]: the image scaled to PANEL px with the true (green) and predicted (magenta) normalised xyxy
    boxes (float[4] or float[K, 4] each), the caption (and ``note``) written below."""
    panel = _panel(image)
    draw = ImageDraw.Draw(panel)
    for boxes, colour in ((true_box, TRUE_COLOUR), (pred_box, PRED_COLOUR)):
        for box in np.asarray(boxes, np.float32).reshape(-1, 4):
            x0, y0, x1, y1 = (float(v) * PANEL for v in box)
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=2)
    lines = textwrap.wrap(caption, 30)[:3] + ([note] if note else [])
    strip = _caption_strip(lines, PANEL)
    out = Image.new("RGB", (PANEL, PANEL + strip.height), (255, 255, 255))
    out.paste(panel, (0, 0))
    out.paste(strip, (0, PANEL))
    return np.asarray(out)


def stack(pictures: list[np.ndarray]) -> np.ndarray:
    """uint8[N, H, W, 3] from pictures of different heights (padded white at the bottom)."""
    height = max(p.shape[0] for p in pictures)
    return np.stack([np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in pictures])


def confusion_picture(matrix: np.ndarray, labels: list[str]) -> np.ndarray:
    """uint8[1, H, W, 3]: int[C, C] counts (rows true, columns predicted), cells shaded by the row fraction."""
    matrix = np.asarray(matrix)
    c, cell, margin = len(labels), 44, 64
    fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    img = Image.new("RGB", (margin + c * cell, margin + c * cell + 14), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((margin, 2), "predicted ->", fill=(0, 0, 0), font=font)
    for j, label in enumerate(labels):
        draw.text((margin + j * cell + 2, 18), label[:7], fill=(0, 0, 0), font=font)
    for i, label in enumerate(labels):
        y = margin + i * cell
        draw.text((2, y + cell // 2 - 6), label[:9], fill=(0, 0, 0), font=font)
        for j in range(c):
            x = margin + j * cell
            shade = int(255 * (1 - 0.8 * fractions[i, j]))
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=(shade, shade, 255))
            draw.text((x + 6, y + cell // 2 - 6), str(int(matrix[i, j])), fill=(0, 0, 0) if shade > 128 else
                      (255, 255, 255), font=font)
    draw.text((2, margin + c * cell + 1), "rows: true relation", fill=(0, 0, 0), font=font)
    return np.asarray(img)[None]


def retrieval_text(sim: np.ndarray, image_ids: np.ndarray, row_ids: np.ndarray, captions: list[str],
                   num_images: int = NUM_SHOWN, k: int = 5) -> str:
    """Markdown: for the first ``num_images`` images (rows of ``sim``: float[I, T], image ids ``image_ids``), their
    top-``k`` captions (columns; caption t belongs to image ``row_ids[t]``), a check mark on their own captions."""
    lines = []
    for i in range(min(num_images, sim.shape[0])):
        own = [captions[t] for t in np.flatnonzero(row_ids == image_ids[i])]
        lines.append(f"**image {int(image_ids[i])}** ({'; '.join(own)})\n")
        for rank, t in enumerate(np.argsort(-sim[i], kind="stable")[:k]):
            mark = "✓" if row_ids[t] == image_ids[i] else "✗"
            lines.append(f"{rank + 1}. {mark} {captions[t]} ({sim[i, t]:.3f})")
        lines.append("")
    return "\n".join(lines)
