"""biastransfer.detect's assignment solvers against scipy.optimize.linear_sum_assignment."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from biastransfer.detection import greedy_assignment, linear_sum_assignment

REL_TOL = 1e-9  # the bound on the relative objective difference from scipy


def objective(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    return float(cost.astype(np.float64)[rows, cols].sum())


def check_against_scipy(cost: np.ndarray, maximize: bool, unique: bool) -> None:
    rows, cols = linear_sum_assignment(torch.from_numpy(cost), maximize=maximize)
    ref_rows, ref_cols = scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert len(rows) == min(cost.shape) and np.all(np.diff(rows) > 0)
    assert len(set(cols.tolist())) == len(cols)
    ours, ref = objective(cost, rows, cols), objective(cost, ref_rows, ref_cols)
    assert ours == pytest.approx(ref, rel=REL_TOL, abs=1e-12)
    if unique:  # continuous random costs: the optimum is unique with probability one
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_array_equal(cols, ref_cols)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 7), (40, 25), (25, 40), (120, 120)])
def test_random_matrices_match_scipy(shape, maximize, dtype):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    cost = rng.standard_normal(shape).astype(dtype)
    check_against_scipy(cost, maximize, unique=True)


def test_a_large_matrix_matches_scipy():
    rng = np.random.default_rng(500)
    check_against_scipy(rng.random((500, 500)), maximize=False, unique=True)
    check_against_scipy(rng.random((300, 480)).astype(np.float32), maximize=True, unique=True)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("shape", [(6, 6), (30, 30), (20, 45), (45, 20), (200, 200)])
def test_integer_and_tied_matrices_reach_scipys_optimum(shape, maximize):
    rng = np.random.default_rng(sum(shape))
    for high in (2, 5, 1000):  # from heavily tied to mostly distinct integers
        cost = rng.integers(0, high, size=shape).astype(np.float64)
        check_against_scipy(cost, maximize, unique=False)


@pytest.mark.parametrize("shape", [(5, 5), (3, 8), (8, 3)])
def test_constant_matrices(shape):
    for value in (0.0, -2.5, 7.0):
        cost = np.full(shape, value)
        check_against_scipy(cost, maximize=False, unique=False)
        check_against_scipy(cost, maximize=True, unique=False)


def test_forbidden_entries_match_scipy():
    rng = np.random.default_rng(3)
    for trial in range(40):
        shape = [(12, 15), (12, 12), (15, 12), (40, 40)][trial % 4]
        cost = rng.random(shape)
        cost[rng.random(cost.shape) < (0.85 if trial % 4 == 3 else 0.5)] = np.inf
        try:
            ref = scipy.optimize.linear_sum_assignment(cost)
        except ValueError:
            with pytest.raises(ValueError, match="infeasible cost matrix"):
                linear_sum_assignment(cost)
            continue
        rows, cols = linear_sum_assignment(cost)
        assert objective(cost, rows, cols) == pytest.approx(objective(cost, *ref), rel=REL_TOL)


def test_inputs_of_every_kind():
    rng = np.random.default_rng(4)
    cost = rng.random((9, 6))
    ref = scipy.optimize.linear_sum_assignment(cost)
    for given in (cost, cost.tolist(), torch.from_numpy(cost), torch.from_numpy(cost.T).t()):
        rows, cols = linear_sum_assignment(given)
        np.testing.assert_array_equal(rows, ref[0])
        np.testing.assert_array_equal(cols, ref[1])
    if torch.cuda.is_available():
        rows, cols = linear_sum_assignment(torch.from_numpy(cost).cuda())
        np.testing.assert_array_equal(cols, ref[1])


@pytest.mark.parametrize("shape", [(0, 0), (0, 3), (3, 0)])
def test_empty_matrices(shape):
    for solve in (linear_sum_assignment, greedy_assignment):
        rows, cols = solve(np.zeros(shape))
        assert rows.shape == (0,) and cols.shape == (0,)


def test_bad_inputs_raise_naming_cost():
    with pytest.raises(ValueError, match="cost"):
        linear_sum_assignment(np.zeros(4))
    with pytest.raises(ValueError, match="cost"):
        linear_sum_assignment(np.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="cost"):
        linear_sum_assignment(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="cost"):
        greedy_assignment(torch.zeros(3, 3, dtype=torch.int32))
    nan = np.zeros((3, 3))
    nan[1, 1] = np.nan
    with pytest.raises(ValueError, match="cost.*NaN"):
        linear_sum_assignment(nan)
    neg = np.zeros((3, 3))
    neg[0, 2] = -np.inf
    with pytest.raises(ValueError, match="cost.*-inf"):
        linear_sum_assignment(neg)
    with pytest.raises(ValueError, match="cost.*\\+inf"):
        linear_sum_assignment(-neg, maximize=True)
    blocked = np.zeros((3, 3))
    blocked[:, 1:] = np.inf
    with pytest.raises(ValueError, match="cost.*infeasible cost matrix"):
        linear_sum_assignment(blocked)
    with pytest.raises(ValueError, match="cost.*finite"):
        greedy_assignment(neg.T * -1)


@pytest.mark.parametrize("shape", [(10, 10), (30, 50), (50, 30), (200, 200)])
def test_greedy_is_valid_and_never_beats_the_optimum(shape):
    rng = np.random.default_rng(shape[0] + 7 * shape[1])
    cost = rng.random(shape)
    for maximize in (False, True):
        rows, cols = greedy_assignment(cost, maximize=maximize)
        assert len(rows) == min(shape) and np.all(np.diff(rows) > 0)
        assert len(set(cols.tolist())) == len(cols)
        best = objective(cost, *scipy.optimize.linear_sum_assignment(cost, maximize=maximize))
        got = objective(cost, rows, cols)
        assert (got <= best + 1e-12) if maximize else (got >= best - 1e-12)


def test_greedy_matches_a_naive_global_greedy():
    """Independent reference: argmax over a masked copy, one pair at a time."""
    rng = np.random.default_rng(11)
    cases = [rng.random(shape) for shape in [(12, 12), (8, 15), (15, 8)]]
    cases += [rng.integers(0, 3, size=shape).astype(np.float64)
              for shape in [(9, 9), (6, 11), (11, 6)]]
    # Every row ranks the columns alike: rows exhaust their candidate lists and rescan.
    alike = np.arange(120)[None, :] + 0.01 * rng.random((100, 120))
    cases += [alike, alike.T.copy(), -np.abs(rng.standard_normal((150, 150))).cumsum(axis=1)]
    for sim in cases:
        work = sim.copy()
        expected = []
        for _ in range(min(sim.shape)):
            i, j = np.unravel_index(np.argmax(work), work.shape)
            expected.append((i, j))
            work[i, :] = -np.inf
            work[:, j] = -np.inf
        rows, cols = greedy_assignment(sim, maximize=True)
        assert sorted(expected) == list(zip(rows.tolist(), cols.tolist()))


def test_greedy_is_exact_on_diagonal_dominant_matrices():
    rng = np.random.default_rng(12)
    n = 300
    perm = rng.permutation(n)
    sim = 0.5 * rng.random((n, n))
    sim[np.arange(n), perm] = 1.0 + rng.random(n)
    rows, cols = greedy_assignment(sim, maximize=True)
    ref_rows, ref_cols = scipy.optimize.linear_sum_assignment(sim, maximize=True)
    np.testing.assert_array_equal(cols, ref_cols)
    np.testing.assert_array_equal(cols, perm)
