"""Growing the vocabulary: new special tokens get mean-initialised embedding rows and logits, and survive saving."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlm_jax
from vlm_jax import tokenizer
from vlm_jax.checkpoints import converted, random_hf
from vlm_jax.models import vocab as vocab_lib
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.internvl import InternVL

WORDS = ["a", "red", "blue", "square", "circle", "left", "of", "the"]


@pytest.mark.parametrize("tied", [False, True])
def test_add_special_tokens_grows_model_with_mean_rows(tied):
    tok_local = tokenizer.build_demo_tokenizer(WORDS)
    vocab = len(tok_local)
    config = InternVLConfig.tiny(vocab_size=vocab, image_token_id=vocab - 1, tie_word_embeddings=tied)
    model = InternVL(config, rngs=nnx.Rngs(0))
    embed0 = np.asarray(model.language_model.embed_tokens[...])
    head0 = None if tied else np.asarray(model.lm_head.kernel[...])
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, config.text.hidden_size)), jnp.float32)
    logits0 = np.asarray(model.logits(hidden))

    got = vocab_lib.add_special_tokens(tok_local, model, ["<ref>", "</ref>", "red"])
    assert got[2] == tok_local.convert_tokens_to_ids("red")  # existing token untouched
    assert got[:2] == [vocab, vocab + 1] and len(tok_local) == vocab + 2
    assert tok_local("<ref>red</ref>")["input_ids"] == [vocab, got[2], vocab + 1]  # not split
    embed = np.asarray(model.language_model.embed_tokens[...])
    assert embed.shape == (vocab + 2, embed0.shape[1]) and model.config.text.vocab_size == vocab + 2
    np.testing.assert_array_equal(embed[:vocab], embed0)
    np.testing.assert_allclose(embed[vocab:], np.broadcast_to(embed0.mean(0), (2, embed0.shape[1])), atol=1e-7)
    if not tied:
        head = np.asarray(model.lm_head.kernel[...])
        np.testing.assert_allclose(head[:, vocab:], np.repeat(head0.mean(1, keepdims=True), 2, 1), atol=1e-6)
    # Old tokens score exactly as before; new ids embed and get logits.
    logits = np.asarray(model.logits(hidden))
    assert logits.shape == (1, 3, vocab + 2)
    np.testing.assert_allclose(logits[..., :vocab], logits0, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.language_model.embed(jnp.asarray([got[:2]]))[0], embed[vocab:])
    assert vocab_lib.add_special_tokens(tok_local, model, ["<ref>"]) == [vocab]  # idempotent
    assert model.language_model.embed_tokens[...].shape[0] == vocab + 2


def test_added_tokens_are_saved_with_the_converted_checkpoint(tmp_path):
    """The grown model + tokenizer round-trip through the converted (orbax) format used by load_pretrained."""
    tok_local = tokenizer.build_demo_tokenizer(WORDS)
    vocab = len(tok_local)
    config = InternVLConfig.tiny(vocab_size=vocab, image_token_id=vocab - 1)
    model = random_hf.random_model(config)
    new_ids = vocab_lib.add_special_tokens(tok_local, model, ["<ref>", "</ref>"])
    converted.save(str(tmp_path), model.config, model)
    tok_local.save_pretrained(tmp_path)

    loaded = vlm_jax.load_pretrained(str(tmp_path))
    reloaded_tok = tokenizer.load_tokenizer(str(tmp_path))
    assert loaded.config.text.vocab_size == vocab + 2
    assert reloaded_tok.convert_tokens_to_ids(["<ref>", "</ref>"]) == new_ids
    np.testing.assert_array_equal(np.asarray(loaded.module.language_model.embed_tokens[...]),
                                  np.asarray(model.language_model.embed_tokens[...]))
    ids = jnp.asarray([[new_ids[0], 3, new_ids[1]]], jnp.int32)
    out = loaded(pixel_values=None, input_ids=ids, attention_mask=jnp.ones_like(ids))
    assert out.logits.shape == (1, 3, vocab + 2)
