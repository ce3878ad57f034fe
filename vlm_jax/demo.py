"""Conversion + forward demo on a small generated checkpoint (runs in well under a minute on a laptop CPU).

    python -m vlm_jax.demo [--workdir DIR]

1. writes a small random InternVL checkpoint in Hugging Face (transformers) format, with tokenizer files, to DIR/hf
   (`python -m vlm_jax.random_checkpoint` writes the same on its own),
2. converts it with the conversion command's code to DIR/converted (orbax),
3. loads both with `vlm_jax.load_pretrained` and runs a padded two-image batch,
4. if PyTorch is installed, runs transformers' InternVLForConditionalGeneration on the same checkpoint and
   prints the largest logit difference.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from vlm_jax import random_checkpoint
from vlm_jax.convert import convert
from vlm_jax.models.config import InternVLConfig
from vlm_jax.pretrained import load_pretrained


def demo_batch(config: InternVLConfig, seed: int = 0):
    """Two left-padded rows: text, an image block (and two in row 1), text. -> (pixels NHWC, ids, mask)."""
    rng = np.random.default_rng(seed)
    q, img = config.num_image_tokens, config.image_token_id
    rows = [[3, 4, 5] + [img] * q + [6, 7], [8] + [img] * q + [9] + [img] * q + [10, 11, 12]]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), np.int32)
    for b, r in enumerate(rows):
        ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
    px = rng.standard_normal((3, config.image_size, config.image_size, 3)).astype(np.float32)
    return px, ids, mask


def torch_reference(hf_dir: str, px, ids, mask):
    """transformers logits, or None when PyTorch is not installed."""
    try:
        import torch
        from transformers import InternVLForConditionalGeneration
    except ImportError:
        return None
    model = InternVLForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2), input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long())
    return out.logits.numpy()


def run(workdir: str) -> dict:
    hf_dir, out_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "converted")
    config = random_checkpoint.write(hf_dir, seed=0)
    print(f"wrote a random Hugging Face checkpoint with tokenizer files to {hf_dir}")
    info = convert(hf_dir, out_dir)
    print(f"converted to {out_dir} ({info['load_s'] + info['save_s']:.2f} s)")

    t0 = time.perf_counter()
    model = load_pretrained(out_dir)
    load_s = time.perf_counter() - t0
    px, ids, mask = demo_batch(config)
    t0 = time.perf_counter()
    logits = np.asarray(model(pixel_values=px, input_ids=ids, attention_mask=mask).logits)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model(pixel_values=px, input_ids=ids, attention_mask=mask).logits.block_until_ready()
    second_s = time.perf_counter() - t0
    print(f"load_pretrained: {load_s:.2f} s; forward {tuple(ids.shape)} -> logits {logits.shape}: "
          f"first call {first_s:.2f} s (compiles), second {second_s * 1e3:.1f} ms")
    from_hf = np.asarray(load_pretrained(hf_dir)(pixel_values=px, input_ids=ids, attention_mask=mask).logits)
    result = {"logits_shape": logits.shape, "converted_vs_hf_max_abs": float(np.abs(from_hf - logits).max())}
    print(f"converted vs safetensors-loaded: max |diff| {result['converted_vs_hf_max_abs']:.3g}")
    ref = torch_reference(hf_dir, px, ids, mask)
    if ref is None:
        print("PyTorch not installed: skipping the transformers comparison")
    else:
        valid = mask.astype(bool)
        diff = float(np.abs(logits[valid] - ref[valid]).max())
        result["torch_max_abs"] = diff
        print(f"transformers (PyTorch) vs vlm_jax logits on real tokens: max |diff| {diff:.3g} "
              f"(max |logit| {np.abs(ref[valid]).max():.3g})")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="output directory (default: a fresh temporary one)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vlm_jax_demo_")
    os.makedirs(workdir, exist_ok=True)
    run(workdir)


if __name__ == "__main__":
    main()
