"""Device mesh, logical-axis rules, shardings of the train state and batches, multi-process start-up.

One mesh with axes ``('data', 'fsdp', 'tensor')``. Weights carry logical axis names (``nnx.with_partitioning``):
``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``layers``. ``LOGICAL_RULES`` maps them to mesh axes; it is the
only thing a bigger run changes. A dimension that its mesh axes do not divide evenly is replicated instead (tiny
test models on 8 devices), so every rule table works on every model.

Batches are global arrays whose leading axis is split over ``('data', 'fsdp')``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import optim

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for ``MESH_AXES`` from ``{'data': -1, 'fsdp': 2, ...}``; at most one -1 takes the remaining devices."""
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}.")
    sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {dict(axes)}: at most one axis may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or num_devices % known:
        raise ValueError(f"config.mesh {dict(axes)} does not divide the {num_devices} devices.")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(axes)} uses {math.prod(sizes)} devices; {num_devices} are present.")
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over all (global) devices with Auto axis types (classic sharding propagation)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(axes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
    """PartitionSpec for a value of ``shape`` whose dimensions carry logical ``names``.

    A mesh axis is used at most once; a dimension not divisible by its mesh axes' total size is replicated.
    """
    if not names:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"Logical axes {tuple(names)} do not match a value of shape {tuple(shape)}.")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _logical_names(variable: nnx.Variable):
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return meta[key]
    return None


def state_shardings(abstract_state, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings with the structure of an nnx.State (Variables holding shardings)."""

    def one(v):
        if not isinstance(v, nnx.Variable):
            return NamedSharding(mesh, P())
        value = v.get_value()
        shape = getattr(value, "shape", ())
        return v.replace(NamedSharding(mesh, logical_to_spec(_logical_names(v), shape, mesh, rules)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def derived_shardings(abstract_tree, params, param_shardings, mesh: Mesh):
    """Shardings for an optimizer state: a leaf whose path ends with a parameter's path (and has its shape)
    shares that parameter's sharding (Adam moments, accumulators); anything else is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                      jax.tree.leaves(param_shardings)):
        by_path[optim.path_to_str(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        parts = optim.path_to_str(path).split("/")
        for i in range(len(parts)):
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_batch_shards(mesh: Mesh) -> int:
    """How many parts this process's share of a batch is split into over its devices (leading axis)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((mesh.size * 64,))
    return len({index[0].indices(mesh.size * 64) for index in indices.values()})


def _same_tile_count(local_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Multi-process: pads every process's tile fields to the largest tile count and makes `row_tiles` index the
    global tile array (process p's tiles come p-th). One small all-gather per batch."""
    from jax.experimental import multihost_utils

    n = len(local_batch["tiles"])
    largest = int(np.max(multihost_utils.process_allgather(np.int32(n))))
    out = dict(local_batch)
    for k in ("tiles", "tile_regions"):  # leading axis = the batch's tiles, indexed by row_tiles
        v = np.asarray(local_batch[k])
        out[k] = np.concatenate([v, np.zeros((largest - n, *v.shape[1:]), v.dtype)])
    row_tiles = np.asarray(local_batch["row_tiles"])
    out["row_tiles"] = np.where(row_tiles >= 0, row_tiles + jax.process_index() * largest, -1).astype(np.int32)
    return out


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of the batch (all of it on one process)."""
    if "row_tiles" in local_batch and jax.process_count() > 1:
        local_batch = _same_tile_count(local_batch)
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
    """``config.logical_rules`` as a rules table; empty = ``LOGICAL_RULES``."""
    return tuple((str(a), b) for a, b in rules) if rules else LOGICAL_RULES


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying shardings: the restore target for orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def _cluster_detected() -> bool:
    """True only inside a real multi-process launcher; a laptop must not block waiting for a coordinator."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    if "JAX_COORDINATOR_ADDRESS" in env or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts JAX's multi-controller runtime from flags, or by cluster auto-detection; no-op for one process.

    CPU collectives go through gloo so that multi-process CPU runs (tests, laptops) work.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit and not _cluster_detected():
        return
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError("Multi-process runs need --coordinator_address, --num_processes and --process_id "
                         f"together; got {coordinator_address!r}, {num_processes!r}, {process_id!r}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=int(num_processes),
                                   process_id=int(process_id))
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
