"""InternVL's grounding text: writing `<ref>..</ref><box>[[..]]</box>` answers and parsing generated ones."""

import re

import numpy as np
import pytest

from vlm_jax import grounding


def test_well_formed_single_and_multi_box_answers():
    boxes, why = grounding.parse_boxes("<ref>the red circle</ref><box>[[120, 45, 300, 999]]</box>")
    assert why is None
    np.testing.assert_allclose(boxes, [[0.12, 0.045, 0.3, 0.999]], rtol=1e-6)
    boxes, why = grounding.parse_boxes("There are two: <box>[[0, 0, 10, 10], [500,500, 1000 ,1000]]</box> ok")
    assert why is None and boxes.shape == (2, 4)
    np.testing.assert_allclose(boxes[1], [0.5, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("answer, reason", [
    ("the circle is on the left", "no <box>"),
    ("<box>[[1, 2, 3]]</box>", "not a list of \\[x1, y1, x2, y2\\]"),
    ("<box>[[1, 2, 3, 4], oops]</box>", "not a list of \\[x1, y1, x2, y2\\]"),
    ("<box>1, 2, 3, 4</box>", "not a list of boxes"),
    ("<box>[[10, 20, 1200, 30]]</box>", "outside 0..1000"),
    ("<box>[[300, 20, 100, 30]]</box>", "x2 < x1"),
    ("<box>[[10, 20, 30, 40]", "no <box>"),  # generation stopped before the closing tag
])
def test_malformed_answers_say_why(answer, reason):
    boxes, why = grounding.parse_boxes(answer)
    assert boxes.shape == (0, 4)
    assert why is not None and re.search(reason, why), why


def test_box_text_round_trips_to_the_nearest_thousandth():
    rng = np.random.default_rng(0)
    xy = np.sort(rng.uniform(size=(5, 2, 2)), axis=1)
    boxes = np.stack([xy[:, 0, 0], xy[:, 0, 1], xy[:, 1, 0], xy[:, 1, 1]], axis=1)
    text = grounding.box_text("the blue square", boxes)
    assert text.startswith("<ref>the blue square</ref><box>[[") and text.endswith("]]</box>")
    parsed, why = grounding.parse_boxes(text)
    assert why is None
    np.testing.assert_allclose(parsed, boxes, atol=0.5e-3 + 1e-7)
    assert grounding.box_text(None, [0.1, 0.2, 0.3, 0.4]) == "<box>[[100, 200, 300, 400]]</box>"
