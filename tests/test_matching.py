"""vlm_jax.matching against scipy.optimize.linear_sum_assignment (the reference), both methods, under jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from vlm_jax import matching

METHODS = ["scipy", "jax"]
# One jitted function for the file: tests that share (shape, method) share its compilation.
match_jit = jax.jit(matching.hungarian_matching, static_argnames="method")


def random_problem(rng, q, g, kind, b=3):
    """cost float32[B, Q, G] and valid bool[B, G]; element 1 has no valid ground truth, element 2 all of it."""
    if kind == "uniform":
        cost = rng.random((b, q, g))
    elif kind == "ties":  # few distinct integer values: many optimal assignments, many equal path lengths
        cost = rng.integers(0, 3, (b, q, g))
    else:  # "competing": every ground truth prefers the same queries (long augmenting paths)
        cost = rng.normal(size=(b, q, 1)) * 10 + rng.random((b, q, g))
    valid = rng.random((b, g)) < 0.6
    valid[1], valid[2] = False, True
    return cost.astype(np.float32), valid


def check_assignment(cost, valid, match, finite_only=False):
    """match is a valid assignment, -1 exactly on padding, with scipy's optimal total over the valid ground truth.

    finite_only: non-finite entries are forbidden in the reference (scipy takes inf as "not allowed")."""
    cost, match = np.asarray(cost, np.float64), np.asarray(match)
    assert match.shape == valid.shape and match.dtype == np.int32
    for b in range(len(cost)):
        cols = np.flatnonzero(valid[b])
        np.testing.assert_array_equal(match[b] == -1, ~valid[b])
        picked = match[b, cols]
        assert np.all((picked >= 0) & (picked < cost.shape[1]))
        assert len(set(picked.tolist())) == len(cols), "a query is used twice"
        if not cols.size:
            continue
        sub = cost[b][:, cols]
        if finite_only:
            sub = np.where(np.isfinite(sub), sub, np.inf)
        rows, picked_ref = linear_sum_assignment(sub)
        np.testing.assert_allclose(sub[picked, np.arange(len(cols))].sum(), sub[rows, picked_ref].sum(), rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("q,g", [(5, 5), (10, 3), (100, 50), (100, 7)])
def test_optimal_on_random_costs(method, q, g):
    rng = np.random.default_rng(q * 1000 + g)
    for kind in ("uniform", "ties", "competing"):
        cost, valid = random_problem(rng, q, g, kind)
        check_assignment(cost, valid, match_jit(cost, valid, method=method))


@pytest.mark.parametrize("method", METHODS)
def test_many_small_tie_heavy_problems(method):
    """Integer costs with many ties, 64 elements with random masks: the JAX solver's adversarial case."""
    rng = np.random.default_rng(1)
    cost = rng.integers(0, 4, (64, 12, 9)).astype(np.float32)
    valid = rng.random((64, 9)) < rng.random((64, 1))
    check_assignment(cost, valid, match_jit(cost, valid, method=method))


@pytest.mark.parametrize("method", METHODS)
def test_all_valid_by_default(method):
    cost, _ = random_problem(np.random.default_rng(2), 10, 3, "uniform")
    check_assignment(cost, np.ones((3, 3), bool), match_jit(cost, method=method))


@pytest.mark.parametrize("method", METHODS)
def test_more_ground_truth_than_queries_raises(method):
    cost = jnp.zeros((2, 3, 5))
    with pytest.raises(ValueError, match=r"Q=3.*G=5"):
        matching.hungarian_matching(cost, method=method)
    with pytest.raises(ValueError, match=r"Q=3.*G=5"):  # at trace time under jit too
        match_jit(cost, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_costs(method):
    rng = np.random.default_rng(3)
    cost, valid = random_problem(rng, 10, 3, "uniform", b=4)
    valid[1] = True
    cost[0, 0, :] = np.nan  # avoidable: other queries are finite
    cost[0, 3, 1], cost[0, 5, 2] = np.inf, -np.inf
    cost[1] = np.nan  # a fully diverged element
    cost[2, :, 0] = np.inf  # one ground truth with no finite cost at all
    cost[3, 1::2, :] = np.nan  # half of the queries unusable
    match = match_jit(cost, valid, method=method)
    check_assignment(cost[[0, 3]], valid[[0, 3]], np.asarray(match)[[0, 3]], finite_only=True)
    m = np.asarray(match)
    for b in (1, 2):  # no optimum to compare with: still a valid assignment
        cols = np.flatnonzero(valid[b])
        assert np.all(m[b, cols] >= 0) and len(set(m[b, cols].tolist())) == len(cols)
        assert np.all(m[b][~valid[b]] == -1)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_and_no_gradient(method):
    rng = np.random.default_rng(4)
    cost = rng.random((2, 3, 6, 4)).astype(np.float32)
    valid = rng.random((2, 3, 4)) < 0.7
    fn = lambda c, v: matching.hungarian_matching(c, v, method=method)  # noqa: E731
    batched = np.asarray(jax.jit(jax.vmap(fn))(cost, valid))
    for i in range(2):
        check_assignment(cost[i], valid[i], batched[i])

    def matched_cost(c):  # a loss on the matched pairs: the gradient flows through the gather only
        m = fn(c, valid[0])
        return jnp.sum(jnp.where(valid[0], jnp.take_along_axis(c, jnp.maximum(m, 0)[:, None], 1)[:, 0], 0.0))

    grad = np.asarray(jax.grad(matched_cost)(jnp.asarray(cost[0])))
    assert np.isfinite(grad).all() and grad.sum() == valid[0].sum()
