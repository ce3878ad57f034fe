"""Spatial relations between two boxes, shared by every dataset that stores a relation label.

Boxes are xyxy in image coordinates (x to the right, y downwards), in pixels or normalised: only ratios and
comparisons are used, so both work as long as the two boxes use the same units.
"""

from collections.abc import Sequence

# Label order is part of the data contract: label i of every dataset and of the spatial head means RELATIONS[i].
RELATIONS = ("left", "right", "above", "below", "inside", "outside")
LEFT, RIGHT, ABOVE, BELOW, INSIDE, OUTSIDE = range(len(RELATIONS))
NUM_RELATIONS = len(RELATIONS)
# A direction between two boxes that are not nested is clear when the centre offset's dominant axis is at least
# this many times the other (|dx| >= 1.25 |dy| reads "left"/"right", not "above"/"below").
CLEAR_AXIS_MARGIN = 1.25


def pair_query(subject: str, reference: str) -> str:
    """The spatial task's query when the relation must come from the image: "the red circle and the blue square"."""
    return f"the {subject} and the {reference}"


def _check_box(name: str, box: Sequence[float]) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"{name}: expected an xyxy box of 4 numbers, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 <= x1 and y0 <= y1):
        raise ValueError(f"{name}: expected x0 <= x1 and y0 <= y1 (xyxy), got {box!r}")
    return x0, y0, x1, y1


def box_within(inner: Sequence[float], outer: Sequence[float]) -> bool:
    """True when `inner` lies within `outer` (shared edges count as within)."""
    ix0, iy0, ix1, iy1 = _check_box("inner", inner)
    ox0, oy0, ox1, oy1 = _check_box("outer", outer)
    return ox0 <= ix0 and oy0 <= iy0 and ix1 <= ox1 and iy1 <= oy1


def relation_from_boxes(subject_xyxy: Sequence[float], reference_xyxy: Sequence[float]) -> int:
    """Index into RELATIONS of "subject is <relation> the reference".

    Rules, in order:
        1. inside: the subject's box lies within the reference's box (edges may touch);
        2. outside: the reference's box lies within the subject's box ("the subject is around the reference");
        3. otherwise the dominant axis of the centre offset d = centre(subject) - centre(reference):
           |dx| >= |dy| gives right (dx > 0) or left (dx <= 0); else below (dy > 0) or above (dy < 0),
           y growing downwards.
    Ties: identical boxes are "inside" (rule 1 wins); |dx| == |dy| counts as horizontal; coinciding centres of boxes
    that are not nested give "left". Builders that want unambiguous labels avoid these cases when sampling.
    """
    sx0, sy0, sx1, sy1 = _check_box("subject", subject_xyxy)
    rx0, ry0, rx1, ry1 = _check_box("reference", reference_xyxy)
    if box_within((sx0, sy0, sx1, sy1), (rx0, ry0, rx1, ry1)):
        return INSIDE
    if box_within((rx0, ry0, rx1, ry1), (sx0, sy0, sx1, sy1)):
        return OUTSIDE
    dx = (sx0 + sx1) / 2 - (rx0 + rx1) / 2
    dy = (sy0 + sy1) / 2 - (ry0 + ry1) / 2
    if abs(dx) >= abs(dy):
        return RIGHT if dx > 0 else LEFT
    return BELOW if dy > 0 else ABOVE
