"""README "Try it without a real checkpoint": its commands and Python snippet run as written, and what the snippet
builds agrees with transformers on the same directory: the inputs with `InternVLProcessor` (GotOcr2 tiling, the
checkpoint's chat template), the logits with `InternVLForConditionalGeneration` (PyTorch)."""

import importlib
import pathlib
import re
import shlex

import numpy as np
import transformers

from vlm_jax import pretrained, tokenizer
from vlm_jax.data import preprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
HEADING = "## Try it without a real checkpoint"
README_DIR = "/tmp/vlm_jax_random"  # the section's output directory (its converted copy adds a suffix)


def section_blocks(lang: str) -> list[str]:
    """The ```lang fenced blocks of the README section under HEADING, in order."""
    text = (REPO / "README.md").read_text()
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def run_commands(block: str, out: str) -> list[str]:
    """Runs each `python -m vlm_jax.X ARGS` line of a bash block in-process (`X.main(ARGS)`), README_DIR -> out."""
    modules = []
    for line in block.splitlines():
        if not line.startswith("python -m "):
            continue
        argv = shlex.split(line.replace(README_DIR, out))
        importlib.import_module(argv[2]).main(argv[3:])
        modules.append(argv[2])
    return modules


def reference_processor(path: str, image_size: int, tokens_per_tile: int, max_tiles: int):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    class ImageOnlyInternVLProcessor(transformers.InternVLProcessor):
        # Its video processor needs torchvision (not installed); no videos here.
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    images = GotOcr2ImageProcessorPil(
        crop_to_patches=True, size={"height": image_size, "width": image_size}, min_patches=1,
        max_patches=max_tiles, image_mean=list(preprocess.IMAGENET_MEAN), image_std=list(preprocess.IMAGENET_STD))
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return ImageOnlyInternVLProcessor(image_processor=images, tokenizer=tok, video_processor=None,
                                      image_seq_length=tokens_per_tile)


def test_try_section_runs_as_written_and_matches_transformers(tmp_path):
    import torch

    out = str(tmp_path / "random")
    (bash,), (snippet,) = section_blocks("bash"), section_blocks("python")
    assert run_commands(bash, out) == ["vlm_jax.random_checkpoint", "vlm_jax.convert"]
    assert f'path = "{README_DIR}"' in snippet, "the snippet should set its checkpoint directory as `path`"
    ns = {}
    exec(compile(snippet.replace(README_DIR, out), "README.md (Try it without a real checkpoint)", "exec"), ns)

    # The inputs, as transformers' processor builds them from the checkpoint's own tokenizer and chat template.
    hf_config = transformers.AutoConfig.from_pretrained(out)
    vision = hf_config.vision_config
    size = vision.image_size[0]
    tokens_per_tile = int((size // vision.patch_size[0] * hf_config.downsample_ratio) ** 2)
    processor = reference_processor(out, size, tokens_per_tile, max_tiles=4)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    chat = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # InternVL2.5/3 chat format, written out from its specification.
    assert chat == "<|im_start|>user\n<IMG_CONTEXT>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n"
    want = processor(images=[ns["image"]], text=[chat], return_tensors="np")
    inputs = ns["inputs"]
    np.testing.assert_array_equal(inputs["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(inputs["attention_mask"], want["attention_mask"])
    want_px = want["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    np.testing.assert_allclose(inputs["pixel_values"], want_px, atol=1e-5)
    context_id = processor.tokenizer.convert_tokens_to_ids(tokenizer.IMG_CONTEXT)
    num_tiles = want_px.shape[0]
    assert num_tiles == 3  # a 160x96 image on at most 4 tiles: a 2x1 grid + thumbnail
    assert int((inputs["input_ids"] == context_id).sum()) == tokens_per_tile * num_tiles
    assert inputs["input_ids"].dtype == np.int32 and inputs["pixel_values"].dtype == np.float32

    # The logits, as transformers' PyTorch model computes them from the same files.
    model = transformers.InternVLForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(want["pixel_values"]), input_ids=torch.from_numpy(want["input_ids"]),
                    attention_mask=torch.from_numpy(want["attention_mask"])).logits.numpy()
    logits = np.asarray(ns["logits"])
    # The shape the snippet's comment states.
    assert "float32[1, {}, {}]".format(*logits.shape[1:]) in snippet
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    # The converted copy gives the same logits and carries the tokenizer.
    converted = out + "_jax"
    np.testing.assert_array_equal(np.asarray(pretrained.load_pretrained(converted)(**inputs).logits), logits)
    assert tokenizer.load_tokenizer(converted).convert_tokens_to_ids(tokenizer.IMG_CONTEXT) == context_id

    assert ns["sim"].shape == (1, 2) and np.all(np.abs(ns["sim"]) <= 1 + 1e-5)
    assert ns["answer"].token_ids and len(ns["answer"].token_ids) <= 8
