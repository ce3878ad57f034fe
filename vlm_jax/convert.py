"""Convert a Hugging Face InternVL checkpoint (safetensors) to a vlm_jax orbax checkpoint.

    python -m vlm_jax.convert --checkpoint HF_DIR --output OUT_DIR [--dtype float32|bfloat16]
        [--image_token_id ID]

`vlm_jax.load_pretrained(OUT_DIR)` then gives the same outputs as `load_pretrained(HF_DIR)`, faster.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from vlm_jax.checkpoints import converted, hf, mapping


def convert(checkpoint: str, output: str, *, dtype: str = "float32", image_token_id: int | None = None,
            show_progress: bool = True) -> dict:
    """Load + check `checkpoint`, write `output`. Returns timings in seconds."""
    t0 = time.perf_counter()
    _, cfg, layout = hf.read_config(checkpoint)
    with tqdm(total=len(mapping.rows(cfg)), desc="converting", unit="tensor", disable=not show_progress) as bar:
        module, cfg = hf.load_hf(checkpoint, image_token_id=image_token_id, dtype=dtype,
                                 progress=lambda _: bar.update(1))
    t1 = time.perf_counter()
    converted.save(output, cfg, module, source_dir=checkpoint)
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "save_s": t2 - t1, "layout": layout, "image_token_id": cfg.image_token_id}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory (config.json + "
                        "model.safetensors or model.safetensors.index.json)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="stored param dtype")
    parser.add_argument("--image_token_id", type=int, default=None, help="override the <IMG_CONTEXT> id")
    args = parser.parse_args(argv)
    info = convert(args.checkpoint, args.output, dtype=args.dtype, image_token_id=args.image_token_id)
    print(f"converted {args.checkpoint} ({info['layout']} layout, image_token_id {info['image_token_id']}) -> "
          f"{args.output} in {info['load_s'] + info['save_s']:.1f} s")


if __name__ == "__main__":
    main()
