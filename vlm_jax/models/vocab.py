"""Growing the model's vocabulary with the tokenizer: new special tokens get embedding rows (and logits).

Legend: V vocabulary size, D LM width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def add_special_tokens(tokenizer, model, tokens: Sequence[str]) -> list[int]:
    """Adds `tokens` (e.g. task tokens) to the tokenizer as special tokens and grows `model` (an InternVL) to match.

    New embedding rows (and lm_head columns, when untied) start at the mean over the tokenizer's existing tokens
    (mean resizing: a new token starts as an "average" token instead of a random direction with an arbitrary logit).
    Rows that already exist beyond the old tokenizer length (checkpoints pad their vocabulary) are reused and
    re-initialised the same way. `model.config` (and the LM's) gets the new vocab size, so saving the model with
    its config and the tokenizer with `save_pretrained` keeps them consistent.
    Returns the ids of `tokens` (existing tokens keep theirs and are left untouched).
    """
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    old_len = len(tokenizer)
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if not new:
        return ids
    new_ids = np.asarray(tokenizer.convert_tokens_to_ids(new))
    lm = model.language_model
    embed = lm.embed_tokens[...]  # [V, D]
    size = max(embed.shape[0], len(tokenizer))
    known = min(old_len, embed.shape[0])

    def grow(matrix, axis):
        """Pads `axis` to `size` and writes the mean of the known entries at the new ids."""
        mean = jnp.mean(jnp.take(matrix, jnp.arange(known), axis=axis).astype(jnp.float32), axis=axis, keepdims=True)
        pad = [(0, 0)] * matrix.ndim
        pad[axis] = (0, size - matrix.shape[axis])
        grown = jnp.pad(matrix, pad)
        index = [slice(None)] * matrix.ndim
        index[axis] = new_ids
        return grown.at[tuple(index)].set(mean.astype(matrix.dtype))

    lm.embed_tokens.set_value(grow(embed, 0))
    if model.lm_head is not None:
        model.lm_head.kernel.set_value(grow(model.lm_head.kernel[...], 1))  # [D, V]
    text = dataclasses.replace(model.config.text, vocab_size=size)
    model.config = model.config.replace(text=text)
    lm.cfg = text
    return ids
