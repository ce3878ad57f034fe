"""Bipartite (Hungarian) matching of queries to ground truth, for a DETR-style detection head.

`hungarian_matching(cost, valid_gt)` returns, for every ground-truth slot, the query matched to it: an assignment
that minimises the total cost over the valid ground truth of each batch element, each query used at most once.
It works inside `jax.jit` and under `jax.vmap`; the output is an integer index, so no gradient flows (the cost is
passed through `stop_gradient`).

Shapes: B batch, Q queries, G ground-truth slots (padded; `valid_gt` marks the real ones), Q >= G.

    cost      float[B, Q, G]   cost of matching query q to ground truth g
    valid_gt  bool[B, G]       False = padding slot (left out of the problem; its cost values are never read)
    returns   int32[B, G]      query index per slot, -1 on padding slots

Non-finite costs (NaN/Inf, e.g. from a diverging model) do not crash the matching: each is replaced by a finite
"big M" = hi + (G + 1) * (hi - lo) + 1, where hi/lo are the largest/smallest finite valid costs of that batch
element. Any assignment with fewer such entries then costs less, so the matching avoids them where it can and
still returns a full assignment where it cannot. Finite costs are clipped to +-1e15 first, so that big M and the
solver's sums stay far below the float32 maximum; real matching costs are many orders of magnitude smaller.

Two solvers, same optimum (they may pick different ones where several are optimal):

  * `method="jax"` (default): on device, the shortest-augmenting-path Hungarian algorithm with row/column potentials
    (Jonker-Volgenant style), vmapped over the batch. Rows = valid ground truth, columns = queries; each row is
    added with one Dijkstra search (`lax.while_loop`, one step per scanned query), so the work is O(n^2 Q) for n
    valid ground truth, and a vmapped batch runs as long as its slowest element. Arithmetic in the cost's dtype
    (float32): an assignment can differ from the exact optimum only by rounding error.
  * `method="scipy"`: a host callback (`jax.pure_callback`) to `scipy.optimize.linear_sum_assignment`, one call
    per batch element, on the valid columns only, in float64. Costs a device-host round trip per call.

Default: "jax", the faster one in `experiments/benchmark_matching.py` (jitted, compile excluded, median of 25
interleaved runs, random uniform float32 costs, all ground truth valid, Q = 100) on this project's 2-core CPU
(shared with other work, so about +-20 %):

    B   G    scipy_callback_ms   jax_ms   jax / scipy
    8   10   0.46                 0.27     0.59
    8   50   1.07                 0.89     0.84
    32  10   1.05                 0.46     0.44
    32  50   3.67                 3.50     0.95     (0.87 to 1.47 over six runs: a draw)

With integer costs 0..3 (`--costs ties`) the JAX solver is about 2x faster (ratio 0.43 to 0.57): the search stops
at the first free query among equally near ones. It loses where many ground truth are valid and compete: at
B = 32, Q = G = 100 all valid, uniform costs, ratio 1.56 (22.5 vs 14.4 ms). Padding slots are never added, so
for COCO-like data (a few objects per image, padded to 100) the G = 10 rows are the relevant ones. Not measured
on a GPU: there every loop step is a kernel launch and the callback a device-host round trip; rerun the benchmark
on the target before relying on the default there.
"""

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("jax", "scipy")

# Finite costs are clipped to this magnitude before the big-M replacement of non-finite ones (see the docstring).
_COST_LIMIT = 1e15


def hungarian_matching(cost, valid_gt=None, *, method="jax"):
    """Optimal query per ground-truth slot. cost float[B, Q, G], valid_gt bool[B, G] | None -> int32[B, G].

    -1 where `valid_gt` is False. `method`: "jax" (on device) or "scipy" (host callback); both give an optimal
    assignment, possibly different where several are optimal. Raises ValueError if Q < G.
    """
    if method not in METHODS:
        raise ValueError(f"unknown matching method {method!r}: expected one of {METHODS}")
    if cost.ndim != 3:
        raise ValueError(f"cost must be [B, Q, G], got shape {cost.shape}")
    b, q, g = cost.shape
    if q < g:
        raise ValueError(f"hungarian_matching needs at least as many queries as ground-truth slots: Q={q} < G={g}")
    valid_gt = jnp.ones((b, g), bool) if valid_gt is None else jnp.asarray(valid_gt).astype(bool)
    if valid_gt.shape != (b, g):
        raise ValueError(f"valid_gt must be [B, G] = {(b, g)}, got {valid_gt.shape}")
    if g == 0:
        return jnp.zeros((b, 0), jnp.int32)
    cost = _sanitize(jax.lax.stop_gradient(cost), valid_gt)
    if method == "scipy":
        return _match_scipy(cost, valid_gt)
    return jax.vmap(_match_jax_one)(cost, valid_gt)


def _sanitize(cost, valid_gt):
    """float[B, Q, G] -> the same, finite: non-finite entries become a per-element big M (module docstring)."""
    cost = cost.astype(jnp.promote_types(cost.dtype, jnp.float32))
    finite = jnp.isfinite(cost)
    cost = jnp.clip(jnp.where(finite, cost, 0.0), -_COST_LIMIT, _COST_LIMIT)
    considered = finite & valid_gt[:, None, :]
    hi = jnp.max(jnp.where(considered, cost, -jnp.inf), axis=(1, 2), keepdims=True)
    lo = jnp.min(jnp.where(considered, cost, jnp.inf), axis=(1, 2), keepdims=True)
    any_finite = jnp.any(considered, axis=(1, 2), keepdims=True)
    hi, lo = jnp.where(any_finite, hi, 0.0), jnp.where(any_finite, lo, 0.0)
    big = hi + (cost.shape[2] + 1) * (hi - lo) + 1.0
    return jnp.where(finite, cost, big)


# ---- scipy on the host ---------------------------------------------------------------------------------------------


def _scipy_host(cost, valid):
    """numpy cost [..., Q, G], valid [..., G] -> int32[..., G]; any leading dims (vmap adds some)."""
    from scipy.optimize import linear_sum_assignment

    cost, valid = np.asarray(cost, np.float64), np.asarray(valid, bool)
    lead, (q, g) = cost.shape[:-2], cost.shape[-2:]
    cost, valid = cost.reshape(-1, q, g), valid.reshape(-1, g)
    out = np.full(valid.shape, -1, np.int32)
    for i in range(len(cost)):
        cols = np.flatnonzero(valid[i])
        if cols.size:
            # Padding columns are left out: their values are never read (they may be garbage), and the problem shrinks.
            rows, picked = linear_sum_assignment(cost[i][:, cols])
            out[i, cols[picked]] = rows
    return out.reshape(*lead, g)


def _match_scipy(cost, valid_gt):
    """cost float[B, Q, G], valid_gt bool[B, G] -> int32[B, G] via a host callback."""
    out = jax.ShapeDtypeStruct(valid_gt.shape, jnp.int32)
    # broadcast_all: under vmap the callback gets the mapped dims as leading dims and loops over them itself.
    return jax.pure_callback(_scipy_host, out, cost, valid_gt, vmap_method="broadcast_all")


# ---- Hungarian algorithm on device ---------------------------------------------------------------------------------


def _match_jax_one(cost, valid):
    """One element: cost float[Q, G], valid bool[G] -> int32[G].

    Shortest augmenting paths with potentials: rows = ground truth, columns = queries. Rows are added one at a time;
    each addition grows a Dijkstra tree on the reduced costs a[i, j] - u[i] - v[j] >= 0 from the new row until it
    reaches a free column, flips the matching along that path, then updates the potentials so that the reduced
    costs stay >= 0 and the matched edges tight. Padding rows are never added: that leaves them out of the problem.
    """
    a = cost.T  # [G, Q]
    g, q = a.shape
    inf = jnp.array(jnp.inf, a.dtype)
    cols, gts = jnp.arange(q), jnp.arange(g)
    rows = jnp.argsort(~valid, stable=True)  # valid rows first; only the first n_valid are added

    def add_row(k, state):
        v, row4col, col4row = state  # v [Q]; row4col int[Q] (G = free column); col4row int[G] (-1 = none)
        start = rows[k]

        def dijkstra_step(s):
            i, via, length, dist, path, done = s  # i: row reached through the scanned column `via`
            # Row potential from the tight matched edge (i, via): u[i] = a[i, via] - v[via]; 0 for the new row.
            a_i = a[i]
            u_i = jnp.where(i == start, 0, a_i[via] - v[via])
            reach = length + a_i - u_i - v  # distance to each column through row i
            better = ~done & (reach < dist)
            dist, path = jnp.where(better, reach, dist), jnp.where(better, i, path)
            open_dist = jnp.where(done, inf, dist)
            nearest = jnp.min(open_dist)
            # Any nearest column will do; a free one ends the search now (integer-like costs have many ties). First
            # nearest free column, else first nearest: one integer min (cheaper than argmin/argmax on CPU).
            key = jnp.where(open_dist == nearest, cols + jnp.where(row4col == g, 0, q), 2 * q)
            j = jnp.min(key) % q
            return row4col[j], j, nearest, dist, path, done | (cols == j)

        init = (start, jnp.int32(0), jnp.zeros((), a.dtype), jnp.full(q, inf), jnp.zeros(q, jnp.int32),
                jnp.zeros(q, bool))
        # Stops when the scanned column is free (its row is G). Terminates: each step scans a new column, and a free
        # column exists (n_valid <= G <= Q).
        _, sink, length, dist, path, done = jax.lax.while_loop(lambda s: s[0] != g, dijkstra_step, init)
        # Column potentials (lazy form: once per added row). Row potentials need no update: they are recomputed
        # from the matched edges, which this keeps tight.
        v = v - jnp.where(done, length - dist, 0)

        def flip(s):  # walk back from the sink: each column on the path takes the row it was reached from
            j, row4col, col4row, _ = s
            i = path[j]
            return col4row[i], jnp.where(cols == j, i, row4col), jnp.where(gts == i, j, col4row), i == start

        _, row4col, col4row, _ = jax.lax.while_loop(lambda s: ~s[3], flip, (sink, row4col, col4row, False))
        return v, row4col, col4row

    state = (jnp.zeros(q, a.dtype), jnp.full(q, g, jnp.int32), jnp.full(g, -1, jnp.int32))
    return jax.lax.fori_loop(0, jnp.sum(valid), add_row, state)[2]
