"""Prompts: chat templates, `<image>` expansion, truncation that keeps image blocks whole, and padded batches.

Each `<image>` placeholder in a text becomes `<img>` + `<IMG_CONTEXT>` x (num_image_tokens x tiles) + `</img>`,
in order, one per image. Templates:

- "internvl2_5" (InternVL2.5/3 chat): `[<|im_start|>system\\n{system}<|im_end|>\\n]<|im_start|>user\\n{text}<|im_end|>
  \\n<|im_start|>assistant\\n[{answer}<|im_end|>]`. The system block is left out unless `system_message` is given,
  as in transformers' InternVL chat template; pass `INTERNVL_SYSTEM_MESSAGE` to reproduce the original `chat()`.
  Texts without any `<image>` get one `<image>\\n` per image in front, as `chat()` does.
- "plain" (tiny demo models): `{image blocks}{text}<|im_end|>`.

No BOS is added (Qwen2 tokenizers define none). Truncation removes tokens from the end of the text after the last
image block, keeping the template's closing tokens; if that is not enough the sample is an error, never a cut image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax import tokenizer as tok

IMAGE_PLACEHOLDER = "<image>"
INTERNVL_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
TEMPLATES = ("internvl2_5", "plain")


class PromptBuilder:
    """Builds token ids for captions and image prompts.

    Args:
      tokenizer: a transformers tokenizer with the InternVL special tokens.
      num_image_tokens: `<IMG_CONTEXT>` tokens per tile (256 for InternVL3 at 448px).
      template: "internvl2_5" or "plain".
      max_length: token limit per sequence (None = no limit).
      system_message: internvl2_5 only; None leaves the system block out.
      padding_side: default side for `batch` ("right" for training, "left" for generation).

    `num_truncated` counts the sequences shortened so far (read it after building a dataset split).
    """

    def __init__(self, tokenizer, num_image_tokens: int, template: str = "internvl2_5",
                 max_length: int | None = None, *, system_message: str | None = None,
                 padding_side: str = "right"):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        _check_side(padding_side)
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.template = template
        self.max_length = max_length
        self.system_message = system_message
        self.padding_side = padding_side
        self.num_truncated = 0
        vocab = tokenizer.get_vocab()
        needed = [tok.IMG_START, tok.IMG_END, tok.IMG_CONTEXT]
        if template == "internvl2_5":
            needed += [tok.IM_START, tok.IM_END]
        missing = [t for t in needed if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks {missing} (needed by the {template!r} template)")
        self.img_start_id, self.img_end_id, self.img_context_id = (vocab[t] for t in needed[:3])
        # EOS is <|im_end|> for InternVL tokenizers; other tokenizers (plain template) fall back to their own.
        self.eos_id = vocab.get(tok.IM_END, tokenizer.eos_token_id)
        if self.eos_id is None:
            raise ValueError(f"tokenizer has neither {tok.IM_END} nor an eos token")
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("tokenizer has no pad token")

    # ---- single sequences -------------------------------------------------------------------------------------

    def caption_ids(self, text: str, *, index: int | None = None) -> list[int]:
        """Caption tokens + EOS (the text tower input); truncated to max_length keeping EOS."""
        if IMAGE_PLACEHOLDER in text:
            raise ValueError(f"{_name(index)}: caption contains {IMAGE_PLACEHOLDER!r}; use prompt_ids for images")
        ids = self._encode(text)
        if self.max_length is not None and len(ids) + 1 > self.max_length:
            ids = ids[: max(self.max_length - 1, 0)]
            self.num_truncated += 1
        return ids + [self.eos_id]

    def format_prompt(self, text: str, num_images: int = 1, *, answer: str | None = None,
                      index: int | None = None) -> str:
        """The template applied to `text`, with `<image>` placeholders still unexpanded."""
        return self._format(text, num_images, answer, index, IMAGE_PLACEHOLDER)[0]

    def prompt_ids(self, text: str, num_tiles: int | Sequence[int] | None = 1, *, answer: str | None = None,
                   index: int | None = None) -> list[int]:
        """Template prompt with image blocks expanded.

        num_tiles: tiles per image, in `<image>` order (an int = one image; None or [] = text only).
        answer: internvl2_5 only; appended after the assistant header with `<|im_end|>` (supervised targets).
        index: sample index used in error messages.
        """
        tiles = _tiles_list(num_tiles, index)
        # Images become an empty `<img></img>` pair: both are special tokens, so the tokenizer splits there exactly
        # as it would around a full block, and the `<IMG_CONTEXT>` run is inserted afterwards.
        string, (lo, hi) = self._format(text, len(tiles), answer, index, tok.IMG_START + tok.IMG_END)
        enc = self.tokenizer(string, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if self.template == "plain":
            ids.append(self.eos_id)
            offsets.append((len(string), len(string)))
        total = len(ids) + self.num_image_tokens * sum(tiles)
        if self.max_length is not None and total > self.max_length:
            excess = total - self.max_length
            # Only tokens wholly inside the text after the last image may go (contiguous; cut from the end).
            cuttable = [k for k, (a, b) in enumerate(offsets) if lo <= a and b <= hi and b > a]
            if len(cuttable) < excess:
                raise ValueError(
                    f"{_name(index)}: {total} tokens exceed max_length={self.max_length} and cannot be truncated "
                    "without cutting an image block or the template; raise max_length or use fewer tiles"
                )
            drop = set(cuttable[len(cuttable) - excess:])
            ids = [i for k, i in enumerate(ids) if k not in drop]
            self.num_truncated += 1
        out, image = [], 0
        for i in ids:
            out.append(i)
            if i == self.img_start_id:
                out.extend([self.img_context_id] * (self.num_image_tokens * tiles[image]))
                image += 1
        return out

    # ---- batches ----------------------------------------------------------------------------------------------

    def batch(self, sequences: Sequence[Sequence[int]], *, padding_side: str | None = None,
              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pads id lists into (ids int32[B, L], mask int32[B, L]); mask 1 = real token.

        length: fixed L (static shapes); None = the longest sequence. A sequence longer than L is an error.
        """
        side = padding_side or self.padding_side
        _check_side(side)
        longest = max((len(s) for s in sequences), default=0)
        length = longest if length is None else length
        ids = np.full((len(sequences), length), self.pad_id, np.int32)
        mask = np.zeros((len(sequences), length), np.int32)
        for i, seq in enumerate(sequences):
            n = len(seq)
            if n > length:
                raise ValueError(f"{_name(i)}: {n} tokens do not fit the batch length {length}")
            span = slice(0, n) if side == "right" else slice(length - n, length)
            ids[i, span] = seq
            mask[i, span] = 1
        return ids, mask

    def batch_prompts(self, texts: Sequence[str], num_tiles: Sequence[int | Sequence[int] | None] | None = None,
                      *, padding_side: str | None = None, length: int | None = None):
        """`prompt_ids` for every text (errors name the sample index), then `batch`."""
        if num_tiles is None:
            num_tiles = [1] * len(texts)
        if len(num_tiles) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(num_tiles)} num_tiles entries")
        seqs = [self.prompt_ids(t, n, index=i) for i, (t, n) in enumerate(zip(texts, num_tiles))]
        return self.batch(seqs, padding_side=padding_side, length=length)

    # ---- internals --------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _format(self, text: str, num_images: int, answer: str | None, index: int | None,
                image_str: str) -> tuple[str, tuple[int, int]]:
        """(template string with each image written as `image_str`, char span of the text after the last image)."""
        for special in (tok.IMG_START, tok.IMG_END, tok.IMG_CONTEXT):
            if special in text or (answer and special in answer):
                raise ValueError(f"{_name(index)}: text contains {special!r}; write images as {IMAGE_PLACEHOLDER!r}")
        count = text.count(IMAGE_PLACEHOLDER)
        if count == 0 and num_images:
            # As InternVL's chat(): images go first when the text does not place them.
            text = (IMAGE_PLACEHOLDER + ("\n" if self.template == "internvl2_5" else "")) * num_images + text
        elif count != num_images:
            more = "more" if count > num_images else "fewer"
            raise ValueError(
                f"{_name(index)}: {count} {IMAGE_PLACEHOLDER} tags but {num_images} images ({more} tags than images)"
            )
        if answer is not None and self.template != "internvl2_5":
            raise ValueError("answer= is only meaningful for the internvl2_5 template")
        head = tail = ""
        if self.template == "internvl2_5":
            if self.system_message is not None:
                head = f"{tok.IM_START}system\n{self.system_message}{tok.IM_END}\n"
            head += f"{tok.IM_START}user\n"
            tail = f"{tok.IM_END}\n{tok.IM_START}assistant\n"
            if answer is not None:
                tail += answer + tok.IM_END
        body = text.replace(IMAGE_PLACEHOLDER, image_str)
        lo = len(head) + (body.rfind(image_str) + len(image_str) if num_images else 0)
        return head + body + tail, (lo, len(head) + len(body))


def _tiles_list(num_tiles, index: int | None) -> list[int]:
    if num_tiles is None:
        return []
    tiles = [num_tiles] if isinstance(num_tiles, (int, np.integer)) else list(num_tiles)
    if any(int(n) < 1 for n in tiles):
        raise ValueError(f"{_name(index)}: num_tiles must be >= 1 per image, got {tiles}")
    return [int(n) for n in tiles]


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")


def _name(index: int | None) -> str:
    return "prompt" if index is None else f"sample {index}"

