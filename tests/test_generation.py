"""Generation against transformers' `generate` on a small random InternVL, and KV-cache decoding against full
recomputation."""

import numpy as np
import PIL.Image
import pytest
import torch

import jax
import jax.numpy as jnp

import fixtures
from vlm_jax import generation, inference, tokenizer
from vlm_jax.data import preprocess
from vlm_jax.pretrained import PretrainedInternVL, load_module

WORDS = ["a", "red", "square", "circle", "what", "is", "this", "left", "of", "the"]
NEVER = -1  # an eos id no token equals: generation runs for exactly max_new_tokens
NEW = 12  # one max_new_tokens for most tests, so they share compiled programs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tokenizer.build_demo_tokenizer(WORDS)
    # The fixture puts <IMG_CONTEXT> at vocab_size - 1, as the demo tokenizer does.
    ckpt = fixtures.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("gen"), "transformers",
                                               vocab_size=len(tok), seed=3)
    assert ckpt.image_token_id == tok.convert_tokens_to_ids(tokenizer.IMG_CONTEXT)
    model, _ = load_module(ckpt.path)
    return tok, ckpt, model


def _hf_generate(ckpt, ids, mask, px, new, eos):
    kwargs = dict(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                  attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
                  max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=eos)
    if px is not None:
        kwargs["pixel_values"] = torch.from_numpy(px).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        out = ckpt.model.generate(**kwargs)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("with_images", [True, False])
def test_greedy_matches_transformers(setup, with_images):
    tok, ckpt, model = setup
    px, ids, mask = fixtures.padded_batch(ckpt, num_images=(1, 2), length=20, padding="left", seed=1)
    if not with_images:
        px = None
        ids = np.where(ids >= ckpt.vocab_size - 3, 5, ids)  # image tokens -> plain text
    want = _hf_generate(ckpt, ids, mask, px, NEW, eos=None)
    got = generation.generate_ids(model, ids, mask, px, max_new_tokens=NEW, eos_token_id=NEVER, pad_token_id=0)
    assert want.shape == (2, NEW)
    np.testing.assert_array_equal(got, want)


def test_kv_cache_decode_equals_full_recomputation(setup):
    tok, ckpt, model = setup
    px, ids, mask = fixtures.padded_batch(ckpt, num_images=(2, 1), length=18, padding="left", seed=2)
    got = generation.generate_ids(model, ids, mask, px, max_new_tokens=NEW, eos_token_id=NEVER, pad_token_id=0)
    # One cache-free forward over prompt + generated tokens (same positions: cumsum of the mask): greedy decoding
    # is right iff each generated token is the argmax of the full forward's logits one position earlier.
    seq = np.concatenate([ids, got], 1)
    m = np.concatenate([mask, np.ones_like(got)], 1)
    embeds = model.merge_image_embeddings(jnp.asarray(seq), model.image_embeddings(jnp.asarray(px)))
    pos = np.maximum(np.cumsum(m, -1) - 1, 0)
    hidden, _ = model.language_model(inputs_embeds=embeds, attention_mask=jnp.asarray(m), positions=jnp.asarray(pos))
    logits = np.asarray(model.logits(hidden))
    t = ids.shape[1]
    np.testing.assert_array_equal(logits[:, t - 1:-1].argmax(-1), got)
    # And the cache's own logits agree with the full forward's at the first generated position.
    # (padded to the bucket generate_ids used, so the compiled prefill is reused)
    graphdef, state = generation.nnx.split(model)
    width = inference.bucket_pow2(t, minimum=generation.MIN_PROMPT_BUCKET)
    pad = ((0, 0), (width - t, 0))
    first, _, _ = generation._prefill(graphdef, state, jnp.asarray(px), jnp.asarray(np.pad(ids, pad), jnp.int32),
                                      jnp.asarray(np.pad(mask, pad), jnp.int32), cache_len=width + NEW)
    np.testing.assert_allclose(np.asarray(first), logits[:, t - 1], atol=1e-4, rtol=1e-4)


def test_generate_end_to_end_matches_transformers_and_stops_at_eos(setup):
    tok, ckpt, model = setup
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 70, 3), dtype=np.uint8))
    result = generation.generate(model, tok, [image], "what is this?", max_new_tokens=NEW)
    tiles = preprocess.dynamic_tiles(image, ckpt.image_size)
    assert tiles.shape[0] > 1  # several tiles + thumbnail
    ids = np.asarray([result.prompt_ids])
    eos = tok.convert_tokens_to_ids(tokenizer.IM_END)
    want = _hf_generate(ckpt, ids, np.ones_like(ids), tiles, NEW, eos=eos)[0].tolist()
    if eos in want:
        want = want[: want.index(eos) + 1]
    assert result.token_ids == want
    assert result.text == tok.decode(want, skip_special_tokens=True)
    # The plain template continues the text (its prompt does not end with EOS).
    plain = generation.generate(model, tok, [image], "a red", max_new_tokens=NEW, template="plain")
    assert plain.prompt_ids[-1] != eos and plain.prompt_ids[0] == tok.convert_tokens_to_ids(tokenizer.IMG_START)
    ids_plain = np.asarray([plain.prompt_ids])
    want = _hf_generate(ckpt, ids_plain, np.ones_like(ids_plain), tiles, NEW, eos=eos)[0].tolist()
    assert plain.token_ids == (want[: want.index(eos) + 1] if eos in want else want)
    # Stopping: with EOS forced as the most likely next token after the first, generation ends there.
    first = result.token_ids[0]
    out = generation.generate_ids(model, ids, np.ones_like(ids), tiles, max_new_tokens=NEW, eos_token_id=first,
                                  pad_token_id=tok.pad_token_id)[0]
    assert out[0] == first and (out[1:] == tok.pad_token_id).all()


def test_no_recompile_within_a_bucket(setup):
    tok, ckpt, model = setup
    _, ids, mask = fixtures.padded_batch(ckpt, num_images=(0, 0), length=20, seed=3)
    generation.generate_ids(model, ids, mask, None, max_new_tokens=NEW, eos_token_id=NEVER, pad_token_id=0)
    compiled = lambda: (generation._prefill._cache_size(), generation._decode._cache_size())  # noqa: E731
    before = compiled()
    for cut in (1, 3):  # shorter prompts, same 32-token bucket, and other sampling settings
        generation.generate_ids(model, ids[:, cut:], mask[:, cut:], None, max_new_tokens=NEW, eos_token_id=NEVER,
                                pad_token_id=0, sampling=generation.SamplingParams(0.7, 5, 0.9, seed=cut))
    # load_pretrained's wrapper is accepted and holds the same module: still nothing new to compile.
    wrapped = PretrainedInternVL(model, model.config)
    generation.generate_ids(wrapped, ids, mask, None, max_new_tokens=NEW, eos_token_id=NEVER, pad_token_id=0)
    assert compiled() == before


def test_sampling_is_seeded_and_limits_reduce_to_greedy(setup):
    tok, ckpt, model = setup
    _, ids, mask = fixtures.padded_batch(ckpt, num_images=(0, 0), length=20, seed=4)
    run = lambda s: generation.generate_ids(model, ids, mask, None, max_new_tokens=NEW, eos_token_id=NEVER,
                                            pad_token_id=0, sampling=s)
    greedy = run(generation.SamplingParams())
    hot = generation.SamplingParams(temperature=5.0, seed=1)
    np.testing.assert_array_equal(run(hot), run(hot))
    assert (run(hot) != run(generation.SamplingParams(temperature=5.0, seed=2))).any()
    np.testing.assert_array_equal(run(generation.SamplingParams(temperature=5.0, top_k=1)), greedy)
    np.testing.assert_array_equal(run(generation.SamplingParams(temperature=5.0, top_p=1e-6)), greedy)


def test_filters_and_sampling_distribution():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 12)).astype(np.float32) * 2
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    filt = jax.jit(generation._filter_logits)
    for k in (1, 3, 12):
        kept = np.isfinite(np.asarray(filt(jnp.asarray(logits), jnp.int32(k), 1.0)))[0]
        assert set(np.flatnonzero(kept)) == set(order[:k])
    for p in (0.3, 0.6, 0.95):
        kept = np.isfinite(np.asarray(filt(jnp.asarray(logits), jnp.int32(0), p)))[0]
        n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest prefix with mass >= p
        assert set(np.flatnonzero(kept)) == set(order[:n]), p
    # Temperature 1, no filters: frequencies follow softmax(logits).
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.jit(jax.vmap(lambda k: generation._next_token(jnp.asarray(logits), k, 1.0, 0, 1.0)))(keys)
    freq = np.bincount(np.asarray(draws)[:, 0], minlength=12) / len(keys)
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_bad_inputs(setup):
    tok, ckpt, model = setup
    with pytest.raises(ValueError, match="left-padded"):
        generation.generate_ids(model, np.ones((2, 3)), np.asarray([[1, 1, 1], [1, 1, 0]]), None,
                                max_new_tokens=2, eos_token_id=1, pad_token_id=0)
    px, ids, mask = fixtures.padded_batch(ckpt, num_images=(1, 1), length=12, padding="left", seed=5)
    with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
        generation.generate_ids(model, ids, mask, px[:1], max_new_tokens=2, eos_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match="sample|tags"):
        generation.generate(model, tok, [], "<image> what", max_new_tokens=2)
    with pytest.raises(ValueError, match="image 1"):
        generation.generate(model, tok, [np.zeros((4, 4, 3), np.uint8), b"junk"], "hi", max_new_tokens=2)
