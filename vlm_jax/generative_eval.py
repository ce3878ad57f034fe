"""What a model trained with the lm task generates: greedy answers to the validation questions, parsed and scored.

    python -m vlm_jax.generative_eval --workdir DIR [--split validation] [--max_examples N] [--output out.json]

The questions are the pipeline's evaluation targets (`vlm_jax.data.generative`: each (image, caption) pair asks one
kind, in a fixed cycle), with the run's tiles and template; answers are generated greedily with the KV cache
(`generation.generate_ids`) and scored per kind:
  grounding  the first `<box>` of the answer (`grounding.parse_boxes`) against the caption subject's box: accuracy
             at IoU >= 0.5 and mean IoU (RefCOCO's metric; unparsable answers count as wrong, never dropped);
  relation   the answer equals the relation word (`relations.RELATIONS`): accuracy, and answers that are no
             relation word at all (unparsable);
  caption    the answer equals the caption (exact match).
Next to them it prints the run's own head metrics at the same checkpoint (`box_acc@0.5`, `box_iou`, `spatial_acc`
from its metrics.jsonl) when the run trained those heads: grounding by head against grounding by generation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Mapping

import numpy as np

from vlm_jax import generation, grounding
from vlm_jax.data import generative
from vlm_jax.data.datasets import relations

MAX_NEW_TOKENS = 48  # a grounding answer (`<ref>..</ref><box>[[..]]</box>`) of the demo takes about 40 tokens


def prompts_and_pixels(batch: Mapping[str, np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pipeline batch with generative targets -> (int32[B, Lq] left-padded questions (the tokens before the
    answer), int32[B, Lq] mask, float32[N, S, S, 3] every row's tiles in row order, as `generate_ids` reads them)."""
    answer_start = np.argmax(batch["lm_labels"] != generative.IGNORE_INDEX, axis=1)  # labels start at the answer
    rows = len(answer_start)
    length = int(answer_start.max())
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r, n in enumerate(answer_start):
        ids[r, length - n:], mask[r, length - n:] = batch["lm_ids"][r, :n], 1
    order = [t for r in range(rows) for t in batch["row_tiles"][r, : batch["num_tiles"][r]]]
    return ids, mask, np.asarray(batch["tiles"])[order]


def score(answers: list[str], kinds: np.ndarray, batch_fields: Mapping[str, np.ndarray],
          captions: list[str]) -> dict:
    """Per-kind scores of generated answers (kinds int[N] in `generative.KINDS`; batch_fields box float[N, 4],
    relation int[N] of each row; captions: each row's caption)."""
    kinds = np.asarray(kinds)
    out: dict = {"num_examples": len(answers)}
    rows = np.flatnonzero(kinds == generative.KINDS.index("grounding"))
    if len(rows):
        g = grounding.grounding_accuracy([answers[i] for i in rows], np.asarray(batch_fields["box"])[rows])
        out["grounding"] = {"acc@0.5": g["acc"], "mean_iou": g["mean_iou"], "unparsable": g["unparsable"],
                            "count": len(rows)}
    rows = np.flatnonzero(kinds == generative.KINDS.index("relation"))
    if len(rows):
        said = [answers[i].strip() for i in rows]
        truth = [relations.RELATIONS[int(batch_fields["relation"][i])] for i in rows]
        out["relation"] = {"acc": float(np.mean([s == t for s, t in zip(said, truth)])),
                           "unparsable": int(sum(s not in relations.RELATIONS for s in said)), "count": len(rows)}
    rows = np.flatnonzero(kinds == generative.KINDS.index("caption"))
    if len(rows):
        out["caption"] = {"exact": float(np.mean([answers[i].strip() == captions[i].strip() for i in rows])),
                          "count": len(rows)}
    return out


def generate_split(backbone, tokenizer, batches: Iterable[Mapping[str, np.ndarray]], *, eos_id: int, pad_id: int,
                   max_new_tokens: int = MAX_NEW_TOKENS, max_examples: int | None = None) -> dict:
    """Greedy answers for the valid rows of pipeline `batches` -> {"answers", "kinds", "box", "relation",
    "captions", "image_id"} (host lists / arrays, in order)."""
    parts: dict[str, list] = {k: [] for k in ("answers", "kinds", "box", "relation", "captions", "image_id")}
    for batch in batches:
        ids, mask, pixels = prompts_and_pixels(batch, pad_id)
        out = generation.generate_ids(backbone, ids, mask, pixels, max_new_tokens=max_new_tokens,
                                      eos_token_id=eos_id, pad_token_id=pad_id)
        valid = np.asarray(batch.get("valid", np.ones(len(ids), bool)), bool)
        for r in np.flatnonzero(valid):
            parts["answers"].append(generation.answer_text(tokenizer, out[r], eos_id))
            parts["captions"].append(generation.answer_text(tokenizer, batch["text_ids"][r], eos_id))  # EOS-ended
            for key, field in (("kinds", "lm_kind"), ("box", "box"), ("relation", "relation"),
                               ("image_id", "image_id")):
                parts[key].append(batch[field][r])
        if max_examples and len(parts["answers"]) >= max_examples:
            break
    n = len(parts["answers"]) if not max_examples else min(max_examples, len(parts["answers"]))
    return {k: (v[:n] if k in ("answers", "captions") else np.asarray(v[:n])) for k, v in parts.items()}


def head_metrics(workdir: str, step: int, split: str) -> dict:
    """The run's own box / spatial head metrics at `step` on `split` (from metrics.jsonl), for comparison."""
    path = os.path.join(workdir, "metrics.jsonl")
    found = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("step") == step and row.get("split") == split:
                    found = {k: row[k] for k in ("box_iou", "box_acc@0.5", "spatial_acc") if k in row}
    return found


def run(args: argparse.Namespace) -> dict:
    from vlm_jax import runs  # the run's data stack loads only here

    restored = runs.restore_run(args.workdir, args.step)
    config = restored.config
    if not tuple(config.data.get("lm_kinds", ())):
        raise ValueError(f"{args.workdir}: the run was trained without generative targets (config.data.lm_kinds "
                         "is empty); nothing to generate")
    if args.batch_size:
        config.eval_batch_size = args.batch_size
    runs.check_splits(config, train=False)
    batches = runs.make_data(config, restored.inputs, args.split, train=False)
    from vlm_jax.data import pipeline

    prompts = pipeline.make_prompt_builder(config.data, restored.inputs)
    generated = generate_split(restored.model.backbone, restored.inputs.tokenizer, batches, eos_id=prompts.eos_id,
                               pad_id=prompts.pad_id, max_new_tokens=args.max_new_tokens,
                               max_examples=args.max_examples)
    result = score(generated["answers"], generated["kinds"], generated, generated["captions"])
    result.update(workdir=args.workdir, step=restored.step, split=args.split,
                  heads=head_metrics(args.workdir, restored.step, args.split),
                  examples=[{"image_id": int(i), "kind": generative.KINDS[int(k)], "answer": a}
                            for i, k, a in zip(generated["image_id"][:20], generated["kinds"][:20],
                                               generated["answers"][:20])])
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir (trained with the lm task)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max_examples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=0, help="rows per generation batch (0: the run's eval)")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--output", default="", help="write the scores and the first answers as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    return result


if __name__ == "__main__":
    main()
