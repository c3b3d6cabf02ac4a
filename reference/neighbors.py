"""Nearest-neighbour search in the memory bank, exact (float64) and approximate (pynndescent)."""

from __future__ import annotations

import numpy as np

from reference import _checks


def _check_search(bank, queries, k: int) -> tuple[int, int]:
    n, d = _checks.check_array("bank", bank, ndim=2)
    q, dq = _checks.check_array("queries", queries, ndim=2)
    if dq != d:
        raise ValueError(f"queries: expected shape (Q, {d}) to match bank (N, {d}), got {(q, dq)}")
    k = _checks.check_int("k", k, low=1, high=n)
    return n, k


def nearest_neighbors(bank: np.ndarray, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest bank rows of each query.

    Args:
      bank: `(N, D)`; queries: `(Q, D)`; k: `1 <= k <= N`.
    Returns:
      distances `(Q, k)` float64, Euclidean (not squared), ascending; indices `(Q, k)` int64.
    """
    _check_search(bank, queries, k)
    bank = np.asarray(bank, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    distances = np.empty((len(queries), k))
    indices = np.empty((len(queries), k), dtype=np.int64)
    block = max(1, 2**22 // bank.size)  # queries per step, so the (block, N, D) differences stay small
    for start in range(0, len(queries), block):
        chunk = queries[start : start + block]
        dist = np.sqrt(((chunk[:, None, :] - bank[None, :, :]) ** 2).sum(axis=-1))
        # DECISION: a stable sort, so equal distances go to the lower bank index.
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        distances[start : start + block] = np.take_along_axis(dist, order, 1)
        indices[start : start + block] = order
    return distances, indices


def approximate_nearest_neighbors(
    bank: np.ndarray,
    queries: np.ndarray,
    k: int = 1,
    *,
    n_neighbors: int = 30,
    epsilon: float = 0.3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest bank rows through a pynndescent graph, for banks too large to scan.

    Recall is below 1 (it rises with `epsilon`); distances of the returned rows are exact Euclidean.
    Shapes as `nearest_neighbors`.
    """
    _check_search(bank, queries, k)
    import pynndescent  # imported here: numba compiles on first use, which costs tens of seconds

    bank = np.asarray(bank, dtype=np.float32)
    index = pynndescent.NNDescent(bank, metric="euclidean", n_neighbors=max(n_neighbors, k), random_state=seed)
    # Searching a few more candidates than asked and keeping the exact best raises recall at k = 1
    # far more cheaply than a larger epsilon does.
    k_search = min(max(k, 10), len(bank))
    indices, _ = index.query(np.asarray(queries, dtype=np.float32), k=k_search, epsilon=epsilon)
    indices = indices.astype(np.int64)
    diffs = np.asarray(bank, dtype=np.float64)[indices] - np.asarray(queries, dtype=np.float64)[:, None, :]
    distances = np.sqrt((diffs**2).sum(axis=-1))
    order = np.argsort(distances, axis=1, kind="stable")
    order = order[:, :k]
    return np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
