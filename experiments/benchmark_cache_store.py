"""How fast three on-disk formats write and read the feature cache's rows (why `vlm_jax.feature_cache` stores numpy
memory maps).

    python experiments/benchmark_cache_store.py [--rows 4096] [--batch 4] [--reads 200] [--repeats 3]

One cache shape per line of output, both of the seed recipe at InternVL3-1B widths: `pooled` (per image: the pooled
vision feature, 1024 float32, and 5 pooled captions, 5 x 896 float32) and `patches` (per image: one 448-px tile's
1024 patch tokens, 1024 wide, bfloat16 bits). Rows are written in batches of 16 in order (as the write pass does)
and read back as `--reads` random batches of `--batch` rows (as a shuffled epoch does), in a fresh temporary
directory per format:
  npy_memmap    fixed-size .npy files written and read through numpy memory maps (what the cache uses)
  tensorstore   a zarr array per field, one chunk per row, written and read with tensorstore
  array_record  one record per row (the fields' bytes), random access with array_record's reader
Prints one JSON line per shape: per format the write MB/s and the read milliseconds per batch (median and range of
--repeats), and that the rows read back equal the rows written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {"pooled": {"image": ((1024,), np.float32), "captions": ((5, 896), np.float32)},
          "patches": {"patches": ((1024, 1024), np.uint16)}}
WRITE_BATCH = 16


def make_rows(shape: dict, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dims, dtype) in shape.items():
        data = rng.standard_normal((rows, *dims), np.float32)
        out[name] = data.view(np.uint32).astype(np.uint16) if dtype == np.uint16 else data.astype(dtype)
    return out


class NpyMemmap:
    def __init__(self, directory: Path, arrays: dict):
        self.paths = {k: directory / f"{k}.npy" for k in arrays}
        self.spec = {k: (v.shape, v.dtype) for k, v in arrays.items()}

    def write(self, arrays: dict) -> None:
        maps = {k: np.lib.format.open_memmap(self.paths[k], mode="w+", dtype=dt, shape=sh)
                for k, (sh, dt) in self.spec.items()}
        for start in range(0, len(next(iter(arrays.values()))), WRITE_BATCH):
            for k, m in maps.items():
                m[start:start + WRITE_BATCH] = arrays[k][start:start + WRITE_BATCH]
        for m in maps.values():
            m.flush()
        self.maps = {k: np.load(p, mmap_mode="r") for k, p in self.paths.items()}

    def read(self, rows: np.ndarray) -> dict:
        return {k: np.asarray(m[rows]) for k, m in self.maps.items()}


class TensorStore:
    def __init__(self, directory: Path, arrays: dict):
        import tensorstore as ts

        self.ts = ts
        self.stores = {}
        for k, v in arrays.items():
            spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(directory / k)},
                    "metadata": {"shape": list(v.shape), "chunks": [1, *v.shape[1:]], "dtype": v.dtype.str,
                                 "compressor": None}}
            self.stores[k] = ts.open(spec, create=True, delete_existing=True).result()

    def write(self, arrays: dict) -> None:
        n = len(next(iter(arrays.values())))
        for start in range(0, n, WRITE_BATCH):
            stop = min(start + WRITE_BATCH, n)
            futures = [s[start:stop].write(arrays[k][start:stop]) for k, s in self.stores.items()]
            for f in futures:
                f.result()

    def read(self, rows: np.ndarray) -> dict:
        futures = {k: s[rows].read() for k, s in self.stores.items()}
        return {k: f.result() for k, f in futures.items()}


class ArrayRecord:
    def __init__(self, directory: Path, arrays: dict):
        self.path = str(directory / "rows.array_record")
        self.spec = {k: (v.shape[1:], v.dtype) for k, v in arrays.items()}

    def write(self, arrays: dict) -> None:
        from array_record.python import array_record_module

        writer = array_record_module.ArrayRecordWriter(self.path, "group_size:1")
        for i in range(len(next(iter(arrays.values())))):
            writer.write(b"".join(arrays[k][i].tobytes() for k in self.spec))
        writer.close()
        self.reader = array_record_module.ArrayRecordReader(self.path)

    def read(self, rows: np.ndarray) -> dict:
        records = self.reader.read(rows.tolist())
        out = {k: [] for k in self.spec}
        for record in records:
            offset = 0
            for k, (dims, dtype) in self.spec.items():
                size = int(np.prod(dims)) * np.dtype(dtype).itemsize
                out[k].append(np.frombuffer(record, dtype, count=size // np.dtype(dtype).itemsize,
                                            offset=offset).reshape(dims))
                offset += size
        return {k: np.stack(v) for k, v in out.items()}


FORMATS = {"npy_memmap": NpyMemmap, "tensorstore": TensorStore, "array_record": ArrayRecord}


def measure(name: str, shape: dict, rows: int, batch: int, reads: int, repeats: int) -> dict:
    arrays = make_rows(shape, rows)
    total = sum(v.nbytes for v in arrays.values())
    rng = np.random.default_rng(1)
    batches = [rng.choice(rows, batch, replace=False) for _ in range(reads)]
    out = {"shape": name, "rows": rows, "bytes_per_row": total // rows, "batch": batch}
    for fmt, cls in FORMATS.items():
        writes, per_batch, equal = [], [], True
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                store = cls(Path(tmp), arrays)
                began = time.perf_counter()
                store.write(arrays)
                writes.append(total / 2**20 / (time.perf_counter() - began))
                began = time.perf_counter()
                for rows_read in batches:
                    got = store.read(np.sort(rows_read))
                per_batch.append(1e3 * (time.perf_counter() - began) / reads)
                last = np.sort(batches[-1])
                equal &= all(np.array_equal(got[k], arrays[k][last]) for k in arrays)
        out[fmt] = {"write_MB_per_s": round(statistics.median(writes), 1),
                    "read_ms_per_batch": round(statistics.median(per_batch), 3),
                    "read_ms_range": [round(min(per_batch), 3), round(max(per_batch), 3)], "equal": bool(equal)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="images (the patches shape uses rows // 16)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name, shape in SHAPES.items():
        rows = args.rows if name == "pooled" else max(args.rows // 16, args.batch)
        print(json.dumps(measure(name, shape, rows, args.batch, args.reads, args.repeats), sort_keys=True),
              flush=True)


if __name__ == "__main__":
    main()
