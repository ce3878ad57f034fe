"""Trained models back to PyTorch: a run (or a converted checkpoint) as a Hugging Face InternVL checkpoint.

    python -m vlm_jax.export --workdir RUN_DIR --output OUT_DIR [--step N] [--layout transformers|opengvlab]
        [--dtype float32|bfloat16] [--overwrite]
    python -m vlm_jax.export --checkpoint CONVERTED_DIR --output OUT_DIR [...]

OUT_DIR gets the backbone, with any LoRA factors merged into its kernels, as safetensors (shards above 5 GB) and a
`config.json` of the chosen layout, and the tokenizer files (added special tokens included; the embedding rows
match the tokenizer) — `transformers.InternVLForConditionalGeneration.from_pretrained(OUT_DIR)` loads the
transformers layout, InternVL's own code the OpenGVLab one. A run's task heads and shared layers (adapters,
projectors, temperature) go to `heads.safetensors` ('/'-joined parameter paths) with `heads_config.json` (the
run's `config.model.embedding`, `config.tasks`, the towers' widths and the patch grid); `vlm_jax.torch_heads`
applies them to transformers' outputs. A non-empty OUT_DIR is refused unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from flax import nnx, traverse_util

from vlm_jax import lora
from vlm_jax.checkpoints import hf

HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads_config.json"
LAYOUTS = ("transformers", "opengvlab")


def check_output(output: str, overwrite: bool) -> None:
    """Refuses a non-empty output directory (before any work) unless `overwrite`."""
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ValueError(f"output directory {output!r} is not empty ({len(os.listdir(output))} entries); pass "
                         "--overwrite to replace its files")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"output {output!r} exists and is not a directory")


def write_backbone(output: str, backbone, tokenizer, *, layout: str, dtype: str, max_shard_bytes: int) -> int:
    """The InternVL `backbone` (LoRA merged first) + `tokenizer` as a Hugging Face checkpoint; returns the number
    of merged LoRA linears."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    merged = lora.merge(backbone)
    cfg = backbone.config
    rows = int(backbone.language_model.embed_tokens.shape[0])
    if tokenizer is not None and len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows")
    hf.save_hf(output, backbone, cfg, layout=layout, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return merged


def heads_state(model) -> dict[str, np.ndarray]:
    """{'/'-joined path: float32 array} of every parameter outside the backbone (shared layers and task heads)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: np.asarray(v, np.float32) for k, v in flat.items() if not k.startswith("backbone/")}


def write_heads(output: str, model, config) -> None:
    from safetensors.numpy import save_file

    backbone = model.backbone.config
    save_file(heads_state(model), os.path.join(output, HEADS_FILE), metadata={"format": "vlm_jax-heads"})
    grid = backbone.vision.image_size // backbone.vision.patch_size
    info = dict(format=1, embedding=config.model.embedding.to_dict(), tasks=config.tasks.to_dict(),
                vision_width=backbone.vision.hidden_size, text_width=backbone.text.hidden_size,
                image_size=backbone.vision.image_size, patch_grid=[grid, grid],
                image_token_id=backbone.image_token_id)
    with open(os.path.join(output, HEADS_CONFIG), "w") as f:
        json.dump(info, f, indent=2, default=list)


def export_model(model, config, tokenizer, output: str, *, layout: str = "transformers", dtype: str = "float32",
                 overwrite: bool = False, max_shard_bytes: int = 5 * 10 ** 9) -> dict:
    """A multitask model of `config` (its backbone's LoRA factors are merged in place) -> `output`."""
    check_output(output, overwrite)
    os.makedirs(output, exist_ok=True)
    write_heads(output, model, config)  # before the merge: the heads do not change, the backbone does
    merged = write_backbone(output, model.backbone, tokenizer, layout=layout, dtype=dtype,
                            max_shard_bytes=max_shard_bytes)
    return dict(layout=layout, dtype=dtype, merged_lora_linears=merged)


def export_run(workdir: str, output: str, *, step: int | None = None, **kw) -> dict:
    """A training run's checkpoint (default: the latest) -> `output` (`export_model`'s keywords)."""
    from vlm_jax import build, runs

    check_output(output, kw.get("overwrite", False))
    run = runs.restore_run(workdir, step)
    tokenizer = build.resolve_backbone(run.config.model).tokenizer
    return dict(step=run.step, **export_model(run.model, run.config, tokenizer, output, **kw))


def export_converted(checkpoint: str, output: str, *, layout: str = "transformers", dtype: str = "float32",
                     overwrite: bool = False, max_shard_bytes: int = 5 * 10 ** 9) -> dict:
    """A converted checkpoint (`python -m vlm_jax.convert`) -> `output` (backbone and tokenizer only)."""
    from vlm_jax import tokenizer as tokenizer_lib
    from vlm_jax.checkpoints import converted

    check_output(output, overwrite)
    module, _ = converted.load(checkpoint, dtype="float32")
    has_tokenizer = any(os.path.exists(os.path.join(checkpoint, f)) for f in converted.TOKENIZER_FILES)
    tokenizer = tokenizer_lib.load_tokenizer(checkpoint) if has_tokenizer else None
    os.makedirs(output, exist_ok=True)
    write_backbone(output, module, tokenizer, layout=layout, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return dict(layout=layout, dtype=dtype, tokenizer=tokenizer is not None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training run's workdir (its checkpoints/)")
    source.add_argument("--checkpoint", help="a converted checkpoint directory")
    parser.add_argument("--output", required=True, help="output directory (must be empty unless --overwrite)")
    parser.add_argument("--step", type=int, default=None, help="the run's checkpoint step (default: the latest)")
    parser.add_argument("--layout", default="transformers", choices=LAYOUTS)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    args = parser.parse_args(argv)
    kw = dict(layout=args.layout, dtype=args.dtype, overwrite=args.overwrite)
    if args.workdir:
        info = export_run(args.workdir, args.output, step=args.step, **kw)
    else:
        info = export_converted(args.checkpoint, args.output, **kw)
    print(f"exported {args.workdir or args.checkpoint} -> {args.output}: {json.dumps(info)}")


if __name__ == "__main__":
    main()
