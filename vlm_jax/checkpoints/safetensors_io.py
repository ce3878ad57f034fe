"""Reading the safetensors files of a checkpoint directory, on `safetensors.safe_open` (no PyTorch).

One `model.safetensors` or the shards named by `model.safetensors.index.json`. Every file's header is read (and
checked by safe_open against the file's length) when the directory is opened, so shapes are known before any data
is read. Tensors come back as numpy arrays in their stored dtype (bf16 as `ml_dtypes.bfloat16`). A truncated or
corrupt file raises a ValueError that names the file (and, when the header is intact, the tensors cut off). So does
an index that places a tensor in a shard that does not hold it, naming the tensor and the shard that does.
"""

from __future__ import annotations

import json
import os
from typing import NoReturn

import numpy as np
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class SafetensorsDir:
    """The tensors of a checkpoint directory by name: shapes from the headers, arrays read on demand."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            weight_map = _read_index(index)  # tensor name -> file name
            self._files = {fn: _open_shard(directory, fn, index, weight_map) for fn in sorted(set(weight_map.values()))}
            _check_index(index, weight_map, self._files)
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            self._files = {SINGLE_FILE: _open(os.path.join(directory, SINGLE_FILE))}
            weight_map = {name: SINGLE_FILE for name in self._files[SINGLE_FILE].keys()}
        else:
            _refuse(directory)
        self._directory, self._where = directory, weight_map

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._files[fn].get_slice(name).get_shape()) for name, fn in self._where.items()}

    def get(self, name: str) -> np.ndarray:
        fn = self._where[name]
        try:
            return self._files[fn].get_tensor(name)
        except SafetensorError as err:
            raise ValueError(f"{os.path.join(self._directory, fn)}: cannot read tensor {name!r}: {err}") from err


def _read_index(index: str) -> dict[str, str]:
    try:
        with open(index) as f:
            weight_map = dict(json.load(f)["weight_map"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a safetensors index ({err!r})") from None
    bad = [name for name, fn in weight_map.items() if not isinstance(fn, str)]
    if bad:
        raise ValueError(f"{index}: weight_map[{bad[0]!r}] must be a file name (a string), got {weight_map[bad[0]]!r}")
    return weight_map


def _open_shard(directory: str, fn: str, index: str, weight_map: dict[str, str]):
    path = os.path.join(directory, fn)
    if not os.path.exists(path):
        names = sorted(n for n, f in weight_map.items() if f == fn)
        raise ValueError(f"{index} places {len(names)} tensor(s) in {fn}, which does not exist in {directory} "
                         f"(e.g. {names[0]})")
    return _open(path)


def _check_index(index: str, weight_map: dict[str, str], files: dict) -> None:
    """Every tensor is in the shard the index names for it; else one error saying where each one really is."""
    held = {fn: set(handle.keys()) for fn, handle in files.items()}
    wrong = sorted(n for n, fn in weight_map.items() if n not in held[fn])
    if not wrong:
        return
    holders = {n: [fn for fn in sorted(held) if n in held[fn]] for n in wrong[:5]}
    each = [f"{n} (the index names {weight_map[n]}; "
            + (f"it is in {', '.join(holders[n])})" if holders[n] else "no shard the index names holds it)")
            for n in wrong[:5]]
    more = f"; and {len(wrong) - 5} more" if len(wrong) > 5 else ""
    raise ValueError(f"{index} places {len(wrong)} tensor(s) in a shard that does not hold them: "
                     + "; ".join(each) + more)


def _refuse(directory: str) -> NoReturn:
    pickled = [fn for fn in sorted(os.listdir(directory)) if fn.endswith(PICKLED_SUFFIXES)]
    if pickled:
        raise ValueError(f"{directory} holds only pickled weights ({', '.join(pickled)}); they are never unpickled "
                         "here. Convert them to safetensors first, e.g. in PyTorch: "
                         "`model.save_pretrained(dir, safe_serialization=True)`.")
    raise ValueError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as err:
        cut = _tensors_past_end(path)
        more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
        detail = f"; tensors cut off by a truncation: {', '.join(cut[:5])}{more}" if cut else ""
        raise ValueError(f"{path}: not a readable safetensors file ({err}){detail}") from err


def _tensors_past_end(path: str) -> list[str]:
    """For a file safe_open refused: the tensors whose bytes lie past the end of the file (a cut-off copy or
    download), in file order, read from the header alone. [] when the header itself is unreadable."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return []
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return []
    if not isinstance(header, dict):
        return []
    ends = {name: info["data_offsets"][-1] for name, info in header.items()
            if isinstance(info, dict) and isinstance(info.get("data_offsets"), list) and info["data_offsets"]}
    return sorted((name for name, end in ends.items() if isinstance(end, int) and 8 + n + end > size), key=ends.get)
