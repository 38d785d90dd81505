"""Shared-initialization detection (pillar 3). For now: the assignment solvers that match the
units of two layers, implemented in C++ (``libtransfer/detect/linear_assignment.h``).

``linear_sum_assignment`` mirrors :func:`scipy.optimize.linear_sum_assignment`: same signature,
same return convention (two int64 numpy arrays, rows sorted ascending), the same optimum.
``greedy_assignment`` is the faster approximation for very wide layers (see its docstring).
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch

from . import _C

__all__ = ["greedy_assignment", "linear_sum_assignment"]

ArrayLike = Union[torch.Tensor, np.ndarray, list]


def _as_tensor(cost: ArrayLike) -> torch.Tensor:
    if isinstance(cost, torch.Tensor):
        return cost
    return torch.as_tensor(np.asarray(cost))


def linear_sum_assignment(cost: ArrayLike, maximize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The optimal assignment of the cost matrix ``cost`` [n, m] (any orientation).

    Returns ``(row_ind, col_ind)``: int64 arrays of length min(n, m), ``row_ind`` sorted, such that
    ``cost[row_ind, col_ind].sum()`` is minimal (maximal with ``maximize=True``). ``cost`` is a
    floating tensor or array (float32 inputs are solved in float64), on any device. When
    minimizing, ``+inf`` forbids a pair (``-inf`` when maximizing); NaN and the other infinity
    raise ``ValueError``, as does a matrix whose forbidden pairs leave no complete assignment.
    Integer dtypes raise ``TypeError`` (cast to float first).
    """
    rows, cols, _ = _C.linear_sum_assignment(_as_tensor(cost), bool(maximize))
    return rows.numpy(), cols.numpy()


def greedy_assignment(cost: ArrayLike, maximize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """A greedy assignment of the finite cost matrix ``cost`` [n, m]: repeatedly pairs the best
    remaining entry whose row and column are both free (ties: smallest row, then column).

    Same return convention as :func:`linear_sum_assignment`. Equivariant under permutations of
    rows and columns (up to ties), so a valid matching for the weight test, and faster than the
    exact solver on wide matrices; its objective is never better than the optimum and equals it
    when one matching dominates (one clearly best entry per row and column).
    """
    rows, cols, _ = _C.greedy_assignment(_as_tensor(cost), bool(maximize))
    return rows.numpy(), cols.numpy()
