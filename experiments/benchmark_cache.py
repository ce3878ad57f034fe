"""Epoch times of the seed recipe with and without the feature cache, in one process.

    python experiments/benchmark_cache.py [--images 256] [--epochs 3] [--layers 2] [--batch_size 4]
        [--workdir DIR] [--dtype float32] [--box_head attention --max_tiles 6 --aspect_ratios 1,2,0.5,1.5]

The seed recipe (`configs/internvl3_1b_retrieval.py`: frozen backbone, late fusion, ITC + ITM + box + spatial heads,
dropout 0.1, batch 4) on a random backbone of InternVL3-1B's widths (InternViT 1024 wide at 448 px, 1025 tokens per
tile; Qwen2 896 wide) with `--layers` layers per tower instead of 24, on a fresh spatial_shapes build of `--images`
448-px training images with 5 captions each (built first, timed apart). Both runs start from the same initial
state and see the same batches:
  reference  the train loop's step on pipeline batches (images decoded and tiled, the backbone in every step)
  cached     `feature_cache.prepare` (the write pass over the training split) and then the same step on cached
             batches; the write pass counts in epoch 1.
`--box_head attention` caches every tile's patch tokens too (the box head attends over them); with `--max_tiles`
> 1 and `--aspect_ratios` (width / height ratios drawn per image, short side 448) images get different tile counts,
and `cache_disk_bytes_per_image` (what the files take) is below `cache_bytes_per_image` (their size, every image's
max_tiles + 1 patch slots). Epoch 1 includes compiling the step in both. Prints one JSON line: seconds per epoch
of each, the speed-up of epochs 2..n (reference median / cached median) and of a 5-epoch run projected from the measured epochs (epoch 1 +
4 x the median of epochs 2..n), the cache's size on disk per image (its 5 captions included) and per pair, and the
difference of the final losses (the two runs train the same model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout

from vlm_jax import build, config_files, feature_cache, runs, sharding  # noqa: E402
from vlm_jax.trainer import make_trainer  # noqa: E402

CAPTIONS = 5  # per image, as COCO


def recipe_config(workdir: Path, images: int, layers: int, batch_size: int, dtype: str, box_head: str = "linear",
                  max_tiles: int = 1, aspect_ratios: tuple[float, ...] = ()) -> ml_collections.ConfigDict:
    c = config_files.load_config_file(REPO / "configs" / "internvl3_1b_retrieval.py")
    c.model.backbone, c.model.tokenizer = "tiny", "demo"  # random weights of InternVL3-1B's widths
    c.model.tiny = ml_collections.ConfigDict(dict(
        image_size=448,
        vision=dict(hidden_size=1024, num_layers=layers, num_heads=16, intermediate_size=4096, patch_size=14),
        text=dict(hidden_size=896, num_layers=layers, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                  rope_theta=1e6)))
    c.model.dtype = c.model.frozen_param_dtype = dtype
    c.data.name, c.data.builder_config, c.data.manual_dir = "spatial_shapes", "", ""
    c.data.builder_params = ml_collections.ConfigDict(dict(
        image_size=448, num_train=images, num_validation=32, num_test=32, pairs_per_image=CAPTIONS, min_objects=3,
        **(dict(aspect_ratios=aspect_ratios) if aspect_ratios else {})))
    c.data.max_tiles = max_tiles
    c.tasks.box.head = box_head
    c.data.data_dir = str(workdir / "tfds")
    c.data.num_workers = 0  # in-process decoding is faster on a few cores (see vlm_jax.data.pipeline)
    c.batch_size, c.eval_batch_size, c.eval_splits = batch_size, 16, ()
    c.feature_cache.dir = str(workdir / "feature_cache")
    return c


def train_epochs(config, epochs: int, cached: bool, workdir: Path) -> dict:
    """Trains `epochs` passes over the training images; seconds per epoch (+ the write pass in epoch 1)."""
    mesh = sharding.make_mesh(config.mesh)
    backbone = build.resolve_backbone(config.model)
    steps = config.data.builder_params.num_train // config.batch_size
    trainer = make_trainer(config, mesh, epochs * steps, backbone.config)
    inputs = runs.model_inputs(backbone)
    model_state = trainer.init_model_state()
    state = trainer.assemble(model_state, trainer.init_train_items(model_state))
    began = time.monotonic()
    record = {}
    cache = None
    if cached:
        cache = feature_cache.prepare(trainer, state, config, inputs, str(workdir))[config.data.train_split]
        record["write_pass_seconds"] = round(time.monotonic() - began, 2)
    batches = runs.make_data(config, inputs, config.data.train_split, train=True, cache=cache)
    rng = jax.random.key(config.seed + 1)
    seconds = []
    for epoch in range(epochs):
        start = began if epoch == 0 else time.monotonic()
        for _ in range(steps):
            state, metrics = trainer.train_step(state, sharding.global_batch(next(batches), mesh), rng)
        loss = float(metrics["total"])  # waits for the epoch's last step
        seconds.append(round(time.monotonic() - start, 2))
    record.update(epoch_seconds=seconds, final_loss=loss, steps_per_epoch=steps)
    if cached:
        done = json.loads((cache.directory / "complete.json").read_text())
        record.update(cache_bytes=done["bytes"], cache_disk_bytes=done["disk_bytes"], cache_images=done["images"],
                      cache_captions=done["captions"])
        tiles = np.load(cache.directory / "image.num_tiles.npy")
        record.update(tiles_per_image_mean=round(float(tiles.mean()), 2), tile_slots_per_image=cache.spec.get(
            "cached_patches", [[0]])[0][0])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2, help="layers per tower (InternVL3-1B: 24)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--workdir", default="", help="default: a fresh temporary directory, removed at the end")
    parser.add_argument("--box_head", default="linear", choices=("linear", "attention"),
                        help="linear: the seed recipe; attention: the box head reads (and the cache stores) patches")
    parser.add_argument("--max_tiles", type=int, default=1, help="dynamic tiles per image (+ a thumbnail when > 1)")
    parser.add_argument("--aspect_ratios", default="", help="comma-separated width / height ratios (default square)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="benchmark_cache_"))
    ratios = tuple(float(r) for r in args.aspect_ratios.split(",") if r)
    config = recipe_config(workdir, args.images, args.layers, args.batch_size, args.dtype, args.box_head,
                           args.max_tiles, ratios)
    from vlm_jax.data import pipeline

    began = time.monotonic()
    pipeline.make_builder(config.data)
    build_seconds = round(time.monotonic() - began, 1)
    reference = train_epochs(config, args.epochs, cached=False, workdir=workdir)
    cached = train_epochs(config, args.epochs, cached=True, workdir=workdir)
    ref, fast = reference["epoch_seconds"], cached["epoch_seconds"]
    later_ref, later_fast = statistics.median(ref[1:]), statistics.median(fast[1:])
    five = lambda s: s[0] + 4 * statistics.median(s[1:])  # noqa: E731
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "images": args.images, "captions_per_image": CAPTIONS,
        "layers_per_tower": args.layers, "batch_size": args.batch_size, "dtype": args.dtype,
        "box_head": args.box_head, "max_tiles": args.max_tiles, "aspect_ratios": list(ratios),
        "dataset_build_seconds": build_seconds,
        "reference": reference, "cached": cached,
        "speedup_epochs_2_to_n": round(later_ref / later_fast, 1),
        "speedup_5_epochs_projected": round(five(ref) / five(fast), 2),
        "cache_bytes_per_image": round(cached["cache_bytes"] / cached["cache_images"]),
        "cache_bytes_per_pair": round(cached["cache_bytes"] / cached["cache_captions"]),
        "cache_disk_bytes_per_image": round(cached["cache_disk_bytes"] / cached["cache_images"]),
        "final_loss_difference": abs(reference["final_loss"] - cached["final_loss"]),
    }, sort_keys=True))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
