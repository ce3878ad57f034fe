"""Batches of examples with tiles: the distinct images' tiles packed into one array of a bucketed size, prompts and
generative targets built with each image's final tile count and padded to bucketed lengths (`Batcher`, the grain
`batch_fn` of `vlm_jax.data.pipeline`).

A batch of B examples holds N tiles, N the smallest of `tile_buckets` sizes up to its budget (`tile_budget` tiles per
image on average; 0 = no limit), multiples of the devices the batch is split over; over the budget the largest image
is re-tiled with the next smaller grid until the batch fits (counted), never truncated. With `share_images`
(evaluation) rows of the same image_id share its tiles. The batch fields are listed in `vlm_jax.data.pipeline`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.data import generative


def tiles_per_image(data_config: ml_collections.ConfigDict) -> int:
    """T: the most tiles one image gets (max_tiles, + 1 thumbnail when max_tiles > 1 and use_thumbnail)."""
    extra = 1 if data_config.use_thumbnail and data_config.max_tiles > 1 else 0
    return int(data_config.max_tiles) + extra


def tile_budget(data_config: ml_collections.ConfigDict, rows: int) -> int:
    """The most tiles a batch of `rows` images holds: rows * `tile_budget` (tiles per image on average; 0 = T)."""
    per_image = float(data_config.tile_budget) or tiles_per_image(data_config)
    return max(rows, math.ceil(rows * per_image))


def bucket_sizes(limit: int, count: int, multiple: int = 1) -> tuple[int, ...]:
    """`count` sizes spread evenly up to `limit`, each rounded up to a multiple of `multiple` (ascending, unique)."""
    up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    return tuple(sorted({up(max(1, math.ceil(limit * k / count))) for k in range(1, count + 1)}))


# The encoder's per-example keys for the batcher (not batch fields).
_PRIVATE = ("_image_tiles", "_image_regions", "_encoded", "_caption", "_target", "_record_index", "_caption_index")


@dataclasses.dataclass
class Batcher:
    """Examples -> one batch: row fields stacked, the distinct images' tiles packed into a bucketed tile array,
    prompts built with each image's tile count and padded to a bucketed length (see the module docstring)."""

    encode: Any  # pipeline._Encoder: tiles(), use_thumbnail, image_size, prompts, prompt_length, lm_length
    tiles_per_image: int  # T
    budget: int  # most tiles in one batch
    tile_sizes: tuple[int, ...]  # allowed N, ascending; the last >= budget
    prompt_sizes: tuple[int, ...]  # allowed Lp, ascending
    share_images: bool  # rows with the same image_id share its tiles (evaluation)
    lm_sizes: tuple[int, ...] = ()  # allowed LM sequence lengths, ascending (with generative targets)
    with_keys: bool = False  # batches carry record_index and caption_index int64[B] (the feature cache's keys)

    def __call__(self, examples: Sequence[dict]) -> dict:
        slots: dict[Any, int] = {}
        row_slot, images = [], []
        for r, ex in enumerate(examples):
            key = int(ex["image_id"]) if self.share_images else r
            if key not in slots:
                slots[key] = len(images)
                images.append([ex["_image_tiles"], ex["_image_regions"], ex])
            row_slot.append(slots[key])
        retiled = 0
        while sum(len(im[0]) for im in images) > self.budget:
            # Fewer tiles for the image with the most (the first of equals): the next smaller grid, thumbnail kept.
            im = max(images, key=lambda x: len(x[0]))
            grid = len(im[0]) - (1 if self.encode.use_thumbnail and len(im[0]) > 1 else 0)
            im[0], im[1] = self.encode.tiles(im[2]["_encoded"], int(im[2]["image_id"]), grid - 1)
            retiled += 1
        counts = [len(im[0]) for im in images]
        total = sum(counts)
        n = next(size for size in self.tile_sizes if size >= total)
        s = self.encode.image_size
        tiles = np.zeros((n, s, s, 3), np.float32)
        regions = np.zeros((n, 4), np.float32)
        starts = np.cumsum([0] + counts)
        for (im_tiles, im_regions, _), start in zip(images, starts):
            tiles[start: start + len(im_tiles)] = im_tiles
            regions[start: start + len(im_tiles)] = im_regions
        rows = len(examples)
        row_tiles = np.full((rows, self.tiles_per_image), -1, np.int32)
        num_tiles = np.zeros(rows, np.int32)
        for r, slot in enumerate(row_slot):
            num_tiles[r] = counts[slot]
            row_tiles[r, : counts[slot]] = np.arange(starts[slot], starts[slot + 1])

        prompts = copy.copy(self.encode.prompts)  # its own truncation counter: batches may be built in parallel
        before = prompts.num_truncated
        seqs = [prompts.prompt_ids(ex["_caption"], int(num_tiles[r])) for r, ex in enumerate(examples)]
        # Room for any row's image block followed by any row's text: the model splices (image i, caption j) pairs.
        ends = [seq.index(prompts.img_end_id) + 1 for seq in seqs]
        longest = max(ends) + max(len(seq) - end for seq, end in zip(seqs, ends))
        length = next((size for size in self.prompt_sizes if size >= longest), longest)
        prompt_ids, prompt_mask = prompts.batch(seqs, length=length, padding_side="right")

        out = stack_fields(examples, self.with_keys)
        if "_target" in examples[0]:
            out.update(self.lm_sequences(examples, num_tiles))
        real_tokens = sum(len(seq) for seq in seqs)
        out.update(tiles=tiles, tile_regions=regions, row_tiles=row_tiles, num_tiles=num_tiles, prompt_ids=prompt_ids,
                   prompt_mask=prompt_mask, _truncated_prompts=np.int32(prompts.num_truncated - before),
                   _retiled_images=np.int32(retiled), _tiles=np.int32(total), _padding_tiles=np.int32(n - total),
                   _prompt_tokens=np.int32(real_tokens), _padding_tokens=np.int32(rows * length - real_tokens))
        return out

    def lm_sequences(self, examples: Sequence[dict], num_tiles: np.ndarray) -> dict:
        """lm_ids, lm_labels, lm_spans int32[B, Lg], lm_mask int32[B, Lg], lm_kind int32[B] (index in
        `generative.KINDS`), padded to the smallest LM bucket; answers past the limit cut and counted."""
        prompts, limit = self.encode.prompts, self.encode.lm_length
        seqs, cut = [], 0
        for r, ex in enumerate(examples):
            full = generative.encode(prompts, ex["_target"], int(num_tiles[r]))
            kept = generative.truncate(*full, limit, prompts.eos_id)
            if kept is None:
                raise ValueError(f"{self.encode.dataset} image_id={int(ex['image_id'])}: the question and image "
                                 f"block take {len(full[0])} tokens, more than the LM length {limit}")
            cut += len(kept[0]) < len(full[0])
            seqs.append(kept)
        longest = max(len(ids) for ids, _, _ in seqs)
        length = next(n for n in self.lm_sizes if n >= longest)
        out = {name: np.full((len(seqs), length), fill, np.int32)
               for name, fill in (("lm_ids", prompts.pad_id), ("lm_labels", generative.IGNORE_INDEX),
                                  ("lm_spans", 0), ("lm_mask", 0))}
        for r, (ids, labels, spans) in enumerate(seqs):
            n = len(ids)
            out["lm_ids"][r, :n], out["lm_labels"][r, :n], out["lm_spans"][r, :n] = ids, labels, spans
            out["lm_mask"][r, :n] = 1
        out["lm_kind"] = np.asarray([generative.KINDS.index(ex["_target"].kind) for ex in examples], np.int32)
        out["_truncated_answers"] = np.int32(cut)
        return out


def stack_fields(examples: Sequence[dict], with_keys: bool = False) -> dict:
    """The examples' row fields stacked (private keys dropped; `with_keys`: record_index and caption_index kept)."""
    out = {k: np.stack([ex[k] for ex in examples]) for k in examples[0] if k not in _PRIVATE}
    if with_keys:
        out["record_index"] = np.asarray([ex["_record_index"] for ex in examples], np.int64)
        out["caption_index"] = np.asarray([ex["_caption_index"] for ex in examples], np.int64)
    return out


def make_batcher(data_config: ml_collections.ConfigDict, encode, rows: int, *, tile_multiple: int = 1,
                 share_images: bool, with_keys: bool = False, images_per_batch: int | None = None) -> Batcher:
    """The batch function for `rows` examples of `encode` (an `_Encoder`, or anything with its `tiles`,
    `use_thumbnail`, `image_size`, `prompts` and `prompt_length`): the tile budget, `tile_buckets` tile-array
    sizes (multiples of `tile_multiple`) and as many prompt lengths (multiples of 8, none past the longest).
    `images_per_batch` (with `share_images`): the most distinct images one batch holds; the tile-array sizes stop at
    their T tiles each (rows sharing an image need no room of their own; re-tiling is as without it)."""
    budget = tile_budget(data_config, rows)
    if share_images and images_per_batch:
        budget = min(budget, int(images_per_batch) * tiles_per_image(data_config))
    count = int(data_config.tile_buckets)
    lengths = lambda longest: tuple(sorted({min(n, longest) for n in bucket_sizes(longest, count, 8)}))  # noqa: E731
    lm_sizes = lengths(int(encode.lm_length)) if getattr(encode, "lm_kinds", ()) else ()
    return Batcher(encode, tiles_per_image(data_config), budget, bucket_sizes(budget, count, tile_multiple),
                   lengths(int(encode.prompt_length)), share_images=share_images, lm_sizes=lm_sizes,
                   with_keys=with_keys)
