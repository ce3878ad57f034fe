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


def test_accuracy_on_hand_made_answers_equals_a_direct_iou_count():
    truth = np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.4, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.9, 0.9]])
    answers = ["<ref>a</ref><box>[[100, 100, 500, 500]]</box>",      # exact: IoU 1
               "<box>[[200, 300, 400, 700]]</box>",                   # shifted down by 0.1
               "I cannot tell",                                       # unparsable: wrong, counted
               "<box>[[500, 500, 660, 900], [500, 500, 900, 900]]</box>"]  # the first box is the answer
    result = grounding.grounding_accuracy(answers, truth)

    def iou(a, b):  # written out for these axis-aligned boxes
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    direct = [iou([0.1, 0.1, 0.5, 0.5], truth[0]), iou([0.2, 0.3, 0.4, 0.7], truth[1]), 0.0,
              iou([0.5, 0.5, 0.66, 0.9], truth[3])]
    np.testing.assert_allclose(result["iou"], direct, rtol=1e-6)
    assert direct[1] == pytest.approx(0.6) and direct[3] == pytest.approx(0.4)  # right, wrong
    assert result["acc"] == pytest.approx(2 / 4) and result["unparsable"] == 1 and list(result["reasons"]) == [2]
    assert result["mean_iou"] == pytest.approx(np.mean([direct[0], direct[1], direct[3]]))
