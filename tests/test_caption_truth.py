"""Which captions are true of which images (vlm_jax.caption_truth), and what depends on it: true negatives only in
the ITM sampler and the contrastive loss, retrieval hits on any true image, the oracle ceilings, the ITM metrics.

References: a brute-force truth written here pair by pair with `relations.relation_from_boxes`, the generator's own
captions, direct formulas, scipy's Mann-Whitney U, enumeration of every tie order."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from vlm_jax import caption_truth as ct
from vlm_jax import losses, metrics
from vlm_jax.data.datasets import relations as rel
from vlm_jax.data.datasets import spatial_shapes
from vlm_jax.tasks.itm import sample_hard_negatives

VERBS = dict(zip(range(6), spatial_shapes.CAPTION_VERBS))


def caption(subject, relation, reference):
    return f"the {subject} {VERBS[relation]} the {reference}"


def brute_truth(objects: dict, own_captions: set, text: str, subject: str, reference: str, relation: int) -> int:
    """The module docstring's rules for one pair, in plain Python (rule 1 is `text in own_captions` here too)."""
    if text in own_captions:
        return ct.TRUE
    if subject not in objects or reference not in objects:
        return ct.FALSE
    s, r = objects[subject], objects[reference]
    label = rel.relation_from_boxes(s, r)
    dx = (s[0] + s[2]) / 2 - (r[0] + r[2]) / 2
    dy = (s[1] + s[3]) / 2 - (r[1] + r[3]) / 2
    major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if label in (rel.INSIDE, rel.OUTSIDE) or (major > 0 and major >= 1.25 * minor):
        return ct.TRUE if relation == label else ct.FALSE
    if major == 0:
        candidates = {rel.LEFT, rel.RIGHT, rel.ABOVE, rel.BELOW}
    else:
        candidates = {rel.RIGHT if dx > 0 else rel.LEFT, rel.BELOW if dy > 0 else rel.ABOVE}
    return ct.AMBIGUOUS if relation in candidates else ct.FALSE


def scene_batch(scenes, captions, num_objects=4):
    """Batch fields for rows (scene i, caption i): scenes = [{name: box}], captions = [(subject, relation, reference)]."""
    keys = np.full((len(scenes), num_objects), ct.NO_KEY, np.int32)
    boxes = np.zeros((len(scenes), num_objects, 4), np.float32)
    for i, scene in enumerate(scenes):
        for n, (name, box) in enumerate(scene.items()):
            keys[i, n], boxes[i, n] = ct.text_key(name), box
    return {
        "image_id": np.arange(len(scenes), dtype=np.int32),
        "caption_key": np.asarray([ct.text_key(caption(*c)) for c in captions], np.int32),
        "subject_key": np.asarray([ct.text_key(c[0]) for c in captions], np.int32),
        "reference_key": np.asarray([ct.text_key(c[2]) for c in captions], np.int32),
        "relation": np.asarray([c[1] for c in captions], np.int32),
        "has_relation": np.ones(len(captions), bool),
        "scene_keys": keys, "scene_boxes": boxes,
    }


def test_hand_built_scenes_true_false_ambiguous():
    left = {"red circle": (0.0, 0.4, 0.2, 0.6), "blue square": (0.6, 0.4, 0.8, 0.6)}  # clearly left, same height
    diagonal = {"red circle": (0.0, 0.0, 0.2, 0.2), "blue square": (0.3, 0.32, 0.5, 0.52)}  # dx 0.3, dy 0.32
    nested = {"red circle": (0.4, 0.4, 0.5, 0.5), "blue square": (0.2, 0.2, 0.8, 0.8)}
    other = {"green cross": (0.6, 0.0, 0.8, 0.2), "blue square": (0.6, 0.6, 0.8, 0.8)}  # cross clearly above
    scenes = [left, diagonal, nested, other]
    own = [("red circle", rel.LEFT, "blue square"), ("red circle", rel.ABOVE, "blue square"),
           ("red circle", rel.INSIDE, "blue square"), ("green cross", rel.ABOVE, "blue square")]
    queries = own + [("blue square", rel.RIGHT, "red circle"), ("red circle", rel.LEFT, "blue square"),
                     ("red circle", rel.BELOW, "blue square"), ("blue square", rel.OUTSIDE, "red circle")]
    batch = scene_batch(scenes, own)
    captions = scene_batch(scenes + scenes, queries)
    images = {"image_id": batch["image_id"], "scene_keys": batch["scene_keys"], "scene_boxes": batch["scene_boxes"]}
    own_text = batch["caption_key"][:, None] == captions["caption_key"][None, :]  # each image has one caption here
    truth = np.asarray(ct.truth_matrix(images, {k: v for k, v in captions.items() if not k.startswith("scene")},
                                       own_text))
    T, F, A = ct.TRUE, ct.FALSE, ct.AMBIGUOUS
    # Columns: the four own captions (image ids 0..3), then "blue right of red", "red left of blue", "red below
    # blue", "blue around red" (image ids 4..7: no image of the batch).
    expected = np.array([
        [T, F, F, F, T, T, F, F],   # clearly left: the mirrored statement is true, "above" is false
        [A, T, F, F, A, A, F, F],   # diagonal offset: left / right-mirror ambiguous; its own "above" true by rule 1
        [F, F, T, F, F, F, F, T],   # nested: only inside / around
        [F, F, F, T, F, F, F, F],   # no red circle
    ])
    np.testing.assert_array_equal(truth, expected)
    for i, scene in enumerate(scenes):
        for t, (s, r_, o) in enumerate(queries):
            if t == i:
                continue  # rule 1 (same image id)
            assert truth[i, t] == brute_truth(scene, {caption(*own[i])}, caption(s, r_, o), s, o, r_), (i, t)


def test_without_scene_only_same_image_and_same_text_are_not_negatives():
    batch = {"image_id": np.array([0, 1, 2, 0], np.int32),
             "caption_key": np.array([ct.text_key("A dog."), ct.text_key("a  dog"), ct.text_key("a cat"),
                                      ct.text_key("a bird")], np.int32)}
    truth = np.asarray(ct.batch_truth(batch))
    assert ct.text_key("A dog.") == ct.text_key(" a dog")  # normalised: case, spaces, final full stop
    expected = np.array([[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 1]])
    np.testing.assert_array_equal(truth, expected)


def test_every_generated_caption_is_true_of_its_image_and_truth_agrees_with_the_labeller():
    config = spatial_shapes.make_config(image_size=64, num_train=60, num_validation=1, num_test=1)
    records = [spatial_shapes.generate_example(config, "train", i) for i in range(60)]
    for r in records:
        objects = dict(zip(r["object_names"], r["object_boxes"]))
        for k in range(len(r["captions"])):
            s, o = r["subjects"][k], r["references"][k]
            got = ct.relation_truth(jnp.int32(r["relations"][k]), jnp.asarray(objects[s]), jnp.asarray(objects[o]))
            assert int(got) == ct.TRUE, r["captions"][k]
    # Random boxes: where the truth is TRUE for a relation, relation_from_boxes gives that relation.
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, size=(2000, 2, 2))
    boxes = np.concatenate([xy.min(1), xy.max(1)], -1).astype(np.float32).reshape(1000, 2, 4)
    labels = np.asarray([rel.relation_from_boxes(s, r) for s, r in boxes])
    for relation in range(6):
        truth = np.asarray(ct.relation_truth(jnp.full(1000, relation), boxes[:, 0], boxes[:, 1]))
        assert not np.any((truth == ct.TRUE) & (labels != relation))
        brute = [brute_truth({"a": s, "b": r}, set(), "", "a", "b", relation) for s, r in boxes]
        np.testing.assert_array_equal(truth, brute)


def random_scenes(rng, n):
    """Scenes of 2-3 objects of only 4 kinds, so captions true of other images are common."""
    kinds = ["red circle", "red square", "blue circle", "blue square"]
    scenes, captions = [], []
    for _ in range(n):
        names = list(rng.choice(kinds, size=rng.integers(2, 4), replace=False))
        scene = {}
        for name in names:
            x, y = rng.uniform(0, 0.7, size=2)
            size = rng.uniform(0.1, 0.3)
            scene[str(name)] = (float(x), float(y), float(x + size), float(y + size))
        s, o = rng.choice(len(names), size=2, replace=False)
        subject, reference = names[s], names[o]
        captions.append((subject, rel.relation_from_boxes(scene[subject], scene[reference]), reference))
        scenes.append(scene)
    return scenes, captions


def test_sampler_never_draws_a_true_or_ambiguous_pair():
    rng = np.random.default_rng(1)
    drawn = 0
    sample = jax.jit(sample_hard_negatives)
    for trial in range(40):
        scenes, captions = random_scenes(rng, 12)
        batch = scene_batch(scenes, captions)
        negatives = ct.batch_truth(batch) == ct.FALSE
        sim = jnp.asarray(rng.normal(size=(12, 12)) * 5, jnp.float32)
        key = jax.random.key(trial) if trial % 4 else None  # sampled, and the argmax of evaluation
        neg = sample(sim, batch["image_id"], key, None, negatives)
        brute = np.array([[brute_truth(scenes[i], {caption(*captions[i])}, caption(*captions[j]), captions[j][0],
                                       captions[j][2], captions[j][1]) if i != j else ct.TRUE
                           for j in range(12)] for i in range(12)])
        for i in range(12):
            assert bool(neg["neg_text_valid"][i]) == bool((brute[i] == ct.FALSE).any())
            if neg["neg_text_valid"][i]:
                assert brute[i, int(neg["neg_text"][i])] == ct.FALSE
                drawn += 1
            assert bool(neg["neg_image_valid"][i]) == bool((brute[:, i] == ct.FALSE).any())
            if neg["neg_image_valid"][i]:
                assert brute[int(neg["neg_image"][i]), i] == ct.FALSE
        assert (brute != ct.FALSE).sum() > 12  # the scenes do produce captions true of other images
    assert drawn > 300


def test_contrastive_loss_leaves_non_negatives_out_of_the_denominator():
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    negatives = ~np.eye(5, dtype=bool)
    negatives[0, 3] = negatives[2, 1] = False  # caption 3 is true of image 0, caption 1 of image 2
    got = losses.contrastive_loss(jnp.asarray(u), jnp.asarray(v), 10.0, negatives=jnp.asarray(negatives))
    un = u / np.linalg.norm(u, axis=1, keepdims=True)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    logits = 10.0 * un @ vn.T
    keep = negatives | np.eye(5, dtype=bool)
    i2t = np.mean([-logits[i, i] + np.log(np.sum(np.exp(logits[i][keep[i]]))) for i in range(5)])
    t2i = np.mean([-logits[j, j] + np.log(np.sum(np.exp(logits[:, j][keep[:, j]]))) for j in range(5)])
    np.testing.assert_allclose(float(got["i2t"]), i2t, rtol=1e-5)
    np.testing.assert_allclose(float(got["t2i"]), t2i, rtol=1e-5)


def test_split_truth_groups_captions_by_image():
    scenes, captions = random_scenes(np.random.default_rng(3), 6)
    rows = scene_batch(scenes + scenes[:2], captions + [captions[3], captions[4]])
    rows["image_id"] = np.array([5, 3, 9, 1, 0, 7, 5, 3], np.int32)  # the last two rows: more captions of 5 and 3
    truth, ids, text_to_image = ct.split_truth(rows)
    np.testing.assert_array_equal(ids, [0, 1, 3, 5, 7, 9])
    np.testing.assert_array_equal(ids[text_to_image], rows["image_id"])
    scene_of = {int(i): scenes[r] for r, i in enumerate(rows["image_id"][:6])}
    for a, image in enumerate(ids):
        own = {caption(*c) for c, i in zip(captions + [captions[3], captions[4]], rows["image_id"]) if i == image}
        for t, c in enumerate(captions + [captions[3], captions[4]]):
            expected = ct.TRUE if rows["image_id"][t] == image else brute_truth(
                scene_of[int(image)], own, caption(*c), c[0], c[2], c[1])
            assert truth[a, t] == expected, (a, t)


def test_recall_on_true_pairs_matches_the_strict_protocol_when_only_own_images_are_true():
    rng = np.random.default_rng(4)
    sim = rng.normal(size=(7, 15))
    text_to_image = np.concatenate([np.arange(7), rng.integers(0, 7, size=8)])
    own = np.zeros((7, 15), bool)
    own[text_to_image, np.arange(15)] = True
    assert metrics.retrieval_recall_true(sim, own) == metrics.retrieval_recall(sim, text_to_image)
    # A caption true of a second image is a hit there too.
    true = own.copy()
    true[2, 0] = True
    sim2 = sim.copy()
    sim2[:, 0] = -5.0
    sim2[2, 0] = 9.0
    assert metrics.retrieval_recall(sim2, text_to_image)["t2i@1"] < metrics.retrieval_recall_true(sim2, true)["t2i@1"]


def test_ceilings_equal_the_oracle_averaged_over_every_tie_order():
    # Toy split: 4 images, 6 captions; true_pairs[i, t]: caption t is true of image i.
    text_to_image = np.array([0, 0, 1, 2, 3, 3])
    true = np.zeros((4, 6), bool)
    true[text_to_image, np.arange(6)] = True
    true[1, 0] = true[2, 0] = True   # caption 0 is also true of images 1 and 2
    true[3, 2] = True                # caption 2 also of image 3
    # Brute force: the oracle ranks the true candidates first in a uniformly random order; average R@1 over all
    # orders of the true candidates.
    t2i = []
    for t in range(6):
        cands = np.flatnonzero(true[:, t])
        hits = [perm[0] == text_to_image[t] for perm in itertools.permutations(cands)]
        t2i.append(np.mean(hits))
    i2t = []
    for i in range(4):
        cands = np.flatnonzero(true[i])
        hits = [text_to_image[perm[0]] == i for perm in itertools.permutations(cands)]
        i2t.append(np.mean(hits))
    got = metrics.retrieval_ceilings(true, text_to_image)
    np.testing.assert_allclose(got["t2i@1"], np.mean(t2i))
    np.testing.assert_allclose(got["i2t@1"], np.mean(i2t))


def test_auc_and_balanced_accuracy_against_direct_formulas():
    rng = np.random.default_rng(5)
    pos = np.round(rng.normal(1.0, 1.0, size=300), 1)  # rounded: ties
    neg = np.round(rng.normal(0.0, 1.0, size=500), 1)
    u = scipy.stats.mannwhitneyu(pos, neg).statistic
    assert metrics.roc_auc(pos, neg) == pytest.approx(u / (300 * 500), abs=1e-12)
    got = metrics.matching_metrics(pos, neg)
    assert got["acc"] == pytest.approx(0.5 * (np.mean(pos > 0) + np.mean(neg <= 0)))
    assert metrics.matching_metrics(np.ones(3), np.zeros(0))["auc"] == 0.5
