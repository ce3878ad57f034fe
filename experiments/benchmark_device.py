"""The accelerator benchmark in one command: vlm_jax against transformers PyTorch, same device, same process.

    python experiments/benchmark_device.py            # InternVL3-1B widths, full depth, bf16 (<= 8 min, one H100/H200)
    python experiments/benchmark_device.py --smoke    # every code path at tiny widths on the CPU (< 1 min)

Random weights (no download): transformers' InternVLForConditionalGeneration is built from the config, and vlm_jax's
forward takes the same weights, so the logits can be compared. Prints one JSON line per measurement:

    device         the device, its dense bf16 peak, versions, the attention implementations 'auto' chose
    forward        the whole model (vision tower, projector, LM, logits) on `--forward_batch` images of 1 and 4
                   tiles of 448 px, prompt = the image tokens + 40 text tokens: images/s, achieved TFLOP/s
                   (matmul FLOPs counted from the program, every scanned layer included), MFU against the peak,
                   compile time, peak device memory; then the same for PyTorch and the ratio jax / torch
    train_step     the seed recipe's step (configs/internvl3_1b_retrieval.py: frozen bf16 backbone, late fusion,
                   float32 adapters and heads trained with AdamW) at batch 4, 32 and 128, one tile per image; and
                   the same step written in PyTorch (no-grad backbone, the same adapters, heads and losses)
Each timing is the median of `--repeats` runs after a warm-up; `*_range_s` gives the fastest and slowest. A failing
measurement prints one line with its error and the others still run; the exit status is 1 if any failed.

Only jax, flax, optax, numpy, ml_collections, einops (and torch + transformers for the reference) are imported:
the data, logging and TensorFlow stacks are not needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a source checkout
sys.path.insert(0, os.path.join(REPO, "experiments"))

TEXT_TOKENS = 40  # the seed recipe's max_text_length
VOCAB = 151674

# Dense bf16 peak (TFLOP/s, no sparsity) by device name; the first key found in jax's device_kind wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("H800", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("B200", 2250.0))


def peak_tflops(device_kind: str, override: float) -> float | None:
    if override > 0:
        return override
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def model_config(smoke: bool):
    """vlm_jax's InternVLConfig: InternVL3-1B widths and depth, or a tiny one for --smoke."""
    from vlm_jax.models.config import InternVLConfig

    if smoke:
        return InternVLConfig.tiny(image_size=64, vocab_size=512, image_token_id=511,
                                   vision=dict(hidden_size=64, intermediate_size=128, num_heads=4),
                                   text=dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2))
    from benchmark_forward import internvl3_1b_hf_config

    return InternVLConfig.from_hf_dict(internvl3_1b_hf_config(24, VOCAB).to_dict())


def torch_model(cfg, device, dtype):
    """transformers' InternVL with random weights, `dtype`, its fastest attention (sdpa)."""
    import torch
    from transformers import InternVLConfig as HFConfig
    from transformers import InternVLForConditionalGeneration

    from vlm_jax.checkpoints import hf

    torch.manual_seed(0)
    hf_cfg = HFConfig(**hf.to_hf_config_dict(cfg))
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def jax_model(cfg, torch_ref, attention: str):
    """vlm_jax's InternVL with the PyTorch model's weights, bf16 storage and compute."""
    import jax.numpy as jnp

    from vlm_jax.checkpoints import hf

    sd = {k: v.detach() for k, v in torch_ref.state_dict().items()}
    flat = hf.flax_params_from({k: tuple(v.shape) for k, v in sd.items()},
                               lambda n: sd[n].float().cpu().numpy(), cfg, "transformers", jnp.bfloat16)
    module = hf.model_from_flat(cfg, flat, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    module.set_attention_implementation(attention)
    return module


class Clock:
    """Median and range of `repeats` timed calls after one warm-up; `sync` waits for the device."""

    def __init__(self, repeats: int):
        self.repeats = repeats

    def __call__(self, fn, sync) -> dict:
        sync(fn())  # warm-up
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            sync(fn())
            times.append(time.perf_counter() - start)
        return dict(median_s=statistics.median(times), range_s=[min(times), max(times)])


def jax_memory(compiled) -> dict:
    """Device memory of one compiled program (arguments + outputs + temporaries - donated) and the process peak."""
    import jax

    out = {}
    try:
        m = compiled.memory_analysis()
        out["program_bytes"] = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["process_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def rates(flops: float, seconds: float, images: int, peak: float | None) -> dict:
    tflops = flops / seconds / 1e12
    return dict(images_per_s=images / seconds, tflops=tflops, mfu=tflops / peak if peak else None)


def forward_inputs(cfg, batch: int, tiles: int, seed: int = 0):
    """Pixels float[batch * tiles, S, S, 3] and a prompt per image: 2 tokens, the image block, text."""
    rng = np.random.default_rng(seed)
    s, q = cfg.vision.image_size, cfg.num_image_tokens
    px = rng.standard_normal((batch * tiles, s, s, 3)).astype(np.float32)
    ids = rng.integers(0, cfg.image_token_id - 1, (batch, 2 + tiles * q + TEXT_TOKENS)).astype(np.int32)
    ids[:, 2:2 + tiles * q] = cfg.image_token_id
    return px, ids, np.ones_like(ids)


def measure_forward(cfg, torch_ref, module, batch, tiles, clock, peak, device) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import benchmark_train_step

    px, ids, mask = forward_inputs(cfg, batch, tiles)
    graphdef, state = nnx.split(module)

    def fwd(state, px, ids, mask):
        return nnx.merge(graphdef, state)(px, ids, mask).logits

    args = (state, jnp.asarray(px, jnp.bfloat16), jnp.asarray(ids), jnp.asarray(mask))
    flops = benchmark_train_step.jaxpr_matmul_flops(fwd, *args)
    start = time.perf_counter()
    compiled = jax.jit(fwd).lower(*args).compile()
    compile_s = time.perf_counter() - start
    logits = compiled(*args)
    mine = clock(lambda: compiled(*args), jax.block_until_ready)
    row = dict(measurement="forward", impl="jax", batch=batch, tiles=tiles, tokens=int(ids.shape[1]),
               gflop=flops / 1e9, compile_s=compile_s, **mine, **rates(flops, mine["median_s"], batch, peak),
               **jax_memory(compiled))

    t_px = torch.from_numpy(px).permute(0, 3, 1, 2).contiguous().to(device, torch.bfloat16)
    t_ids, t_mask = torch.from_numpy(ids).long().to(device), torch.from_numpy(mask).long().to(device)

    def run_torch():
        with torch.no_grad():
            return torch_ref(pixel_values=t_px, input_ids=t_ids, attention_mask=t_mask).logits

    reset_torch_peak(device)
    theirs = clock(run_torch, torch_sync(device))
    ref_logits = run_torch()[:, -1].float().cpu().numpy()
    last = np.asarray(logits[:, -1], np.float32)
    torch_row = dict(measurement="forward", impl="torch", batch=batch, tiles=tiles, **theirs,
                     **rates(flops, theirs["median_s"], batch, peak), **torch_memory(device),
                     jax_speedup=theirs["median_s"] / mine["median_s"],
                     last_token_logits_max_rel_diff=float(np.abs(last - ref_logits).max() / np.abs(ref_logits).max()))
    return [row, torch_row]


def seed_recipe_config(cfg, attention: str):
    """configs/internvl3_1b_retrieval.py with a random backbone of `cfg`'s sizes (nothing is read from disk)."""
    from vlm_jax import config_files

    config = config_files.load_config_file(os.path.join(REPO, "configs", "internvl3_1b_retrieval.py"))
    config.model.backbone = "tiny"  # random init; the backbone config is passed to the trainer directly
    config.model.attention = attention
    config.mesh = {"data": 1}
    return config


def seed_recipe_trainer(cfg, config):
    """The seed recipe's trainer and a freshly initialised train state (random frozen backbone in bf16)."""
    import jax

    from vlm_jax import sharding
    from vlm_jax.trainer import make_trainer

    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    trainer = make_trainer(config, mesh, 1000, cfg)
    model_state = trainer.init_model_state()
    return trainer, trainer.assemble(model_state, trainer.init_train_items(model_state))


def measure_step(cfg, config, trainer, holder, torch_ref, batch, clock, peak, device) -> list[dict]:
    """`holder[0]` is the train state, donated to each step and replaced by its result."""
    import jax

    import benchmark_train_step
    from vlm_jax import sharding

    config.batch_size = batch
    host = benchmark_train_step.synthetic_batch(config, cfg, batch)
    data = sharding.global_batch(host, trainer.mesh)
    rng = jax.random.key(0)
    flops = benchmark_train_step.jaxpr_matmul_flops(trainer._train_step, holder[0], data, rng)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(holder[0], data, rng).compile()
    compile_s = time.perf_counter() - start

    def step():
        holder[0], metrics = compiled(holder[0], data, rng)
        return metrics["total"]

    mine = clock(step, jax.block_until_ready)
    row = dict(measurement="train_step", impl="jax", batch=batch, tiles=1, gflop=flops / 1e9, compile_s=compile_s,
               loss=float(step()), **mine, **rates(flops, mine["median_s"], batch, peak), **jax_memory(compiled))
    del compiled

    torch_step = TorchSeedStep(torch_ref, cfg, config, device)
    reset_torch_peak(device)
    theirs = clock(lambda: torch_step(host), torch_sync(device))
    torch_row = dict(measurement="train_step", impl="torch", batch=batch, tiles=1, **theirs,
                     **rates(flops, theirs["median_s"], batch, peak), **torch_memory(device),
                     jax_speedup=theirs["median_s"] / mine["median_s"])
    return [row, torch_row]


class TorchSeedStep:
    """The seed recipe's step in PyTorch: frozen backbone under no_grad (CLS of the last ViT layer, the caption's
    last LM hidden state), float32 adapters (Linear, ReLU, dropout 0.1), projections + L2 norm, temperature, linear
    ITM / box / spatial heads on [u, v]; losses ITC + ITM (one shuffled negative) + 0.1 L1 box + 0.1 CE spatial;
    AdamW lr 1e-4."""

    def __init__(self, backbone, cfg, config, device):
        import torch
        from torch import nn

        self.torch, self.device = torch, device
        self.backbone = backbone
        emb = config.model.embedding
        a, e = int(emb.adapter_dim), int(emb.embed_dim)
        with torch.device(device):
            self.heads = nn.ModuleDict(dict(
                vision=nn.Sequential(nn.Linear(cfg.vision.hidden_size, a), nn.ReLU(), nn.Dropout(0.1), nn.Linear(a, e)),
                text=nn.Sequential(nn.Linear(cfg.text.hidden_size, a), nn.ReLU(), nn.Dropout(0.1), nn.Linear(a, e)),
                itm=nn.Linear(2 * e, 1), box=nn.Linear(2 * e, 4), spatial=nn.Linear(2 * e, 6)))
            self.log_scale = nn.Parameter(torch.tensor(float(np.log(emb.logit_scale_init))))
        self.opt = torch.optim.AdamW([*self.heads.parameters(), self.log_scale], lr=1e-4, weight_decay=0.01)

    def __call__(self, host: dict):
        torch, f = self.torch, self.torch.nn.functional
        dev = self.device
        px = torch.from_numpy(host["image"]).permute(0, 3, 1, 2).contiguous().to(dev, torch.bfloat16)
        ids = torch.from_numpy(host["text_ids"]).long().to(dev)
        mask = torch.from_numpy(host["text_mask"]).long().to(dev)
        with torch.no_grad():
            vision = self.backbone.model.vision_tower(pixel_values=px).last_hidden_state[:, 0]
            hidden = self.backbone.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(1) - 1
            text = hidden[torch.arange(len(ids), device=dev), last]
        u = f.normalize(self.heads["vision"](vision.float()), dim=-1)
        v = f.normalize(self.heads["text"](text.float()), dim=-1)
        logits = self.log_scale.exp().clamp(max=100.0) * u @ v.T
        labels = torch.arange(len(u), device=dev)
        itc = (f.cross_entropy(logits, labels) + f.cross_entropy(logits.T, labels)) / 2
        pairs = torch.cat([torch.cat([u, v], -1), torch.cat([u, v.roll(1, 0)], -1)])
        itm_target = torch.cat([torch.ones(len(u), device=dev), torch.zeros(len(u), device=dev)])
        itm = f.binary_cross_entropy_with_logits(self.heads["itm"](pairs)[:, 0], itm_target)
        fused = pairs[:len(u)]
        box = f.l1_loss(self.heads["box"](fused).sigmoid(), torch.from_numpy(host["box"]).to(dev))
        spatial = f.cross_entropy(self.heads["spatial"](fused), torch.from_numpy(host["relation"]).long().to(dev))
        loss = itc + itm + 0.1 * box + 0.1 * spatial
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def torch_sync(device):
    import torch

    if device == "cuda":
        return lambda _: torch.cuda.synchronize()
    return lambda _: None


def reset_torch_peak(device):
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def torch_memory(device) -> dict:
    import torch

    return {"process_peak_bytes": int(torch.cuda.max_memory_allocated())} if device == "cuda" else {}


def _rounded(value):
    # Significant digits, not decimals: the smoke run's TFLOP/s are ~1e-5 and must not print as 0.
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return [_rounded(v) for v in value] if isinstance(value, list) else value


def emit(row: dict) -> None:
    print(json.dumps({k: _rounded(v) for k, v in row.items()}), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths, every code path, on the CPU in < 1 min")
    parser.add_argument("--attention", default="auto", help="vlm_jax attention: auto | xla | cudnn | map | einsum")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; smoke 2)")
    parser.add_argument("--forward_batch", type=int, default=None, help="images per forward (default 8; smoke 2)")
    parser.add_argument("--step_batches", default=None, help="train-step batches (default 4,32,128; smoke 2)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 peak when the device is not known")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # PyTorch shares the device: JAX allocates what it needs instead of 75 % of the memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch
    import transformers

    repeats = args.repeats or (2 if args.smoke else 5)
    forward_batch = args.forward_batch or (2 if args.smoke else 8)
    step_batches = [int(b) for b in (args.step_batches or ("2" if args.smoke else "4,32,128")).split(",")]
    tiles = (1, 2) if args.smoke else (1, 4)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind, args.peak_tflops)
    cfg = model_config(args.smoke)
    clock = Clock(repeats)
    emit(dict(measurement="device", device_kind=kind, backend=jax.default_backend(), peak_bf16_tflops=peak,
              torch_device=torch.cuda.get_device_name() if device == "cuda" else "cpu", jax=jax.__version__,
              torch=torch.__version__, transformers=transformers.__version__, attention=args.attention,
              attention_chosen=chosen_attention(cfg, args.attention), vision_layers=cfg.vision.num_layers,
              text_layers=cfg.text.num_layers, smoke=args.smoke))

    failures = 0

    def attempt(name, fn):
        nonlocal failures
        try:
            for row in fn():
                emit(row)
        except Exception as err:  # noqa: BLE001 - one failed measurement must not hide the others
            failures += 1
            emit(dict(measurement=name, error=f"{type(err).__name__}: {err}"[:2000],
                      where=traceback.format_exc(limit=-3)[-1500:]))

    torch_ref = torch_model(cfg, device, torch.bfloat16)
    module = jax_model(cfg, torch_ref, args.attention)
    for t in tiles:
        attempt(f"forward/tiles={t}", lambda t=t: measure_forward(cfg, torch_ref, module, forward_batch, t,
                                                                 clock, peak, device))
    del module
    config = seed_recipe_config(cfg, args.attention)
    trainer, state = seed_recipe_trainer(cfg, config)
    holder = [state]
    del state
    for b in step_batches:
        attempt(f"train_step/batch={b}",
                lambda b=b: measure_step(cfg, config, trainer, holder, torch_ref, b, clock, peak, device))
    return 1 if failures else 0


def chosen_attention(cfg, attention: str) -> dict:
    """What `attention` resolves to for the vision tower's and the LM's shapes at batch 1, bf16."""
    import jax
    import jax.numpy as jnp

    from vlm_jax.models import layers

    def pick(tokens, heads, kv_heads, head_dim, masked):
        q = jax.ShapeDtypeStruct((1, tokens, heads, head_dim), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((1, tokens, kv_heads, head_dim), jnp.bfloat16)
        return layers.choose_attention(attention, q, k, masked)

    v, t = cfg.vision, cfg.text
    return dict(vision=pick((v.image_size // v.patch_size) ** 2 + 1, v.num_heads, v.num_heads,
                            v.hidden_size // v.num_heads, False),
                text=pick(cfg.num_image_tokens + TEXT_TOKENS + 2, t.num_heads, t.num_kv_heads, t.head_dim, True))


if __name__ == "__main__":
    sys.exit(main())
