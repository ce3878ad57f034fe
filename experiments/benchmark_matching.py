"""Hungarian matching speed: scipy host callback vs the pure-JAX solver (`vlm_jax.matching`), both jitted.

    python experiments/benchmark_matching.py
    python experiments/benchmark_matching.py --queries 100 --gts 10,50 --batches 8,32 --repeats 7 [--costs ties]

Cost matrices are random float32 [B, Q, G], all ground truth valid, on the current default backend: uniform in
[0, 1) (--costs uniform, the default), or integers 0..3 (--costs ties: many equal costs, the JAX solver's slow case:
more augmenting-path steps, and the vmapped loop runs as long as the slowest batch element). Compile time is
excluded (one warm-up call each); the two methods are then timed in interleaved runs. One JSON line per setting:
milliseconds per call of each method (median of --repeats runs, and the range), and ratio = jax_ms /
scipy_callback_ms of the medians (> 1: the scipy callback is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def time_ms(fns, args, repeats):
    """Interleaved timings of already-compiled fns on args: one {median, range} dict (ms) per fn."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            s = time.perf_counter()
            fn(*args).block_until_ready()
            t.append((time.perf_counter() - s) * 1e3)
    return [dict(median=round(float(np.median(t)), 3), range=[round(min(t), 3), round(max(t), 3)]) for t in times]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--gts", default="10,50", help="ground-truth slots G, comma-separated")
    parser.add_argument("--batches", default="8,32", help="batch sizes B, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--costs", default="uniform", choices=["uniform", "ties"])
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from vlm_jax.matching import hungarian_matching

    fns = [jax.jit(lambda c, m=m: hungarian_matching(c, method=m)) for m in ("scipy", "jax")]
    rng = np.random.default_rng(0)
    for b in map(int, args.batches.split(",")):
        for g in map(int, args.gts.split(",")):
            shape = (b, args.queries, g)
            cost = rng.random(shape) if args.costs == "uniform" else rng.integers(0, 4, shape)
            cost = jnp.asarray(cost, jnp.float32)
            for fn in fns:
                fn(cost).block_until_ready()  # compile
            scipy_t, jax_t = time_ms(fns, (cost,), args.repeats)
            print(json.dumps(dict(backend=jax.default_backend(), B=b, Q=args.queries, G=g,
                                  scipy_callback_ms=scipy_t, jax_ms=jax_t,
                                  ratio=round(jax_t["median"] / scipy_t["median"], 2))), flush=True)


if __name__ == "__main__":
    main()
