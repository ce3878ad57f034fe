"""One process's feature cache of one split on disk: fixed-size `.npy` arrays filled by a write pass, read back by
row through memory maps.

    <dir>/key.json               the settings the cache key was made from (`vlm_jax.feature_cache.key`)
    <dir>/image.<field>.npy      [I, ...] one row per image of the shard (slot = its position in the shard)
    <dir>/caption.<field>.npy    [C, ...] one row per (image, caption) of the shard
    <dir>/progress.json          the write pass's batches that are on disk (flushed before this file is replaced)
    <dir>/complete.json          written last: the cache is whole and may be read

Image fields: the backbone's per-image outputs (`cached_image`, `cached_patches`, `cached_regions`) with
`num_tiles` and `image_aspect`; caption fields: `cached_text`, `cached_text_hidden`, `cached_query`. Arrays keep the
backbone's dtype (bfloat16 is stored as its uint16 bits), so a cached row is bit for bit what the backbone gave.
Patch rows have a slot per possible tile; only an image's own tiles are written, so the rest take no disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
from etils import epath

from vlm_jax.data import batching

IMAGE_FIELDS = ("cached_image", "cached_patches", "cached_regions", "num_tiles", "image_aspect")
CAPTION_FIELDS = ("cached_text", "cached_text_hidden", "cached_query")
# Written tile by tile, only the image's own tiles: the padding tiles after num_tiles stay holes in the sparse file
# (no disk; read back as the zeros the backbone gave there).
SPARSE_TILE_FIELDS = ("cached_patches",)
_STORED_AS = {"bfloat16": np.uint16}  # numpy's .npy header cannot name bfloat16


class CacheError(ValueError):
    """A feature cache that cannot be used as it is (named with its directory and what was expected)."""


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Where each image and caption of one process's shard lives: images in shard order, captions image by image."""

    records: np.ndarray  # int64[I] record indices of the split, ascending
    caption_counts: np.ndarray  # int64[I]

    @property
    def offsets(self) -> np.ndarray:
        """int64[I + 1]: the first caption row of each image."""
        return np.concatenate([[0], np.cumsum(self.caption_counts)]).astype(np.int64)

    @property
    def num_images(self) -> int:
        return len(self.records)

    @property
    def num_captions(self) -> int:
        return int(self.caption_counts.sum())

    def image_slots(self, records: np.ndarray) -> np.ndarray:
        """int64[B] record indices -> their image rows; a record outside the shard raises."""
        slots = np.searchsorted(self.records, records)
        slots = np.minimum(slots, self.num_images - 1)
        missing = self.records[slots] != records
        if missing.any():
            raise CacheError(f"records {records[missing][:5].tolist()} are not in this shard of the feature cache")
        return slots

    def caption_slots(self, records: np.ndarray, captions: np.ndarray) -> np.ndarray:
        """int64[B] record and caption indices -> their caption rows."""
        slots = self.image_slots(records)
        if (captions >= self.caption_counts[slots]).any() or (captions < 0).any():
            raise CacheError(f"caption indices {captions.tolist()} out of range for records {records.tolist()}")
        return self.offsets[slots] + captions


def _write_json(path: epath.Path, value) -> None:
    """Atomically: a reader sees the old file or the new one, never a part."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: epath.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def field_spec(batch_outputs: Mapping[str, np.ndarray]) -> dict[str, list]:
    """{field: [per-row shape, dtype name]} of a batch of backbone outputs (+ num_tiles, image_aspect)."""
    return {k: [list(v.shape[1:]), str(v.dtype)] for k, v in sorted(batch_outputs.items())}


def row_bytes(spec: Mapping[str, list], fields: Sequence[str]) -> int:
    return int(sum(np.prod(spec[k][0], dtype=np.int64) * np.dtype(_dtype(spec[k][1])).itemsize
                   for k in fields if k in spec))


def _dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


class CacheShard:
    """One process's cache of one split in `directory` (created, resumed or read)."""

    def __init__(self, directory: str | os.PathLike, key: str, layout: ShardLayout):
        self.directory = epath.Path(directory)
        self.key = key
        self.layout = layout
        self.spec: dict[str, list] | None = None
        self._arrays: dict[str, np.ndarray] = {}

    # ---- state on disk --------------------------------------------------------------------------------------------

    def _path(self, field: str) -> epath.Path:
        group = "image" if field in IMAGE_FIELDS else "caption"
        return self.directory / f"{group}.{field}.npy"

    def _rows(self, field: str) -> int:
        return self.layout.num_images if field in IMAGE_FIELDS else self.layout.num_captions

    def _open(self, mode: str) -> None:
        """Memory maps of every field in `self.spec` ('r' read, 'r+' write into existing, 'w+' create)."""
        self._arrays = {}
        for field, (shape, dtype) in self.spec.items():
            stored = np.dtype(_STORED_AS[dtype]) if dtype in _STORED_AS else np.dtype(dtype)
            full = (self._rows(field), *shape)
            path = os.fspath(self._path(field))
            if mode == "w+":
                array = np.lib.format.open_memmap(path, mode="w+", dtype=stored, shape=full)
            else:
                array = np.load(path, mmap_mode=mode)
                if array.shape != full or array.dtype != stored:
                    raise CacheError(f"{path}: shape {array.shape} {array.dtype}, expected {full} {np.dtype(stored)}")
            self._arrays[field] = array

    def status(self) -> tuple[str, int]:
        """('complete', 0) | ('partial', batches on disk) | ('empty', 0); a damaged or foreign cache is removed
        (with a warning naming why) and reported empty."""
        if not self.directory.exists():
            return "empty", 0
        for name, state in (("complete.json", "complete"), ("progress.json", "partial")):
            record = _read_json(self.directory / name)
            if record is None:
                continue
            problem = None
            if record.get("key") != self.key:
                problem = f"{name} has key {record.get('key')!r}, expected {self.key!r}"
            else:
                self.spec = record["spec"]
                try:
                    self._open("r" if state == "complete" else "r+")
                except (OSError, ValueError) as err:
                    problem = f"{type(err).__name__}: {err}"
            if problem is None:
                return state, int(record.get("batches", 0))
            logging.warning("Feature cache %s is damaged and is rebuilt: %s", self.directory, problem)
            self.clear()
            return "empty", 0
        if any(self.directory.iterdir()):
            logging.warning("Feature cache %s has no progress record (killed before its first batch): rebuilt",
                            self.directory)
            self.clear()
        return "empty", 0

    def clear(self) -> None:
        self._arrays = {}
        shutil.rmtree(self.directory, ignore_errors=True)

    # ---- writing -------------------------------------------------------------------------------------------------

    def create(self, spec: Mapping[str, list], settings: Mapping) -> None:
        """Empty arrays of `spec` (sparse files: untouched rows take no disk)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_json(self.directory / "key.json", dict(settings, key=self.key))
        self.spec = dict(spec)
        self._open("w+")

    def write(self, outputs: Mapping[str, np.ndarray], records: np.ndarray, captions: np.ndarray) -> None:
        """Rows of one batch (valid rows only, with `num_tiles`): image fields at their images' rows, caption
        fields at theirs."""
        images = self.layout.image_slots(records)
        texts = self.layout.caption_slots(records, captions)
        for field, values in outputs.items():
            array = self._arrays[field]
            if self.spec[field][1] in _STORED_AS:
                values = np.asarray(values).view(array.dtype)
            if field in SPARSE_TILE_FIELDS:
                _, first = np.unique(images, return_index=True)  # an image's captions share its row
                for i in first:
                    n = int(outputs["num_tiles"][i])
                    array[images[i], :n] = values[i, :n]
            else:
                array[images if field in IMAGE_FIELDS else texts] = values

    def mark_progress(self, batches: int) -> None:
        """Flushes the arrays, then records that the first `batches` batches are on disk."""
        for array in self._arrays.values():
            array.flush()
        _write_json(self.directory / "progress.json", dict(key=self.key, spec=self.spec, batches=batches))

    def mark_complete(self, batches: int, seconds: float) -> None:
        for array in self._arrays.values():
            array.flush()
        size = sum(os.path.getsize(self._path(f)) for f in self.spec)
        _write_json(self.directory / "complete.json",
                    dict(key=self.key, spec=self.spec, batches=batches, images=self.layout.num_images,
                         captions=self.layout.num_captions, bytes=size, disk_bytes=self.disk_bytes(),
                         seconds=round(seconds, 1)))
        (self.directory / "progress.json").unlink(missing_ok=True)
        self._open("r")

    def disk_bytes(self) -> int:
        """The disk the arrays take (less than their size where padding tiles are holes)."""
        return sum(os.stat(self._path(f)).st_blocks * 512 for f in self.spec)

    # ---- reading -------------------------------------------------------------------------------------------------

    def rows(self, records: np.ndarray, captions: np.ndarray) -> dict[str, np.ndarray]:
        """The cached fields of rows (record, caption): image fields [B, ...], caption fields [B, ...]."""
        images = self.layout.image_slots(records)
        texts = self.layout.caption_slots(records, captions)
        out = {}
        for field, array in self._arrays.items():
            values = array[images if field in IMAGE_FIELDS else texts]
            out[field] = values.view(_dtype(self.spec[field][1])) if self.spec[field][1] in _STORED_AS else values
        return out

    def batcher(self, data_config) -> "CachedBatcher":
        """The pipeline's batch function over this cache."""
        return CachedBatcher(self, batching.tiles_per_image(data_config))


@dataclasses.dataclass
class CachedBatcher:
    """Examples (caption fields and cache keys, no image) -> one batch: row fields stacked + the cached backbone
    outputs of each row. Evaluation padding rows (valid False) read the shard's first caption."""

    cache: CacheShard
    tiles_per_image: int  # T of cached_patches

    def __call__(self, examples: Sequence[dict]) -> dict:
        out = batching.stack_fields(examples)
        records = np.asarray([ex["_record_index"] for ex in examples], np.int64)
        captions = np.asarray([ex["_caption_index"] for ex in examples], np.int64)
        if "valid" in out:
            padding = ~out["valid"].astype(bool)
            records[padding], captions[padding] = self.cache.layout.records[0], 0
        out.update(self.cache.rows(records, captions))
        real = int(out["num_tiles"].sum())
        slots = len(examples) * self.tiles_per_image if "cached_patches" in out else real
        out.update(_tiles=np.int32(real), _padding_tiles=np.int32(slots - real))
        return out
