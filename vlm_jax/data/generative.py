"""Generative targets: a question about the image and its answer, for the language-model task (`vlm_jax.tasks.lm`).

Kinds (`KINDS`), each made from fields the records already hold:
  caption    "Describe the image." -> the caption (every dataset);
  grounding  InternVL's grounding question about the caption's subject (its referring expression on RefCOCO) ->
             `<ref>subject</ref><box>[[x1, y1, x2, y2]]</box>` in 0..1000 coordinates (`vlm_jax.grounding`), for
             captions with a box;
  relation   "Where is the <subject> relative to the <reference>?" -> "left" | "right" | "above" | "below" |
             "inside" | "outside" (`relations.RELATIONS`), for captions that relate two named objects.
A kind the record cannot answer falls back to the caption. The answer is split into named spans (`SPANS`): the
grounding answer's `<box>` part is the span "box", the rest of each answer the span of its kind, so the loss can
weight them apart and log each.

A sequence is the chat template's prompt (image block first, then the question) followed by the answer and EOS;
labels are the answer's tokens and EOS (-100 elsewhere: template, image block, question, padding).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from vlm_jax import grounding
from vlm_jax.data.datasets import relations

KINDS = ("caption", "grounding", "relation")
SPANS = ("caption", "grounding", "relation", "box")  # span id k + 1 on a token = SPANS[k]; 0 = not an answer
IGNORE_INDEX = -100
CAPTION_QUESTION = "Describe the image."
GROUNDING_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"
RELATION_QUESTION = "Where is the {} relative to the {}?"


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str
    question: str
    answer: tuple[tuple[str, str], ...]  # (text, span name) pieces, in order

    @property
    def answer_text(self) -> str:
        return "".join(text for text, _ in self.answer)


def make_target(record: dict, k: int, kind: str) -> Target:
    """The `kind` question about caption k of `record` and its answer (the caption when the record cannot answer
    that kind)."""
    if kind not in KINDS:
        raise ValueError(f"generative target kind must be one of {KINDS}, got {kind!r}")
    subject = _text(record["subjects"][k]) if "subjects" in record else ""
    if kind == "grounding" and subject and bool(record["has_box"][k]):
        box = grounding.box_text(None, record["boxes"][k])
        return Target(kind, GROUNDING_QUESTION.format(subject), ((f"<ref>{subject}</ref>", kind), (box, "box")))
    if kind == "relation" and subject and "references" in record and bool(record["has_relation"][k]):
        reference = _text(record["references"][k])
        name = relations.RELATIONS[int(record["relations"][k])]
        return Target(kind, RELATION_QUESTION.format(subject, reference), ((name, kind),))
    return Target("caption", CAPTION_QUESTION, ((_text(record["captions"][k]), "caption"),))


def encode(prompts, target: Target, num_tiles: int) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, span ids) of the prompt + answer + EOS; `prompts` a `PromptBuilder` (its template and image
    tokens) without a length limit: `truncate` cuts the answer, never the question."""
    prompts = copy.copy(prompts)
    prompts.max_length = None
    prompt = prompts.prompt_ids(target.question, num_tiles)
    if prompts.template == "plain":
        prompt = prompt[:-1] + _tokens(prompts, "\n")  # plain ends with EOS; the answer follows on a new line
    ids, spans = list(prompt), [0] * len(prompt)
    for text, span in target.answer:
        piece = _tokens(prompts, text)
        ids += piece
        spans += [SPANS.index(span) + 1] * len(piece)
    ids.append(prompts.eos_id)
    spans.append(spans[-1])
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
    return ids, labels, spans


def _tokens(prompts, text: str) -> list[int]:
    return list(prompts.tokenizer.encode(text, add_special_tokens=False))


def longest_sequence(prompts, image_tokens: int, text_tokens: int) -> int:
    """A bound on any target's tokens: the image block, the longest question's own words with a subject and a
    reference of `text_tokens` each, an answer of `text_tokens` with the widest box, and the template (16)."""
    questions = (CAPTION_QUESTION, GROUNDING_QUESTION.format(""), RELATION_QUESTION.format("", ""))
    question = max(len(_tokens(prompts, q)) for q in questions)
    box = len(_tokens(prompts, "<ref></ref>" + grounding.box_text(None, [1.0, 1.0, 1.0, 1.0])))
    return image_tokens + question + 3 * text_tokens + box + 16


def truncate(ids: list[int], labels: list[int], spans: list[int], limit: int, eos_id: int):
    """The sequence cut to `limit` tokens from the end of the answer, EOS kept; None when even the prompt does not
    fit (the caller names the example)."""
    if len(ids) <= limit:
        return ids, labels, spans
    answer_start = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
    if answer_start + 1 >= limit:
        return None
    return ids[: limit - 1] + [eos_id], labels[: limit - 1] + [eos_id], spans[: limit - 1] + [spans[limit - 2]]


def pick_kind(kinds: tuple[str, ...], rng: np.random.Generator | None, index: int) -> str:
    """A kind for one example: drawn with `rng` in training, the index's turn in a fixed cycle in evaluation."""
    if rng is not None:
        return kinds[int(rng.integers(len(kinds)))]
    return kinds[index % len(kinds)]
