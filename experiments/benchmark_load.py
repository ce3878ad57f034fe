"""Load time of `vlm_jax.load_pretrained`: Hugging Face safetensors vs the converted orbax checkpoint.

Writes a random checkpoint at InternVL3-1B widths (depth configurable), converts it with `vlm_jax.convert`, then
loads each form `--repeats` times, alternating, into float32 parameters (the arrays are waited on). Prints one
JSON line with the per-try seconds and the medians.

    python experiments/benchmark_load.py --layers 24 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def internvl3_1b_config(layers: int):
    from vlm_jax.models.config import InternVLConfig

    vocab = 151674
    return InternVLConfig.from_hf_dict(dict(
        model_type="internvl", image_token_id=151667, downsample_ratio=0.5, tie_word_embeddings=False,
        vision_config=dict(model_type="internvl_vision", hidden_size=1024, num_hidden_layers=layers,
                           num_attention_heads=16, intermediate_size=4096, image_size=[448, 448],
                           patch_size=[14, 14], attention_bias=True, layer_norm_eps=1e-6),
        text_config=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=vocab, rope_theta=1e6,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24, help="depth of both towers (InternVL3-1B: 24)")
    parser.add_argument("--stored_dtype", default="bfloat16", help="dtype of the safetensors file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()

    import jax
    from flax import nnx

    from vlm_jax import convert
    from vlm_jax.checkpoints import random_hf
    from vlm_jax.pretrained import load_pretrained

    root = args.workdir or tempfile.mkdtemp(prefix="vlm_jax_load_")
    hf_dir, converted_dir = os.path.join(root, "hf"), os.path.join(root, "converted")
    if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        random_hf.write_random_checkpoint(hf_dir, internvl3_1b_config(args.layers), dtype=args.stored_dtype)
    if not os.path.exists(converted_dir):
        convert.convert(hf_dir, converted_dir, dtype="float32", show_progress=False)

    times = {"safetensors": [], "orbax": []}
    for _ in range(args.repeats):
        for name, path in (("safetensors", hf_dir), ("orbax", converted_dir)):
            start = time.perf_counter()
            model = load_pretrained(path, dtype="float32")
            jax.block_until_ready(jax.tree.leaves(nnx.state(model.module)))
            times[name].append(round(time.perf_counter() - start, 3))
            del model
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps(dict(layers=args.layers, stored_dtype=args.stored_dtype, seconds=times,
                          median_safetensors_s=med["safetensors"], median_orbax_s=med["orbax"],
                          orbax_speedup=round(med["safetensors"] / med["orbax"], 3))))


if __name__ == "__main__":
    main()
