"""Fingerprints of saved arrays: what makes a damaged checkpoint an error instead of a silent restore.

Every checkpoint (a training run's and a converted model's) stores one 32-bit fingerprint per array at save and
compares it at restore. The fingerprint of an array is its bits, read as unsigned words ``w[i]``, weighted by odd
numbers and summed modulo 2**32:

    fingerprint(x) = sum_i w[i] * (2 i + 1)   (mod 2**32)

A change of any one word changes the sum (an odd factor has an inverse modulo 2**32), so a flipped byte is always
found; independent damage in several words goes unnoticed with probability 2**-32. Addition modulo 2**32 does not
depend on the order of the terms, so accelerator arrays are summed on their devices, sharded (one jitted reduction
per tree, no host copy), and CPU arrays by numpy in place (no compilation); both give the same number.

The same pass reports which floating-point arrays hold NaN or Inf: such a state is never saved, and never restored.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: damaged, non-finite, or from another run."""


def _words(x, xp):
    """The bits of ``x`` as a flat uint32 vector (64-bit values give two words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = xp.asarray(x)
    if x.dtype == bool:
        x = x.astype(np.uint8)
    size = np.dtype(x.dtype).itemsize
    if size == 8:
        bits = x.view(np.uint32) if xp is np else jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[size]
        bits = x.view(unsigned) if xp is np else jax.lax.bitcast_convert_type(x, unsigned)
    return bits.reshape(-1).astype(np.uint32)


def _fingerprint(x, xp) -> tuple:
    w = _words(x, xp)
    odd = xp.arange(w.shape[0], dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    total = xp.sum(w * odd, dtype=np.uint32)
    floating = jnp.issubdtype(x.dtype, jnp.floating)  # bfloat16 included (numpy's issubdtype says no)
    finite = xp.all(xp.isfinite(x)) if floating else xp.asarray(True)
    return total, finite


@jax.jit
def _device_fingerprints(leaves):
    return [_fingerprint(x, jnp) for x in leaves]


def _flat(tree) -> dict[str, object]:
    """``{path: array}`` over the leaves of a pytree (nnx.State, dicts, lists), paths as ``a/b/0``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _in_host_memory(x: jax.Array) -> bool:
    """CPU arrays this process holds whole: summed by numpy in place (no compilation); others on their devices."""
    return x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices())


def scan(tree) -> tuple[dict[str, str], list[str]]:
    """``({path: fingerprint as 8 hex digits}, [paths of floating arrays holding NaN/Inf])`` of a pytree of jax
    or numpy arrays. Accelerator arrays (and arrays sharded over several processes) are fingerprinted on their
    devices; CPU arrays and numpy arrays by numpy, in place."""
    flat = _flat(tree)
    names = list(flat)
    on_device = [n for n in names if isinstance(flat[n], jax.Array) and not _in_host_memory(flat[n])]
    results = {}
    if on_device:
        for name, (total, finite) in zip(on_device, jax.device_get(_device_fingerprints([flat[n] for n in on_device]))):
            results[name] = (int(total), bool(finite))
    for name in names:
        if name not in results:
            total, finite = _fingerprint(np.asarray(flat[name]), np)
            results[name] = (int(total), bool(finite))
    fingerprints = {n: f"{results[n][0]:08x}" for n in names}
    return fingerprints, [n for n in names if not results[n][1]]


def check_finite(tree, what: str) -> dict[str, str]:
    """The fingerprints of ``tree``; raises `CheckpointError` naming the arrays when any holds NaN or Inf."""
    fingerprints, nonfinite = scan(tree)
    if nonfinite:
        raise CheckpointError(f"{what}: {len(nonfinite)} array(s) hold NaN or Inf, refusing them: "
                              f"{listed(nonfinite)}")
    return fingerprints


def verify(tree, expected: Mapping[str, str], what: str) -> None:
    """Raises `CheckpointError` when ``tree``'s arrays differ from the fingerprints recorded at save, are missing
    from them, or hold NaN / Inf. ``what`` names the checkpoint in the message."""
    found, nonfinite = scan(tree)
    changed = [n for n in found if n in expected and expected[n] != found[n]]
    if changed:
        n = changed[0]
        raise CheckpointError(f"{what} is damaged: {len(changed)} array(s) differ from the fingerprints recorded at "
                              f"save: {listed(changed)} (e.g. {n}: expected {expected[n]}, read {found[n]}).")
    unknown = [n for n in found if n not in expected]
    if unknown:
        raise CheckpointError(f"{what}: no fingerprint recorded for {len(unknown)} array(s): {listed(unknown)} "
                              f"(recorded: {len(expected)} arrays).")
    if nonfinite:
        raise CheckpointError(f"{what}: {len(nonfinite)} array(s) hold NaN or Inf, refusing them: {listed(nonfinite)}")


def listed(paths: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, then "and N more"."""
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more
