"""What a run prints and writes for people: the progress line, the evaluation line, the end-of-run summary, the
TensorBoard tag layout and the evaluation pictures. (A real run's console and event file are checked in
tests/test_train.py.)"""

import json
import logging

import numpy as np
import pytest

from vlm_jax import console, eval_pictures, run_logging, run_summary


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_prints_the_first_step_then_every_20_s_and_the_last_step():
    clock = FakeClock()
    progress = console.Progress(1000, 0, num_evals_left=lambda step: 0, clock=clock)
    clock.now = 30.0  # compilation
    assert progress(1, 4.5) == "step 1/1000 · first step (with compilation) took 30 s · loss 4.5000"
    clock.now = 40.0
    assert progress(101, 4.0) is None  # 10 s since the last line
    clock.now = 50.0
    line = progress(201, 3.25)  # 200 steps in 20 s: 10 steps/s, 799 steps left
    assert line == "step 201/1000 (20 %) · 10.00 steps/s · ETA 1 min 20 s · loss 3.2500"
    clock.now = 51.0
    assert progress(1000, 3.0).startswith("step 1000/1000 (100 %)")


def test_progress_rate_leaves_out_evaluation_time_and_the_eta_adds_the_evaluations_to_come():
    clock = FakeClock()
    progress = console.Progress(300, 100, num_evals_left=lambda step: 2, clock=clock)
    clock.now = 5.0
    progress(101, 1.0)
    clock.now = 45.0
    progress.add_eval_time(20.0)  # 20 s of the 40 were an evaluation
    line = progress(201, 1.0)  # 100 steps in 20 s of training: 5 steps/s; 99 / 5 s + 2 x 20 s evaluations
    assert "5.00 steps/s" in line and "ETA 1 min 00 s" in line


def test_duration_and_headline():
    assert [console.duration(s) for s in (7, 65, 7322)] == ["7 s", "1 min 05 s", "2 h 02 min"]
    line = console.headline("validation", 40, {"t2i_r1": 0.25, "box_iou": 0.5, "loss/total": 2.0}, ["t2i_r1",
                                                                                                   "absent"], 3)
    assert line == "validation @ step 40: t2i_r1 0.250 · loss 2.0000 (3 s)"


def test_console_shows_vlm_jax_info_and_everyone_s_warnings():
    keep = console.OwnInfoOnly()

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "m", None, None)

    assert keep.filter(record(f"{console.PACKAGE_DIR}/train.py", logging.INFO))
    assert not keep.filter(record("/site-packages/jax/_src/xla_bridge.py", logging.INFO))
    assert keep.filter(record("/site-packages/orbax/checkpoint/x.py", logging.WARNING))


def test_tensorboard_tags_keep_losses_apart_and_write_nothing_twice():
    summary = {"total": 3.0, "itc": 2.0, "itc_logit_scale": 14.0, "itm_acc": 0.5, "grad_norm": 1.0,
               "grad_norm/all": 1.0, "lr/all": 1e-3, "nonfinite": 0, "steps_per_sec": 4.0}
    tags = run_logging.train_tags(summary, {"itc_logit_scale", "itm_acc"})
    assert tags == {"loss/train/total": 3.0, "loss/train/itc": 2.0, "train/itc_logit_scale": 14.0,
                    "train/itm_acc": 0.5, "train/grad_norm": 1.0, "train/lr/all": 1e-3, "train/nonfinite": 0,
                    "train/steps_per_sec": 4.0}
    two_groups = run_logging.train_tags({"grad_norm/a": 1.0, "grad_norm/b": 2.0}, ())
    assert two_groups == {"train/grad_norm/a": 1.0, "train/grad_norm/b": 2.0}
    assert run_logging.eval_tags("validation", {"loss/total": 2.0, "t2i_r1": 0.1}) == {
        "loss/validation/total": 2.0, "validation/t2i_r1": 0.1}


def test_evaluation_results_hold_losses_under_loss_and_diagnostics_as_metrics():
    from vlm_jax import evaluate
    from vlm_jax.tasks import TASKS

    class Box(TASKS["box"]):
        def __init__(self):  # metrics only: no parameters needed
            pass

        def metrics(self, collected):
            return {"box_giou": 0.3}

    results = evaluate.compute_metrics([Box()], {"loss_terms": {"box": 1.0, "box_l1": 0.2, "box_giou": 0.31,
                                                                 "box_num_boxes": 64.0, "total": 1.0}})
    assert results == {"box_giou": 0.3, "loss/box": 1.0, "loss/box_l1": 0.2, "box_num_boxes": 64.0,
                       "loss/total": 1.0}


def test_summary_table_of_the_last_training_evaluation(tmp_path):
    records = [dict(step=10, split="validation", t2i_r1=0.1, **{"chance/t2i_r1": 0.01, "loss/total": 3.0}),
               dict(step=20, split="validation", t2i_r1=0.2, num_images=64, **{"chance/t2i_r1": 0.01,
                                                                                  "loss/total": 2.5}),
               dict(step=20, split="test", t2i_r1=0.3, **{"ceiling/t2i_r1": 0.6}),
               dict(step=20, split="validation", t2i_r1=0.9, mode="eval")]  # --mode eval: not the run's own
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    step, results = run_summary.last_evaluations(str(tmp_path))
    assert step == 20 and results["validation"]["t2i_r1"] == 0.2 and results["test"]["t2i_r1"] == 0.3
    table = run_summary.metrics_table(results)
    assert table[0].split() == ["metric", "validation", "test"]
    assert table[1].split() == ["t2i_r1", "0.2000", "(chance", "0.0100)", "0.3000", "(ceiling", "0.6000)"]
    assert table[2].split() == ["loss/total", "2.5000", "-"]  # losses last; counts left out
    assert len(table) == 3


def test_box_picture_draws_the_true_box_in_green_where_it_is():
    image = np.full((64, 64, 3), 128, np.uint8)
    picture = eval_pictures.boxes_picture(image, "the red circle", [0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.1, 0.1])
    scale = eval_pictures.PANEL
    assert picture.shape[1] == scale and picture.shape[0] > scale  # caption strip below
    x0, y0 = int(0.25 * scale), int(0.5 * scale)
    assert tuple(picture[y0 + 10, x0]) == eval_pictures.TRUE_COLOUR  # left edge of the true box
    assert tuple(picture[y0 + 10, x0 + 10]) == (128, 128, 128)  # inside: the image
    assert tuple(picture[2, int(0.1 * scale) - 1]) == eval_pictures.PRED_COLOUR  # right edge of the prediction


def test_retrieval_text_marks_a_caption_of_the_image_itself():
    sim = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])  # 2 images x 3 captions
    text = eval_pictures.retrieval_text(sim, np.array([7, 9]), np.array([7, 9, 7]), ["a", "b", "c"], k=2)
    lines = [line for line in text.splitlines() if line]
    assert lines == ["**image 7** (a; c)", "1. ✗ b (0.900)", "2. ✓ c (0.500)",
                     "**image 9** (b)", "1. ✗ a (0.800)", "2. ✗ c (0.300)"]


def test_confusion_picture_is_one_image():
    picture = eval_pictures.confusion_picture(np.array([[3, 1], [0, 4]]), ["left", "right"])
    assert picture.dtype == np.uint8 and picture.ndim == 4 and picture.shape[0] == 1 and picture.shape[-1] == 3


@pytest.mark.parametrize("images", [1, 3])
def test_stack_pads_pictures_to_one_height(images):
    pictures = [np.zeros((10 + i, 5, 3), np.uint8) for i in range(images)]
    out = eval_pictures.stack(pictures)
    assert out.shape == (images, 9 + images, 5, 3) and (out[0, 10:] == 255).all()
