"""InternVL's grounding text: `<ref>expression</ref><box>[[x1, y1, x2, y2]]</box>`, coordinates as integers in
0..1000 of the image's width and height.

`box_text` writes the answer for normalised xyxy boxes (generative targets); `parse_boxes` reads the boxes of a
generated answer back as normalised xyxy, and says when it cannot, so an evaluator counts unparsable answers
instead of dropping them.
"""

from __future__ import annotations

import re

import numpy as np

SCALE = 1000  # InternVL's grounding coordinates: 0..1000 of the image side

_BOX_BLOCK = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_ONE_BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*"
                      r"(-?\d+(?:\.\d+)?)\s*\]")


def box_text(expression: str | None, boxes) -> str:
    """`<ref>expression</ref><box>[[x1, y1, x2, y2], ...]</box>` for normalised xyxy boxes float[4] or float[K, 4]
    (rounded to 0..1000; `expression` None leaves out the ref part)."""
    rows = np.clip(np.rint(np.asarray(boxes, np.float64).reshape(-1, 4) * SCALE), 0, SCALE).astype(int)
    inner = ", ".join("[" + ", ".join(str(v) for v in row) + "]" for row in rows)
    ref = "" if expression is None else f"<ref>{expression}</ref>"
    return f"{ref}<box>[{inner}]</box>"


def parse_boxes(text: str) -> tuple[np.ndarray, str | None]:
    """(float64[K, 4] normalised xyxy boxes of the answer's first `<box>` block, None) or (float[0, 4], why).

    A block must hold one or more `[x1, y1, x2, y2]` lists inside an outer `[...]`, numbers in 0..1000 with
    x1 <= x2 and y1 <= y2; anything else is unparsable (the reason says what was wrong)."""
    empty = np.zeros((0, 4), np.float32)
    block = _BOX_BLOCK.search(text)
    if block is None:
        return empty, "no <box>...</box> in the answer"
    body = block.group(1).strip()
    if not (body.startswith("[") and body.endswith("]")):
        return empty, f"box block {body!r} is not a list of boxes"
    inner = body[1:-1].strip()
    found = list(_ONE_BOX.finditer(inner))
    if not found or _ONE_BOX.sub("", inner).replace(",", "").strip():
        return empty, f"box block {body!r} is not a list of [x1, y1, x2, y2]"
    boxes = np.asarray([[float(v) for v in m.groups()] for m in found], np.float64)
    if np.any(boxes < 0) or np.any(boxes > SCALE):
        return empty, f"box block {body!r} has coordinates outside 0..{SCALE}"
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        return empty, f"box block {body!r} has x2 < x1 or y2 < y1"
    return boxes / SCALE, None


def grounding_accuracy(answers, true_boxes, threshold: float = 0.5) -> dict:
    """RefCOCO's metric: the fraction of expressions whose answer's first box has IoU >= threshold with the truth.

    answers: N generated texts; true_boxes: float[N, 4] normalised xyxy. An unparsable answer counts as wrong (never
    dropped). Returns {"acc": correct / N, "unparsable": count, "mean_iou": over parsed answers (NaN if none),
    "iou": float32[N] (0 where unparsable), "reasons": {index: why} of the unparsable ones}.
    """
    true_boxes = np.asarray(true_boxes, np.float64).reshape(-1, 4)
    if len(answers) != len(true_boxes):
        raise ValueError(f"grounding_accuracy: {len(answers)} answers for {len(true_boxes)} true boxes")
    iou = np.zeros(len(answers), np.float64)
    reasons = {}
    for i, (answer, truth) in enumerate(zip(answers, true_boxes)):
        boxes, why = parse_boxes(answer)
        if why is not None:
            reasons[i] = why
            continue
        iou[i] = _iou(boxes[0], truth)
    parsed = np.ones(len(answers), bool)
    parsed[list(reasons)] = False
    return {"acc": float(np.mean(iou >= threshold)) if len(answers) else float("nan"),
            "unparsable": len(reasons), "mean_iou": float(iou[parsed].mean()) if parsed.any() else float("nan"),
            "iou": iou.astype(np.float32), "reasons": reasons}


def _iou(a, b) -> float:
    wh = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None)
    inter = wh[0] * wh[1]
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
