"""Forward-pass speed: transformers (PyTorch) vs vlm_jax on the same weights and inputs, in one process.

InternVL3-1B widths (vision 1024/4096/16 heads at 448 px, LM 896/4864/14:2 heads, vocab 151674), depth set by
--layers. Batch B rows, each one 448x448 tile (256 image tokens) plus --text_tokens text tokens.

    python experiments/benchmark_forward.py --layers 4 --dtypes float32,bfloat16
    python experiments/benchmark_forward.py --layers 24 --dtypes float32 --repeats 3 [--parts model,vision]

Prints a first line about the machine: the CPU, and the GFLOP/s of one float32 GEMM of the vision MLP's shape
([2050, 1024] x [1024, 4096]) in XLA and in PyTorch, which bounds what either framework reaches here. Then one JSON
line per dtype and part ('model': the whole forward; 'vision': the vision tower alone): seconds per forward (torch,
jax; the median of --repeats interleaved runs, and their range), jax/torch speed ratio of the medians (>1: JAX
faster), achieved GFLOP/s of each (analytic FLOPs: 2 per multiply-add, linears + attention matmuls), JAX compile
time, and the max relative difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def internvl3_1b_hf_config(layers: int, vocab: int):
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config=dict(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                           intermediate_size=4096, image_size=448, patch_size=14, attention_bias=True),
        text_config=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=vocab, rope_theta=1e6,
                         max_position_embeddings=32768, tie_word_embeddings=False),
        image_token_id=vocab - 1, downsample_ratio=0.5, tie_word_embeddings=False)


def forward_flops(cfg, batch: int, text_tokens: int) -> float:
    """Analytic FLOPs of one multimodal forward (linears + attention matmuls; norms/softmax ignored)."""
    v, t = cfg.vision, cfg.text
    p = (v.image_size // v.patch_size) ** 2
    tv = p + 1
    d, f = v.hidden_size, v.intermediate_size
    vision = 2 * p * v.patch_size ** 2 * 3 * d + v.num_layers * (2 * tv * (4 * d * d + 2 * d * f) + 4 * tv * tv * d)
    q = cfg.num_image_tokens
    proj = 2 * q * (4 * d * t.hidden_size + t.hidden_size ** 2)
    seq = q + text_tokens
    dt, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    lm_layer = (2 * seq * (dt * (dt + 2 * kv) + dt * dt + 3 * dt * t.intermediate_size)
                + 4 * seq * seq * t.num_heads * t.head_dim)
    lm = t.num_layers * lm_layer + 2 * seq * dt * t.vocab_size
    return batch * (vision + proj + lm)


def vision_flops(cfg, batch: int) -> float:
    """Analytic FLOPs of the vision tower alone (patch embedding, layers)."""
    v = cfg.vision
    p = (v.image_size // v.patch_size) ** 2
    tv, d, f = p + 1, v.hidden_size, v.intermediate_size
    return batch * (2 * p * v.patch_size ** 2 * 3 * d + v.num_layers * (2 * tv * (4 * d * d + 2 * d * f)
                                                                         + 4 * tv * tv * d))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown"


def gemm_gflops() -> dict:
    """float32 GEMM [2050, 1024] x [1024, 4096] (a vision MLP at batch 2) in XLA and in PyTorch: median GFLOP/s."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.random((2050, 1024), np.float32), rng.random((1024, 4096), np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    dot = jax.jit(jnp.dot)
    flops = 2 * 2050 * 1024 * 4096
    jax_s, torch_s = interleaved(lambda: dot(ja, jb).block_until_ready(), lambda: torch.mm(ta, tb), 20)
    return dict(gemm_xla_gflops=round(flops / jax_s["median"] / 1e9, 1),
                gemm_torch_gflops=round(flops / torch_s["median"] / 1e9, 1))


def interleaved(run_jax, run_torch, repeats: int) -> tuple[dict, dict]:
    """Timings of both after a warm-up, alternating (the machine's load hits both alike): median and range."""
    run_jax(), run_torch()
    tj, tt = [], []
    for _ in range(repeats):
        s = time.perf_counter()
        run_torch()
        tt.append(time.perf_counter() - s)
        s = time.perf_counter()
        run_jax()
        tj.append(time.perf_counter() - s)
    stats = lambda t: dict(median=float(np.median(t)), range=[round(min(t), 3), round(max(t), 3)])  # noqa: E731
    return stats(tj), stats(tt)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4, help="depth of both towers (InternVL3-1B: 24)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text_tokens", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="model", help="model (whole forward) and/or vision (the tower alone)")
    parser.add_argument("--attention", default=None, help="vlm_jax attention: map|einsum|xla|cudnn (default: "
                        "by backend)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="PyTorch threads; 1 also makes XLA single-threaded")
    args = parser.parse_args()

    if args.threads == 1:  # single-threaded XLA too: the fairest comparison on a shared, oversubscribed machine
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import InternVLForConditionalGeneration

    from vlm_jax.checkpoints import hf
    from vlm_jax.models.config import InternVLConfig

    torch.set_num_threads(args.threads)
    print(json.dumps(dict(cpu=cpu_name(), cores=os.cpu_count(), threads=args.threads, **gemm_gflops())),
          flush=True)
    vocab = 151674
    hf_cfg = internvl3_1b_hf_config(args.layers, vocab)
    torch.manual_seed(0)
    ref = InternVLForConditionalGeneration(hf_cfg).eval()  # default (sdpa) attention: PyTorch's fast path
    cfg = InternVLConfig.from_hf_dict(hf_cfg.to_dict())
    sd = {k: v.detach() for k, v in ref.state_dict().items()}

    rng = np.random.default_rng(0)
    b, q = args.batch, cfg.num_image_tokens
    px = rng.standard_normal((b, 448, 448, 3)).astype(np.float32)
    ids = rng.integers(0, vocab - 10, (b, q + args.text_tokens))
    ids[:, 2:2 + q] = cfg.image_token_id
    mask = np.ones_like(ids)
    flops = forward_flops(cfg, b, args.text_tokens)

    for dtype in args.dtypes.split(","):
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        ref.to(tdtype)
        t_px = torch.from_numpy(px).permute(0, 3, 1, 2).contiguous().to(tdtype)
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        jdtype = jnp.dtype(dtype)
        flat = hf.flax_params_from({k: tuple(v.shape) for k, v in sd.items()},
                                   lambda n: sd[n].float().numpy(), cfg, "transformers", jdtype)
        module = hf.model_from_flat(cfg, flat, dtype=jdtype, param_dtype=jdtype)
        del flat
        if args.attention:
            module.set_attention_implementation(args.attention)
        j_px = jnp.asarray(px, jdtype)
        j_ids, j_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
        graphdef, state = nnx.split(module)
        parts = {
            "model": (lambda state, px, ids, mask: nnx.merge(graphdef, state)(px, ids, mask).logits,
                      lambda: ref(pixel_values=t_px, input_ids=t_ids, attention_mask=t_mask).logits, flops),
            "vision": (lambda state, px, ids, mask: nnx.merge(graphdef, state).vision_tower(px),
                       lambda: ref.model.vision_tower(pixel_values=t_px).last_hidden_state, vision_flops(cfg, b)),
        }
        for part in args.parts.split(","):
            jax_fn, torch_fn, part_flops = parts[part]
            t0 = time.perf_counter()
            compiled = jax.jit(jax_fn).lower(state, j_px, j_ids, j_mask).compile()
            compile_s = time.perf_counter() - t0

            def run_jax():
                return compiled(state, j_px, j_ids, j_mask).block_until_ready()

            def run_torch():
                with torch.no_grad():
                    return torch_fn()

            out_j = np.asarray(run_jax(), np.float32)
            out_t = run_torch().float().numpy()
            jax_s, torch_s = interleaved(run_jax, run_torch, args.repeats)
            print(json.dumps(dict(
                part=part, dtype=dtype, layers=args.layers, batch=b, tokens=int(ids.shape[1]),
                backend=jax.default_backend(), attention=args.attention or "default", threads=args.threads,
                torch_s=round(torch_s["median"], 3), jax_s=round(jax_s["median"], 3), torch_range_s=torch_s["range"],
                jax_range_s=jax_s["range"], jax_speed_vs_torch=round(torch_s["median"] / jax_s["median"], 3),
                torch_gflops=round(part_flops / torch_s["median"] / 1e9, 1),
                jax_gflops=round(part_flops / jax_s["median"] / 1e9, 1), jax_compile_s=round(compile_s, 2),
                max_rel_diff=float(np.abs(out_j - out_t).max() / np.abs(out_t).max()),
                gflop_per_forward=round(part_flops / 1e9, 1))), flush=True)
        del module, state, compiled
    return 0


if __name__ == "__main__":
    main()
