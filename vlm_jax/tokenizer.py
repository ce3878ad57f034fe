"""Tokenizers: the checkpoint's own (offline) and a small deterministic demo tokenizer for tests and the demo.

The tokenizer belongs to the model: its ids size the embedding table and name the image token, so the model side
chooses it (`make_tokenizer`) and the data side takes it from there.

The demo tokenizer is a byte-level BPE like Qwen2's: any text encodes (unknown words fall back to bytes) and decodes
back exactly; every given word becomes a single token. It carries InternVL's special tokens and names them the way
transformers' `InternVLProcessor` expects (`start_image_token`, `context_image_token`, ...), so the two can be
compared directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # eos: generation stops here
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO = "<video>"  # unused here; transformers' InternVLProcessor requires the tokenizer to name one

# <IMG_CONTEXT> last, <img> and </img> just before it: the layout of the small test checkpoints (tests/fixtures.py).
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VIDEO, IMG_START, IMG_END, IMG_CONTEXT)

# Attribute names transformers' InternVL processor reads from the tokenizer.
_NAMED_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": VIDEO,
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# The demo tokenizer's words: everything a `spatial_shapes` caption says ("the red circle is left of the blue
# square"), so each caption word is one token. Other datasets still encode (byte fallback), only longer.
DEMO_WORDS = (
    "above", "around", "below", "blue", "circle", "cross", "green", "inside", "is", "left", "of", "orange",
    "purple", "red", "right", "square", "the", "triangle", "yellow",
)


def make_tokenizer(spec: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer `spec` names: "demo" = `build_demo_tokenizer(DEMO_WORDS)`, else a directory with tokenizer
    files (a converted checkpoint's; see `load_tokenizer`)."""
    if spec == "demo":
        return build_demo_tokenizer(DEMO_WORDS)
    return load_tokenizer(spec)


def _byte_level_pieces(word: str) -> list[str]:
    """The byte-level pieces `word` is split into, with and without a leading space."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = []
    for text in (word, " " + word):
        pieces.extend(piece for piece, _ in pre.pre_tokenize_str(text))
    return pieces


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE: repeatedly merge the lowest-ranked adjacent pair (leftmost first)."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_demo_tokenizer(words: Iterable[str]) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE over the 256 byte symbols plus one token per given word (bare and space-prefixed).

    Deterministic: the vocabulary and merges depend only on the order-free set of words. Ids: bytes first, then
    word pieces (sorted), then the special tokens; pad = <|endoftext|>, eos = <|im_end|>, no bos.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    ranks: dict[tuple[str, str], int] = {}
    # The chat template's role names are always whole tokens, so prompts stay short.
    words = list(words) + ["system", "user", "assistant"]
    for piece in sorted({p for w in words for p in _byte_level_pieces(w)}):
        # Merge whatever segmentation the merges so far leave, until the piece is one token. Each new merge ranks
        # after all earlier ones, so it never changes how earlier pieces are merged.
        symbols = _apply_merges(list(piece), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(ranks)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = _apply_merges(symbols, ranks)
    merges = sorted(ranks, key=ranks.get)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        model_max_length=8192,
        **_NAMED_TOKENS,
    )


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in `checkpoint_dir` (offline; no remote code).

    Raises ValueError when the directory holds no tokenizer files, or when the tokenizer lacks the image tokens
    (`<img>`, `</img>`, `<IMG_CONTEXT>`). The chat tokens are checked by `PromptBuilder` for the template used.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise ValueError(f"tokenizer directory {checkpoint_dir!r} does not exist")
    if not any(os.path.exists(os.path.join(checkpoint_dir, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"{checkpoint_dir!r} holds no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        checkpoint_dir, local_files_only=True, trust_remote_code=False
    )
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer in {checkpoint_dir!r} lacks InternVL image tokens {missing}")
    return tokenizer
