"""`losses.next_token_loss` against transformers' own `labels=` loss on a random InternVL with images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures
import vlm_jax
from vlm_jax import losses


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(checkpoint, our model, pixels, ids, mask, labels): prompt, image and padding tokens labelled -100."""
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("lm_loss"), "transformers", seed=6)
    px, ids, mask = fixtures.padded_batch(ckpt, num_images=(1, 2), padding="right", length=40, seed=6)
    labels = np.where(mask == 1, ids, losses.IGNORE_INDEX)
    labels[:, :3] = losses.IGNORE_INDEX  # a prompt that is not predicted
    labels[ids >= ckpt.vocab_size - 3] = losses.IGNORE_INDEX  # image block tokens
    return ckpt, vlm_jax.load_pretrained(ckpt.path), px, ids, mask, labels


def _transformers_loss(ckpt, px, ids, mask, labels):
    import torch

    with torch.no_grad():
        out = ckpt.model(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2).contiguous(),
                         input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         labels=torch.from_numpy(labels))
    return float(out.loss)


def test_next_token_loss_equals_transformers_labels_loss_also_chunked(case):
    ckpt, model, px, ids, mask, labels = case
    reference = _transformers_loss(ckpt, px, ids, mask, labels)
    out = model.module(jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))
    full = losses.next_token_loss(out.logits, jnp.asarray(labels))
    assert float(full["loss"]) == pytest.approx(reference, rel=1e-5)
    assert float(full["tokens"]) == np.sum(labels[:, 1:] != losses.IGNORE_INDEX)
    # Chunked: logits of 7 positions at a time from the hidden states (T - 1 is not a multiple of 7).
    assert (ids.shape[1] - 1) % 7
    chunked = jax.jit(lambda h, y: losses.next_token_loss(h, y, head=model.module.logits, chunk_size=7))
    got = chunked(out.hidden, jnp.asarray(labels))
    assert float(got["loss"]) == pytest.approx(reference, rel=1e-5)
    grad_full = jax.grad(lambda h: losses.next_token_loss(h, jnp.asarray(labels), head=model.module.logits)["loss"])
    grad_chunk = jax.grad(lambda h: chunked(h, jnp.asarray(labels))["loss"])
    np.testing.assert_allclose(grad_chunk(out.hidden), grad_full(out.hidden), rtol=1e-4, atol=1e-7)


def test_weights_and_spans_are_direct_sums(case):
    ckpt, model, px, ids, mask, labels = case
    logits = np.asarray(model.module(jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask)).logits, np.float64)
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.2, 2.0, labels.shape)
    span = np.zeros(labels.shape, bool)
    span[:, 10:20] = True
    out = losses.next_token_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(weights),
                                 spans={"teacher": jnp.asarray(span)}, chunk_size=5)
    # Direct: log-softmax in float64, position t scored on labels[t + 1].
    x, y = logits[:, :-1], labels[:, 1:]
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    counted = y != losses.IGNORE_INDEX
    ce = -np.take_along_axis(logp, np.where(counted, y, 0)[..., None], -1)[..., 0]
    expected = np.sum(np.where(counted, weights[:, 1:] * ce, 0)) / counted.sum()
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)
    in_span = counted & span[:, 1:]
    assert float(out["teacher"]) == pytest.approx(ce[in_span].mean(), rel=1e-5)
    assert float(out["teacher_tokens"]) == in_span.sum()
