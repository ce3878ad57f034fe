"""The detection task: focal loss vs its formula, matched losses, finite gradients for degenerate boxes, metrics over
images (not caption rows), and a real run of configs/tiny_detection.py at tiny sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fixtures
from vlm_jax import caption_truth, config_files, detection_metrics, losses
from vlm_jax.data.datasets import spatial_shapes
from vlm_jax.tasks import Widths
from vlm_jax.tasks.detection import DetectionTask

NAMES = spatial_shapes.OBJECT_NAMES


def detection_config(**changes):
    cfg = config_files.load_config_file(fixtures.REPO / "configs" / "tiny_detection.py").tasks.detection
    cfg.update(dict(num_queries=6, width=16, num_layers=2, num_heads=2, mlp_dim=16) | changes)
    return cfg


def make_task(**changes):
    return DetectionTask(detection_config(**changes), Widths(vision=8, text=8, embed=8, fused=8), rngs=nnx.Rngs(0))


def test_focal_loss_is_the_papers_formula():
    rng = np.random.default_rng(0)
    logits = np.concatenate([rng.normal(0, 3, 200), [-30.0, 30.0, 0.0]])
    targets = rng.integers(0, 2, logits.shape).astype(np.float64)
    for alpha, gamma in ((0.25, 2.0), (0.5, 0.0), (-1.0, 1.5)):
        p = 1 / (1 + np.exp(-logits))
        p_t = np.where(targets == 1, p, 1 - p)
        alpha_t = 1.0 if alpha < 0 else np.where(targets == 1, alpha, 1 - alpha)
        log_p_t = -np.logaddexp(0.0, np.where(targets == 1, -logits, logits))  # log p_t, stable
        expected = -alpha_t * (1 - p_t) ** gamma * log_p_t
        got = losses.sigmoid_focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), alpha, gamma)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)


def _truth():
    """Two images: 3 and 1 objects (G = 4 slots) with their classes."""
    boxes = np.zeros((2, 4, 4), np.float32)
    boxes[0, :3] = [[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8], [0.2, 0.6, 0.4, 0.9]]
    boxes[1, :1] = [[0.3, 0.2, 0.7, 0.6]]
    classes = np.array([[3, 7, 0, -1], [11, -1, -1, -1]])
    keys = np.where(classes >= 0, [[caption_truth.text_key(NAMES[max(c, 0)]) for c in row] for row in classes],
                    caption_truth.NO_KEY).astype(np.int32)
    return boxes, keys, classes


def test_matched_losses_find_the_queries_that_hold_the_truth():
    task = make_task()
    gt_boxes, keys, classes = _truth()
    q = 6
    # Queries 4, 1, 2 of image 0 and query 5 of image 1 predict the truth exactly, with confident objectness and
    # class; the others are far away and unconfident.
    boxes = np.tile(np.array([0.0, 0.0, 0.05, 0.05], np.float32), (2, q, 1))
    objectness = np.full((2, q), -8.0, np.float32)
    logits = np.zeros((2, q, len(NAMES)), np.float32)
    for b, g, query in ((0, 0, 4), (0, 1, 1), (0, 2, 2), (1, 0, 5)):
        boxes[b, query] = gt_boxes[b, g]
        objectness[b, query] = 8.0
        logits[b, query, classes[b, g]] = 20.0
    gt_valid = keys != caption_truth.NO_KEY
    labels, known = task.gt_classes(jnp.asarray(keys))
    np.testing.assert_array_equal(np.asarray(labels)[gt_valid], classes[gt_valid])
    terms = task.layer_loss(jnp.asarray(boxes), jnp.asarray(objectness), jnp.asarray(logits),
                            jnp.asarray(np.where(gt_valid[..., None], gt_boxes, 0.5)), jnp.asarray(gt_valid),
                            labels, known & gt_valid, jnp.ones(2, bool), jnp.float32(gt_valid.sum()))
    assert float(terms["l1"]) < 1e-6 and abs(float(terms["giou"]) - 1) < 1e-6 and float(terms["class"]) < 1e-6
    # Focal objectness of confident right answers: sum over queries / 4 boxes, direct formula.
    p_obj, p_not = 1 / (1 + np.exp(-8.0)), 1 / (1 + np.exp(-8.0))
    expected = (4 * 0.25 * (1 - p_obj) ** 2 * -np.log(p_obj) + 8 * 0.75 * (1 - p_not) ** 2 * -np.log(p_not)) / 4
    np.testing.assert_allclose(float(terms["objectness"]), expected, rtol=1e-4)


def test_degenerate_boxes_give_finite_gradients():
    task = make_task(classes=())
    gt_boxes, keys, _ = _truth()
    gt_boxes[0, 1] = [0.5, 0.5, 0.5, 0.5]  # a zero-area ground truth
    gt_valid = jnp.asarray(keys != caption_truth.NO_KEY)

    def loss(boxes, objectness):
        labels, known = task.gt_classes(jnp.asarray(keys))
        return task.layer_loss(boxes, objectness, None, jnp.asarray(gt_boxes), gt_valid, labels, known,
                               jnp.ones(2, bool), jnp.float32(4))["loss"]

    point = jnp.full((2, 6, 4), 0.5, jnp.float32)  # every prediction a point, on the degenerate truth itself
    grads = jax.grad(loss, argnums=(0, 1))(point, jnp.zeros((2, 6)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_metrics_count_each_image_once_and_equal_the_evaluator():
    task = make_task()
    gt_boxes, keys, classes = _truth()
    rng = np.random.default_rng(1)
    det_boxes = np.clip(np.repeat(gt_boxes[:, :1], 6, 1) + rng.normal(0, 0.05, (2, 6, 4)), 0, 1).astype(np.float32)
    det_scores = rng.uniform(size=(2, 6)).astype(np.float32)
    labels = rng.integers(0, len(NAMES), (2, 6)).astype(np.int32)
    probs = rng.uniform(size=(2, 6)).astype(np.float32)
    rows = [0, 0, 1]  # image 0 appears twice (two captions)
    collected = {"image_id": np.array([10, 10, 11]), "det_boxes": det_boxes[rows], "det_scores": det_scores[rows],
                 "det_labels": labels[rows], "det_label_probs": probs[rows], "scene_boxes": gt_boxes[rows],
                 "scene_keys": keys[rows]}
    got = task.metrics(collected)
    valid = keys != caption_truth.NO_KEY
    direct = detection_metrics.detection_metrics(det_boxes, det_scores, gt_boxes, valid)
    assert got["detection_AP50"] == pytest.approx(direct["AP50"]) and got["detection_AP"] == pytest.approx(direct["AP"])
    labelled = detection_metrics.detection_metrics(det_boxes, det_scores * probs, gt_boxes, valid, pred_labels=labels,
                                                   gt_labels=np.maximum(classes, 0), num_classes=len(NAMES))
    assert got["detection_class_AP"] == pytest.approx(labelled["AP"])
    collected["scene_keys"] = np.where(keys[rows] == keys[0, 0], caption_truth.text_key("pink moon"), keys[rows])
    with pytest.raises(ValueError, match=r"objects of images \[10\] have names outside tasks.detection.classes"):
        task.metrics(collected)


def test_tiny_detection_config_trains_and_evaluates(tmp_path):
    """configs/tiny_detection.py on spatial_shapes' tiny build: train steps on the real pipeline's batches, then the
    evaluation of the validation split with every metric and the pictures."""
    from vlm_jax import build, runs, sharding
    from vlm_jax.eval_pictures import EvalExamples
    from vlm_jax.trainer import make_trainer

    cfg = config_files.load_config_file(fixtures.REPO / "configs" / "tiny_detection.py")
    cfg.data = fixtures.data_config(data_dir=str(tmp_path / "tfds"))
    cfg.tasks.detection.update(width=16, num_layers=1, mlp_dim=32)  # one layer: the quickest compile
    cfg.batch_size, cfg.eval_batch_size = 8, 64
    backbone = build.resolve_backbone(cfg.model)
    inputs = runs.model_inputs(backbone)
    trainer = make_trainer(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]), 10, backbone.config)
    model_state = trainer.init_model_state()
    state = trainer.assemble(model_state, trainer.init_train_items(model_state))
    batches = runs.make_data(cfg, inputs, "train", train=True)
    for _ in range(2):
        batch = next(batches)
        assert batch["scene_keys"].shape == (8, 4) and (batch["scene_keys"] != caption_truth.NO_KEY).sum(1).min() >= 2
        state, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.mesh), jax.random.key(0))
        assert np.isfinite(float(metrics["detection"])) and float(metrics["detection_num_gt"]) >= 16
    collected = runs.collect_state(trainer, state, cfg, inputs, "validation")
    results = trainer.tasks["detection"].metrics(collected)
    for name in DetectionTask.metric_names:
        assert 0.0 <= results[name] <= 1.0, name
    examples = EvalExamples.load(cfg.data, "validation", collected["image_id"])
    pictures = trainer.tasks["detection"].eval_pictures(collected, examples)["detections"]
    assert pictures.dtype == np.uint8 and pictures.ndim == 4 and len(pictures) >= 3  # 6 rows, 2 captions each
