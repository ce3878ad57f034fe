"""The lm task: generative targets from the pipeline (labels only on answers), its loss against the reference
InternVL forward and the direct cross-entropy formula, and the scoring of generated answers."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixtures import data_config, demo_config
from vlm_jax import build, grounding, runs, sharding
from vlm_jax import tokenizer as tok
from vlm_jax.data import generative, pipeline
from vlm_jax.data.datasets import relations
from vlm_jax.generative_eval import prompts_and_pixels, score
from vlm_jax.trainer import make_trainer

KINDS = ("caption", "grounding", "relation")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = demo_config()
    c.data = data_config(data_dir=str(tmp_path_factory.mktemp("tfds")), builder_config="",
                         builder_params=dict(image_size=64, num_train=16, num_validation=6, num_test=2,
                                             aspect_ratios=(2.0, 1.0)),
                         max_tiles=2, lm_kinds=KINDS)
    c.tasks = {"box": dict(c.tasks.box), "lm": dict(weight=1.0, chunk_size=8,
                                                    span_weights=dict(caption=1.0, grounding=0.5, relation=2.0,
                                                                      box=3.0))}
    c.batch_size, c.eval_batch_size = 8, 8  # a multiple of the 8 test devices
    return c


@pytest.fixture(scope="module")
def setup(config):
    backbone = build.resolve_backbone(config.model)
    inputs = runs.model_inputs(backbone)
    it = runs.make_data(config, inputs, "train", train=True)
    return backbone, inputs, [next(it) for _ in range(3)]


def test_generative_targets_label_only_the_answers(config, setup):
    backbone, inputs, batches = setup
    tokenizer = inputs.tokenizer
    _, source = pipeline.load_source(config.data, "train")
    records = {int(r["image_id"]): r for r in (source[i] for i in range(len(source)))}
    context = tokenizer.convert_tokens_to_ids(tok.IMG_CONTEXT)
    eos = tokenizer.convert_tokens_to_ids(tok.IM_END)
    seen = set()
    for batch, r in ((b, r) for b in batches for r in range(len(b["image_id"]))):
        record = records[int(batch["image_id"][r])]
        ids, labels, spans = batch["lm_ids"][r], batch["lm_labels"][r], batch["lm_spans"][r]
        answer = labels[labels != generative.IGNORE_INDEX]
        start = int(np.argmax(labels != generative.IGNORE_INDEX))
        np.testing.assert_array_equal(answer, ids[start: start + len(answer)])  # labels = the answer's own ids
        assert answer[-1] == eos and batch["lm_mask"][r].sum() == start + len(answer)
        assert (ids[:start] == context).sum() == inputs.num_image_tokens * batch["num_tiles"][r]
        text = tokenizer.decode(answer[:-1])
        kind = KINDS[batch["lm_kind"][r]]
        seen.add(kind)
        # The answer is about one of the record's captions: find it.
        ks = [k for k in range(len(record["captions"])) if generative.make_target(record, k, kind).answer_text == text]
        assert ks, (kind, text)
        k = ks[0]
        if kind == "grounding":
            boxes, why = grounding.parse_boxes(text)
            assert why is None
            np.testing.assert_allclose(boxes[0], record["boxes"][k], atol=0.5 / grounding.SCALE + 1e-6)
            box_span = answer[spans[start: start + len(answer)] == 1 + generative.SPANS.index("box")]
            assert tokenizer.decode(box_span).startswith("<box>")
        elif kind == "relation":
            assert text == relations.RELATIONS[int(record["relations"][k])]
        else:
            assert text in [c.decode() for c in record["captions"]]
    assert seen == set(KINDS)


def test_lm_loss_equals_the_direct_formula_on_the_reference_forward(config, setup):
    """The task's loss = sum over answer tokens of span weight x CE / answer tokens, with logits from InternVL's own
    forward (`InternVL.__call__`, equal to transformers' in the port tests) on each row's tiles and ids."""
    backbone, _, (batch, *_) = setup
    trainer = make_trainer(config, sharding.make_mesh(config.mesh), 10, backbone.config)
    model_state = trainer.init_model_state()
    model = trainer.model(trainer.assemble(model_state, trainer.init_train_items(model_state)))
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    outputs = nnx.jit(lambda m, b: m(b, train=False))(model, jbatch)
    terms = model.tasks["lm"].loss(outputs, jbatch, jnp.ones(len(batch["image_id"]), bool))
    weights = np.asarray([0.0, 1.0, 0.5, 2.0, 3.0])  # span id -> caption, grounding, relation, box
    total, count = 0.0, 0
    forward = nnx.jit(lambda m, px, ids, mask: m.backbone(px, ids, mask).logits)
    for r in range(len(batch["image_id"])):
        tiles = batch["tiles"][batch["row_tiles"][r, : batch["num_tiles"][r]]]
        logits = np.asarray(forward(model, jnp.asarray(tiles), jbatch["lm_ids"][r:r + 1], jbatch["lm_mask"][r:r + 1]),
                            np.float64)[0]
        labels, spans = batch["lm_labels"][r], batch["lm_spans"][r]
        for t in range(len(labels) - 1):
            if labels[t + 1] == generative.IGNORE_INDEX:
                continue
            lse = np.log(np.sum(np.exp(logits[t] - logits[t].max()))) + logits[t].max()
            total += weights[spans[t + 1]] * (lse - logits[t, labels[t + 1]])
            count += 1
    assert float(terms["tokens"]) == count
    np.testing.assert_allclose(float(terms["loss"]), total / count, rtol=2e-5)


def test_generated_answers_are_scored_per_kind():
    answers = ["<ref>the red circle</ref><box>[[100, 200, 400, 600]]</box>", "no box here", "left", "inside ",
               "maybe", "the red circle is left of the blue square", "a caption"]
    kinds = np.asarray([1, 1, 2, 2, 2, 0, 0])
    boxes = np.asarray([[0.1, 0.2, 0.4, 0.5], [0, 0, 1, 1], *[[0, 0, 0, 0]] * 5], np.float32)
    relation = np.asarray([0, 0, relations.LEFT, relations.OUTSIDE, relations.ABOVE, 0, 0])
    captions = [""] * 5 + ["the red circle is left of the blue square", "another caption"]
    got = score(answers, kinds, {"box": boxes, "relation": relation}, captions)
    iou = (0.3 * 0.3) / (0.3 * 0.4)  # [0.1, 0.2, 0.4, 0.6] vs [0.1, 0.2, 0.4, 0.5]
    assert got["grounding"]["acc@0.5"] == 0.5 and got["grounding"]["unparsable"] == 1
    assert got["grounding"]["mean_iou"] == pytest.approx(iou)
    assert got["relation"] == {"acc": 1 / 3, "unparsable": 1, "count": 3}
    assert got["caption"] == {"exact": 0.5, "count": 2}


def test_generation_reads_the_questions_and_every_rows_tiles(config, setup):
    backbone, inputs, (batch, *_) = setup
    prompts = pipeline.make_prompt_builder(config.data, inputs)
    ids, mask, pixels = prompts_and_pixels(batch, prompts.pad_id)
    context = inputs.tokenizer.convert_tokens_to_ids(tok.IMG_CONTEXT)
    assert (ids == context).sum() == len(pixels) * inputs.num_image_tokens == \
        int(batch["num_tiles"].sum()) * inputs.num_image_tokens
    assert (mask[:, -1] == 1).all()  # left-padded: every question ends where the answer would start
    for r in range(len(ids)):  # the question is the labelled sequence's prompt, unchanged
        start = int(np.argmax(batch["lm_labels"][r] != generative.IGNORE_INDEX))
        np.testing.assert_array_equal(ids[r][mask[r] == 1], batch["lm_ids"][r, :start])


def test_the_lm_task_trains_evaluates_and_generates(config, setup):
    """Two train steps on the pipeline's batches, the validation split's metrics, and greedy answers for an eval
    batch: one per valid row, each decoded and scored."""
    import jax

    from vlm_jax import evaluate
    from vlm_jax.generative_eval import generate_split

    backbone, inputs, batches = setup
    trainer = make_trainer(config, sharding.make_mesh(config.mesh), 10, backbone.config)
    model_state = trainer.init_model_state()
    state = trainer.assemble(model_state, trainer.init_train_items(model_state))
    for batch in batches[:2]:
        state, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.mesh), jax.random.key(0))
        assert np.isfinite(float(metrics["lm"])) and float(metrics["lm_tokens"]) > 0
    results = evaluate.compute_metrics(trainer.tasks.values(),
                                       runs.collect_state(trainer, state, config, inputs, "validation"))
    for name in ("lm_loss", "lm_token_acc", "loss/lm"):
        assert np.isfinite(results[name]), name
    assert 0 <= results["lm_token_acc"] <= 1
    prompts = pipeline.make_prompt_builder(config.data, inputs)
    eval_batch = next(runs.make_data(config, inputs, "validation", train=False))
    got = generate_split(trainer.model(state).backbone, inputs.tokenizer, [eval_batch], eos_id=prompts.eos_id,
                         pad_id=prompts.pad_id, max_new_tokens=6)
    assert len(got["answers"]) == int(eval_batch["valid"].sum()) and all(isinstance(a, str) for a in got["answers"])
    scored = score(got["answers"], got["kinds"], got, got["captions"])
    assert scored["num_examples"] == len(got["answers"])
