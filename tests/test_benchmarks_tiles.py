"""The train-step benchmark's tiled synthetic batches: the pipeline's layout, packing and prompt image blocks."""

import sys
from pathlib import Path

import numpy as np
import pytest

from vlm_jax import build, config_files

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import benchmark_train_step as bench  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    cfg = config_files.load_config_file(REPO / "configs" / "tiny_synthetic.py")
    cfg.batch_size = 8
    return cfg, build.resolve_backbone(cfg.model).config


@pytest.mark.parametrize("max_tiles", [1, 4])
def test_tiled_batch_layout(setup, max_tiles):
    cfg, mc = setup
    batch = bench.synthetic_batch(cfg, mc, cfg.batch_size, seed=3, max_tiles=max_tiles)
    stats = bench.tile_statistics(cfg, mc, max_tiles, num_batches=5)
    assert "image" not in batch and not any(k.startswith("_") for k in batch)
    n, b = len(batch["tiles"]), cfg.batch_size
    assert batch["tiles"].shape == (n, mc.image_size, mc.image_size, 3) and n in stats["tile_buckets"]
    assert batch["row_tiles"].shape == (b, stats["tiles_per_image"])
    assert batch["prompt_ids"].shape[1] in stats["prompt_buckets"]
    used = batch["num_tiles"].sum()
    # Rows (distinct images in training) own consecutive tiles; padding tiles are zero.
    np.testing.assert_array_equal(np.sort(batch["row_tiles"][batch["row_tiles"] >= 0]), np.arange(used))
    np.testing.assert_array_equal((batch["row_tiles"] >= 0).sum(1), batch["num_tiles"])
    assert not batch["tiles"][used:].any() and batch["tiles"][:used].std() > 0.5
    image_tokens = (batch["prompt_ids"] == mc.image_token_id).sum(1)
    np.testing.assert_array_equal(image_tokens, mc.num_image_tokens * batch["num_tiles"])
    if max_tiles == 1:
        assert n == b and (batch["num_tiles"] == 1).all()
    # Legacy layout unchanged.
    assert "image" in bench.synthetic_batch(cfg, mc, 2, seed=0) and "tiles" not in bench.synthetic_batch(cfg, mc, 2)


def test_statistics_shapes_and_budget(setup):
    cfg, mc = setup
    stats = bench.tile_statistics(cfg, mc, 4, num_batches=6)
    assert abs(sum(s["share"] for s in stats["shapes"]) - 1) < 1e-9
    for shape in stats["shapes"]:  # each shape's seed rebuilds a batch of that shape
        batch = bench.synthetic_batch(cfg, mc, cfg.batch_size, shape["seed"], max_tiles=4)
        assert (len(batch["tiles"]), batch["prompt_ids"].shape[1]) == (shape["tiles"], shape["prompt_length"])
    assert 0 <= stats["tile_padding_fraction"] < 1 and 0 < stats["prompt_padding_fraction"] < 1
    tight = cfg.copy_and_resolve_references()
    tight.data.tile_budget = 1.5  # fewer tiles than the images want: the pipeline re-tiles, never truncates
    squeezed = bench.tile_statistics(tight, mc, 4, num_batches=6)
    assert squeezed["retiled_images_per_batch"] > 0 and squeezed["tile_budget"] == 12
    assert max(s["tiles"] for s in squeezed["shapes"]) <= 12
    assert squeezed["mean_tiles_per_image"] <= 1.5
