"""Tokenizer and prompt building, checked against transformers' InternVLProcessor (which expands
`<IMG_CONTEXT>` placeholders with GotOcr2's tile counts) and the chat format written in the InternVL spec."""


import numpy as np
import PIL.Image
import pytest
import transformers

from vlm_jax import tokenizer
from vlm_jax.data import preprocess, prompt

WORDS = ["a", "red", "blue", "square", "circle", "left", "of", "the", "what", "is", "this", "describe", "image"]
TILE = 16
TOKENS_PER_TILE = 3


@pytest.fixture(scope="module")
def tok():
    return tokenizer.build_demo_tokenizer(WORDS)


@pytest.fixture(scope="module")
def hf_processor(tok):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    class ImageOnlyInternVLProcessor(transformers.InternVLProcessor):
        # Its video processor needs torchvision (not installed); nothing here uses videos.
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    images = GotOcr2ImageProcessorPil(
        crop_to_patches=True, size={"height": TILE, "width": TILE}, min_patches=1, max_patches=12,
        image_mean=list(preprocess.IMAGENET_MEAN), image_std=list(preprocess.IMAGENET_STD),
    )
    return ImageOnlyInternVLProcessor(image_processor=images, tokenizer=tok, video_processor=None,
                                      image_seq_length=TOKENS_PER_TILE)


# (text, image sizes): no images, one, two in the text, images not placed in the text.
SAMPLES = [
    ("what is this?", [(40, 16)]),
    ("describe <image> and <image> left of the circle", [(10, 10), (16, 50)]),
    ("a red square", []),
    ("<image>\nwhat is the blue circle?", [(33, 33)]),
    ("\n\n  spaces and newlines \n", [(64, 20)]),
]


@pytest.mark.parametrize("template,system", [("internvl2_5", None), ("internvl2_5", "be brief"), ("plain", None)])
def test_ids_match_internvl_processor(tok, hf_processor, template, system):
    builder = prompt.PromptBuilder(tok, TOKENS_PER_TILE, template, system_message=system)
    hf_texts, images, tiles = [], [], []
    for text, sizes in SAMPLES:
        formatted = builder.format_prompt(text, len(sizes))
        if template == "plain":
            formatted += tokenizer.IM_END
        hf_texts.append(formatted.replace(prompt.IMAGE_PLACEHOLDER, tokenizer.IMG_CONTEXT))
        images += [PIL.Image.new("RGB", s, (i * 40, 80, 120)) for i, s in enumerate(sizes)]
        tiles.append([preprocess.num_tiles(w, h, image_size=TILE) for w, h in sizes])
    want = hf_processor(images=images, text=hf_texts, padding=True, return_tensors="np")
    ids, mask = builder.batch_prompts([t for t, _ in SAMPLES], tiles, padding_side="left")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    # Pixel rows line up with the expanded blocks: one <IMG_CONTEXT> run of TOKENS_PER_TILE per tile.
    assert (ids == tok.convert_tokens_to_ids(tokenizer.IMG_CONTEXT)).sum() == TOKENS_PER_TILE * len(
        want["pixel_values"])


def test_internvl2_5_format_is_the_spec_string(tok):
    # InternVL spec section 5: system block, user turn, assistant header.
    builder = prompt.PromptBuilder(tok, TOKENS_PER_TILE, system_message="S")
    assert builder.format_prompt("Q") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.PromptBuilder(tok, 1).format_prompt("Q", 0, answer="A") == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>")
    block = builder.prompt_ids("Q", num_tiles=5)
    ctx = tok.convert_tokens_to_ids(tokenizer.IMG_CONTEXT)
    assert block.count(ctx) == 5 * TOKENS_PER_TILE


def test_caption_ids_end_with_eos(tok):
    builder = prompt.PromptBuilder(tok, TOKENS_PER_TILE, template="plain")
    ids = builder.caption_ids("a red square")
    assert ids == tok("a red square")["input_ids"] + [tok.eos_token_id]
    assert tok.eos_token == tokenizer.IM_END and tok.pad_token == tokenizer.PAD


def test_truncation_keeps_image_blocks_and_counts(tok):
    text = "the red square left of the blue circle " * 3
    full = prompt.PromptBuilder(tok, TOKENS_PER_TILE).prompt_ids(text, 2)
    builder = prompt.PromptBuilder(tok, TOKENS_PER_TILE, max_length=len(full) - 4)
    cut = builder.prompt_ids(text, 2)
    assert len(cut) == len(full) - 4 and builder.num_truncated == 1
    # Same prefix up to the cut, and the template's closing tokens survive.
    tail = tok(f"{tokenizer.IM_END}\n{tokenizer.IM_START}assistant\n", add_special_tokens=False)["input_ids"]
    assert cut[-len(tail):] == tail and full[-len(tail):] == tail
    assert cut[: -len(tail)] == full[: len(cut) - len(tail)]
    builder.prompt_ids("a", 1)  # fits: not counted
    assert builder.num_truncated == 1
    # Too little room for the image block: an error naming the sample, never a cut block.
    tight = prompt.PromptBuilder(tok, TOKENS_PER_TILE, max_length=10)
    with pytest.raises(ValueError, match="sample 1.*max_length=10"):
        tight.batch_prompts(["a", "a"], [None, 4])
    # Text before the only image cannot be cut either.
    with pytest.raises(ValueError, match="cannot be truncated"):
        prompt.PromptBuilder(tok, 1, "plain", max_length=6).prompt_ids("a red square <image>", 1)
    captions = prompt.PromptBuilder(tok, 1, "plain", max_length=3)
    assert captions.caption_ids("a red square circle") == tok("a red")["input_ids"] + [tok.eos_token_id]
    assert captions.num_truncated == 1


def test_image_tag_mismatch_names_the_sample(tok):
    builder = prompt.PromptBuilder(tok, TOKENS_PER_TILE)
    with pytest.raises(ValueError, match="sample 2: 2 <image> tags but 1 images \\(more tags"):
        builder.batch_prompts(["a", "b", "<image> and <image>"], [1, 1, 1])
    with pytest.raises(ValueError, match="fewer tags"):
        builder.prompt_ids("<image>", [1, 2])
    with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
        builder.prompt_ids("literal <IMG_CONTEXT>", None)
    with pytest.raises(ValueError, match="template"):
        prompt.PromptBuilder(tok, 1, template="chatml")
    with pytest.raises(ValueError, match=">= 1"):
        prompt.PromptBuilder(tok, 0)


def test_batch_padding_sides_and_fixed_length(tok):
    builder = prompt.PromptBuilder(tok, 1, padding_side="right")
    ids, mask = builder.batch([[5, 6, 7], [8]], length=5)
    pad = tok.pad_token_id
    np.testing.assert_array_equal(ids, [[5, 6, 7, pad, pad], [8, pad, pad, pad, pad]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    ids, mask = builder.batch([[5, 6, 7], [8]], padding_side="left")
    np.testing.assert_array_equal(ids, [[5, 6, 7], [pad, pad, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="sample 0"):
        builder.batch([[1, 2, 3]], length=2)
    assert ids.dtype == np.int32 and mask.dtype == np.int32


def test_demo_tokenizer_words_roundtrip_and_determinism(tok, tmp_path):
    for word in WORDS:
        assert len(tok(word)["input_ids"]) == 1 and len(tok(" " + word)["input_ids"]) == 1, word
    text = "Zebra: 12 €, naïve 图像 <img></img> the  red\tsquare\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte fallback: any text survives
    specials = [tok.convert_tokens_to_ids(t) for t in tokenizer.SPECIAL_TOKENS]
    assert len(set(specials)) == len(specials) and all(i < len(tok) for i in specials)
    again = tokenizer.build_demo_tokenizer(list(reversed(WORDS)) + ["red"])
    assert again.get_vocab() == tok.get_vocab()

    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    mine = tokenizer.load_tokenizer(tmp_path)
    assert mine.get_vocab() == tok.get_vocab()
    assert (mine.pad_token, mine.eos_token, mine.context_image_token) == (
        tokenizer.PAD, tokenizer.IM_END, tokenizer.IMG_CONTEXT)


def test_make_tokenizer_names_the_demo_or_a_directory(tmp_path):
    demo = tokenizer.make_tokenizer("demo")
    assert demo.get_vocab() == tokenizer.build_demo_tokenizer(tokenizer.DEMO_WORDS).get_vocab()
    demo.save_pretrained(tmp_path)
    assert tokenizer.make_tokenizer(str(tmp_path)).get_vocab() == demo.get_vocab()
    with pytest.raises(ValueError, match="does not exist"):
        tokenizer.make_tokenizer("dem0")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        tokenizer.load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="no tokenizer files"):
        tokenizer.load_tokenizer(tmp_path)
    # A tokenizer without the InternVL image tokens is refused by name.
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="lacks InternVL image tokens"):
        tokenizer.load_tokenizer(tmp_path / "plain")
