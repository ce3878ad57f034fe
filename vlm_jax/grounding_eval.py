"""RefCOCO grounding evaluated the InternVL way: the model writes the box as text, which is parsed and scored.

    python -m vlm_jax.grounding_eval --converted_dir DIR --manual_dir REFCOCO_DIR [--builder_config refcoco]
        [--split val] [--max_examples N] [--batch_size 8] [--max_tiles 6] [--output results.json]

The protocol of OpenGVLab InternVL's RefCOCO evaluation (`internvl_chat/eval/refcoco/evaluate_grounding.py`):
- one question per referring expression: `GROUNDING_PROMPT.format(expression)`, in the checkpoint's chat template
  ("internvl2_5" with InternVL's system message, as its `chat()` builds it), the image block first;
- the image as dynamic tiles, up to 6 (`MAX_TILES`) plus the thumbnail, read as stored (no EXIF rotation: COCO's
  boxes are in the stored pixel grid, and InternVL reads images with `Image.open(...).convert("RGB")`);
- greedy decoding (up to 100 new tokens); the answer `<ref>..</ref><box>[[x1, y1, x2, y2]]</box>` gives 0..1000 of
  the image's width (x) and height (y);
- accuracy: the fraction of expressions whose first box has IoU >= 0.5 with the truth; an unparsable answer is
  wrong (`grounding.grounding_accuracy`). The answer is decoded with its special tokens (`<ref>`, `<box>` are
  special in InternVL's tokenizer), and `grounding.parse_boxes` reads the `<box>` block; InternVL, which decodes
  without them, takes the first `[a, b, c, d]` anywhere, so an answer holding a bare list and no `<box>` counts
  there and not here.
Boxes are compared in normalised coordinates (x / width, y / height) on both sides. Scaling x by the width and y by
the height multiplies every area by width x height, so the IoU equals InternVL's, computed in pixels.

    examples = [GroundingExample(image, "man on the left", [0.1, 0.2, 0.4, 0.9]), ...]   # normalised xyxy
    result = evaluate_grounding(model, tokenizer, examples, batch_size=8)
    result["acc"], result["unparsable"], result["mean_iou"], result["per_example"]

Batches: examples are grouped by tile count and every batch has the same number of rows (the last one repeats a
row, whose answer is dropped), so a whole split compiles a handful of programs (one per tile count and prompt
length bucket) instead of one per batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from vlm_jax import generation, grounding
from vlm_jax import tokenizer as tokenizer_lib
from vlm_jax.checkpoints import converted
from vlm_jax.data import preprocess
from vlm_jax.data.prompt import INTERNVL_SYSTEM_MESSAGE, PromptBuilder
from vlm_jax.inference import module_of
from vlm_jax.pretrained import load_pretrained

# The question of InternVL's RefCOCO evaluation, word for word.
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"
MAX_TILES = 6  # InternVL's RefCOCO evaluation: --max-num 6 with --dynamic
MAX_NEW_TOKENS = 100  # as InternVL's evaluation; the loop stops once every row has reached EOS
SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test", "testA": "testA",
          "testB": "testB"}  # command-line names -> the refcoco builder's split names


@dataclasses.dataclass(frozen=True)
class GroundingExample:
    """One referring expression: image (path, encoded bytes, PIL image or uint8[H, W, 3]), the expression and the
    referred object's box float[4], normalised xyxy (x / width, y / height). The ids only label the results."""
    image: object
    expression: str
    box: Sequence[float]
    image_id: int | None = None
    ref_id: int | None = None


def grounding_prompt(expression: str) -> str:
    return GROUNDING_PROMPT.format(expression)


def as_examples(examples: Iterable) -> list[GroundingExample]:
    """GroundingExamples (or (image, expression, box) tuples) checked: a non-empty expression and a box of 4 finite
    values in [0, 1] with x1 <= x2, y1 <= y2. Errors name the example's index."""
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, GroundingExample):
            try:
                ex = GroundingExample(*ex)
            except TypeError as e:
                raise ValueError(f"example {i}: expected a GroundingExample or (image, expression, box), got "
                                 f"{type(ex).__name__}") from e
        if not isinstance(ex.expression, str) or not ex.expression.strip():
            raise ValueError(f"example {i}: the expression must be a non-empty string, got {ex.expression!r}")
        box = np.asarray(ex.box, np.float64)
        if box.shape != (4,) or not np.all(np.isfinite(box)) or box.min() < 0 or box.max() > 1 \
                or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"example {i}: box must be normalised xyxy (4 values in [0, 1], x1 <= x2, y1 <= y2), "
                             f"got {ex.box!r}")
        out.append(ex)
    return out


# ---- images and prompts -------------------------------------------------------------------------------------------

def _open(image, name: str) -> PIL.Image.Image:
    if not isinstance(image, (bytes, str, os.PathLike)):
        raise ValueError(f"{name}: expected a path, encoded bytes, a PIL image or a uint8 array, got "
                         f"{type(image).__name__}")
    try:
        return PIL.Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: unreadable image ({e})") from e


def stored_pixels(image, name: str) -> np.ndarray:
    """uint8[H, W, 3] of the image as stored: no EXIF rotation (the grid the boxes are annotated in); alpha is
    dropped as InternVL's `.convert("RGB")` does. Errors name `name`."""
    if isinstance(image, np.ndarray):
        return image  # checked by preprocess
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    with _open(image, name) as pil:
        try:
            return np.asarray(pil.convert("RGB"))
        except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as e:  # truncated data fails here
            raise ValueError(f"{name}: unreadable image ({e})") from e


def image_size_of(image, name: str) -> tuple[int, int]:
    """(width, height) as stored, reading only the header of files and bytes."""
    if isinstance(image, np.ndarray):
        return int(image.shape[1]), int(image.shape[0])
    if isinstance(image, PIL.Image.Image):
        return image.size
    with _open(image, name) as pil:
        return pil.size


def prompt_builder(model, tokenizer, *, template: str = "internvl2_5",
                   system_message: str | None = INTERNVL_SYSTEM_MESSAGE) -> PromptBuilder:
    """The chat-template builder for `model`'s tiles (left padding: prompts are continued by generation)."""
    return PromptBuilder(tokenizer, module_of(model).config.num_image_tokens, template,
                         system_message=system_message, padding_side="left")


def batch_inputs(model, builder: PromptBuilder, examples: Sequence[GroundingExample], *, max_tiles: int = MAX_TILES,
                 use_thumbnail: bool = True, names: Sequence[str] | None = None):
    """The generation inputs of `examples`' grounding prompts.

    -> (input_ids int32[B, T] left-padded, attention_mask int32[B, T], pixel_values float32[N, S, S, 3] (every
    image's tiles in row order, S = the model's tile size), tiles int[B] per row).
    """
    size = module_of(model).config.image_size
    names = names or [f"example {i}" for i in range(len(examples))]
    seqs, pixels, tiles, done = [], [], [], {}
    for ex, name in zip(examples, names):
        key = id(ex.image)  # expressions of one image share its tiles within a batch
        if key not in done:
            done[key] = preprocess.dynamic_tiles(stored_pixels(ex.image, name), size, 1, max_tiles, use_thumbnail,
                                                 name=name)
        t = done[key]
        seqs.append(builder.prompt_ids(grounding_prompt(ex.expression), [len(t)], index=None))
        pixels.append(t)
        tiles.append(len(t))
    ids, mask = builder.batch(seqs, padding_side="left")
    return ids, mask, np.concatenate(pixels), tiles


# ---- generation and scoring ---------------------------------------------------------------------------------------

def generate_answers(model, tokenizer, examples: Iterable, *, batch_size: int = 8, max_tiles: int = MAX_TILES,
                     use_thumbnail: bool = True, max_new_tokens: int = MAX_NEW_TOKENS, template: str = "internvl2_5",
                     system_message: str | None = INTERNVL_SYSTEM_MESSAGE, sort_by_tiles: bool = True,
                     progress: bool | None = None) -> list[str]:
    """One greedily generated answer per example, in the examples' order (see the module docstring).

    sort_by_tiles: batch examples of equal tile count together (fewer compiled shapes); False keeps the given
    order, so one batch mixes tile counts.
    """
    examples = as_examples(examples)
    for what, value in (("batch_size", batch_size), ("max_tiles", max_tiles), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    if not examples:
        return []
    builder = prompt_builder(model, tokenizer, template=template, system_message=system_message)
    names = [f"example {i} (image_id {ex.image_id})" if ex.image_id is not None else f"example {i}"
             for i, ex in enumerate(examples)]
    order = list(range(len(examples)))
    if sort_by_tiles:
        size = module_of(model).config.image_size
        counts = [preprocess.num_tiles(*image_size_of(ex.image, names[i]), size, 1, max_tiles, use_thumbnail)
                  for i, ex in enumerate(examples)]
        order.sort(key=lambda i: counts[i])
    rows = min(batch_size, len(examples))  # every batch this many rows: one compiled batch shape
    answers: list[str | None] = [None] * len(examples)
    starts = range(0, len(order), rows)
    show = len(starts) >= 4 if progress is None else progress
    for start in tqdm(starts, desc="grounding", disable=not show, leave=False):
        chosen = order[start:start + rows]
        padded = chosen + [chosen[-1]] * (rows - len(chosen))
        ids, mask, px, _ = batch_inputs(model, builder, [examples[i] for i in padded], max_tiles=max_tiles,
                                        use_thumbnail=use_thumbnail, names=[names[i] for i in padded])
        out = generation.generate_ids(model, ids, mask, px, max_new_tokens=max_new_tokens,
                                      eos_token_id=builder.eos_id, pad_token_id=builder.pad_id)
        for row, i in enumerate(chosen):
            answers[i] = generation.answer_text(tokenizer, out[row], builder.eos_id)
    return answers


def score_answers(answers: Sequence[str], examples: Iterable, threshold: float = 0.5) -> dict:
    """RefCOCO accuracy of `answers` (one per example, in order) against the examples' boxes.

    -> {"acc", "unparsable", "mean_iou" (over parsed answers; NaN if none), "num_examples", "threshold",
        "answers": [str], "iou": [float] (0 where unparsable),
        "per_example": [{"index", "image_id", "ref_id", "expression", "answer", "iou", "correct", "true_box",
                         "pred_box" (normalised xyxy, None if unparsable), "unparsable" (why, or None)}]}
    """
    examples = as_examples(examples)
    answers = list(answers)
    truth = np.asarray([ex.box for ex in examples], np.float64).reshape(-1, 4)
    scored = grounding.grounding_accuracy(answers, truth, threshold)
    per_example = []
    for i, (ex, answer) in enumerate(zip(examples, answers)):
        why = scored["reasons"].get(i)
        pred = None if why is not None else [float(v) for v in grounding.parse_boxes(answer)[0][0]]
        iou = float(scored["iou"][i])
        per_example.append(dict(index=i, image_id=ex.image_id, ref_id=ex.ref_id, expression=ex.expression,
                                answer=answer, iou=iou, correct=why is None and iou >= threshold,
                                true_box=[float(v) for v in truth[i]], pred_box=pred, unparsable=why))
    return dict(acc=scored["acc"], unparsable=scored["unparsable"], mean_iou=scored["mean_iou"],
                num_examples=len(examples), threshold=threshold, answers=answers,
                iou=[float(v) for v in scored["iou"]], per_example=per_example)


def evaluate_grounding(model, tokenizer, examples: Iterable, *, threshold: float = 0.5,
                       answer_fn: Callable[[list[GroundingExample]], Sequence[str]] | None = None, **kw) -> dict:
    """`generate_answers` (keywords `kw`) then `score_answers`. `answer_fn(examples) -> answers` replaces the
    generation (e.g. answers written elsewhere)."""
    examples = as_examples(examples)
    if answer_fn is None:
        answers = generate_answers(model, tokenizer, examples, **kw)
    else:
        answers = list(answer_fn(examples))
    if len(answers) != len(examples):
        raise ValueError(f"got {len(answers)} answers for {len(examples)} examples")
    return score_answers(answers, examples, threshold)


# ---- RefCOCO from the tfds builder ----------------------------------------------------------------------------------

def split_name(split: str) -> str:
    """The refcoco builder's name of `split` ("val" -> "validation"); ValueError naming the valid ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def check_builder_config(builder_config: str) -> None:
    from vlm_jax.data.datasets import refcoco

    configs = [c.name for c in refcoco.RefCoco.BUILDER_CONFIGS]
    if builder_config not in configs:
        raise ValueError(f"unknown refcoco builder_config {builder_config!r}; expected one of {configs}")


def refcoco_builder(builder_config: str = "refcoco", *, manual_dir: str | None = None, data_dir: str | None = None,
                    skip_bad_records: bool = False):
    """The refcoco tfds builder, prepared from `manual_dir` unless already built in `data_dir`."""
    import tensorflow_datasets as tfds

    from vlm_jax.data.datasets import refcoco

    check_builder_config(builder_config)
    builder = refcoco.RefCoco(config=builder_config, data_dir=data_dir, skip_bad_records=skip_bad_records)
    if not builder.is_prepared():
        if not manual_dir or not os.path.isdir(manual_dir):
            raise ValueError(f"refcoco/{builder_config} is not built in {builder.data_dir!r} and manual_dir "
                             f"{manual_dir!r} is not a directory: pass --manual_dir with instances.json, the refs "
                             "and the images")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def refcoco_examples(builder, split: str, max_examples: int | None = None) -> list[GroundingExample]:
    """One example per referring expression of `split` (records in order, their expressions in order), images left
    encoded; at most `max_examples` (None = all)."""
    import tensorflow_datasets as tfds

    name = split_name(split)
    if name not in builder.info.splits:
        raise ValueError(f"{builder.name}/{builder.builder_config.name} has no split {split!r}; available: "
                         f"{sorted(builder.info.splits)}")
    source = builder.as_data_source(split=name, decoders={"image": tfds.decode.SkipDecoding()})
    text = lambda x: x.decode() if isinstance(x, bytes) else str(x)  # noqa: E731
    out = []
    for r in range(len(source)):
        record = source[r]
        for k, caption in enumerate(record["captions"]):
            if max_examples is not None and len(out) >= max_examples:
                return out
            out.append(GroundingExample(record["image"], text(caption), record["boxes"][k].tolist(),
                                        int(record["image_id"]), int(record["ref_ids"][k])))
    return out


# ---- command line -------------------------------------------------------------------------------------------------

def _check_paths(converted_dir: str, output: str | None) -> None:
    """The cheap checks, before the dataset is built or the weights are read."""
    if not os.path.isdir(converted_dir):
        raise ValueError(f"--converted_dir {converted_dir!r} is not a directory (write one with "
                         "`python -m vlm_jax.convert --checkpoint HF_DIR --output DIR`)")
    if not converted.is_converted(converted_dir) and not os.path.exists(os.path.join(converted_dir, "config.json")):
        raise ValueError(f"--converted_dir {converted_dir!r} holds neither {converted.CONFIG_FILE} (a converted "
                         "checkpoint) nor config.json (a Hugging Face one)")
    if output:
        parent = os.path.dirname(os.path.abspath(output))
        if os.path.isdir(output):
            raise ValueError(f"--output {output!r} is a directory; name a JSON file")
        if not os.path.isdir(parent):
            raise ValueError(f"--output {output!r}: directory {parent!r} does not exist")


def _json_ready(x):
    """NaN -> None (strict JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_ready(v) for v in x]
    return x


def run(args: argparse.Namespace) -> dict:
    for what in ("batch_size", "max_tiles", "max_new_tokens"):
        if getattr(args, what) < 1:
            raise ValueError(f"--{what} must be >= 1, got {getattr(args, what)}")
    if args.max_examples < 0:
        raise ValueError(f"--max_examples must be >= 0 (0 = all), got {args.max_examples}")
    split_name(args.split)
    check_builder_config(args.builder_config)
    _check_paths(args.converted_dir, args.output)
    tokenizer = tokenizer_lib.load_tokenizer(args.converted_dir)
    if converted.is_converted(args.converted_dir):  # the template's tokens, before anything long
        config = converted.read_config(args.converted_dir)
        PromptBuilder(tokenizer, config.num_image_tokens, "internvl2_5")

    t0 = time.perf_counter()
    builder = refcoco_builder(args.builder_config, manual_dir=args.manual_dir, data_dir=args.data_dir,
                              skip_bad_records=args.skip_bad_records)
    examples = refcoco_examples(builder, args.split, args.max_examples or None)
    if not examples:
        raise ValueError(f"refcoco/{args.builder_config} split {args.split!r} holds no expressions")
    model = load_pretrained(args.converted_dir, dtype=args.dtype, attention=args.attention)
    t1 = time.perf_counter()
    result = evaluate_grounding(model, tokenizer, examples, batch_size=args.batch_size, max_tiles=args.max_tiles,
                                use_thumbnail=not args.no_thumbnail, max_new_tokens=args.max_new_tokens)
    t2 = time.perf_counter()
    result["settings"] = dict(converted_dir=os.path.abspath(args.converted_dir), builder_config=args.builder_config,
                              split=args.split, max_examples=args.max_examples, batch_size=args.batch_size,
                              max_tiles=args.max_tiles, use_thumbnail=not args.no_thumbnail,
                              max_new_tokens=args.max_new_tokens, dtype=args.dtype, prompt=GROUNDING_PROMPT,
                              setup_s=round(t1 - t0, 2), generation_s=round(t2 - t1, 2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(_json_ready(result), f, indent=1)
    parsed = result["num_examples"] - result["unparsable"]
    print(f"refcoco/{args.builder_config} {args.split}: acc@IoU>=0.5 {result['acc']:.4f} over "
          f"{result['num_examples']} expressions ({result['unparsable']} unparsable, counted as wrong"
          + (f"; mean IoU of the {parsed} parsed {result['mean_iou']:.4f}" if parsed else "")
          + f") in {t2 - t1:.1f} s" + (f"; wrote {args.output}" if args.output else ""))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--converted_dir", required=True, help="checkpoint written by `python -m vlm_jax.convert` "
                        "(a Hugging Face directory also loads), with its tokenizer files")
    parser.add_argument("--builder_config", default="refcoco", help="refcoco | refcocoplus | refcocog")
    parser.add_argument("--manual_dir", default=None, help="instances.json + refs + images, to build the dataset "
                        "(not needed once built)")
    parser.add_argument("--data_dir", default=None, help="tfds data directory (default: tfds' own)")
    parser.add_argument("--skip_bad_records", action="store_true", help="skip (and count) unreadable records")
    parser.add_argument("--split", default="val", help=f"one of {sorted(SPLITS)}")
    parser.add_argument("--max_examples", type=int, default=0, help="the first N expressions (0 = all)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_tiles", type=int, default=MAX_TILES, help="dynamic tiles per image (+ thumbnail)")
    parser.add_argument("--no_thumbnail", action="store_true", help="leave out the thumbnail tile")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                        help="parameter and compute dtype (InternVL evaluates in bfloat16)")
    parser.add_argument("--attention", default="auto", help="attention implementation (see load_pretrained)")
    parser.add_argument("--output", default=None, help="JSON file: the metrics, settings and every answer")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
