"""Nearest-neighbour search in the memory bank: exact (array-API calls, float64 where the namespace has
it) and approximate (pynndescent, NumPy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from reference import _checks
from reference._array_api import device, index_dtype, namespace, real_float, to_numpy


def _as_float(xp: Any, *arrays: Any) -> list[Any]:
    arrays = [xp.asarray(a) for a in arrays]
    return [xp.astype(a, real_float(xp, device(a))) for a in arrays]


def _smallest_k(xp: Any, dist: Any, k: int) -> tuple[Any, Any]:
    """The k smallest entries of each row of `dist` `(Q, C)`, ascending, and their columns."""
    # DECISION: a stable sort, so equal distances go to the lower column (the lower bank index).
    order = xp.argsort(dist, axis=1, stable=True)[:, :k]
    return xp.take_along_axis(dist, order, axis=1), order


def nearest_neighbors(bank: Any, queries: Any, k: int = 1) -> tuple[Any, Any]:
    """Exact k nearest bank rows of each query.

    Args:
      bank: `(N, D)`; queries: `(Q, D)` (one namespace); k: `1 <= k <= N`.
    Returns:
      distances `(Q, k)` (float64 where the namespace has it), Euclidean (not squared), ascending;
      indices `(Q, k)` (the namespace's index dtype).
    """
    _checks.check_search_args(bank, queries, k)
    xp = namespace(bank, queries)
    bank, queries = _as_float(xp, bank, queries)
    (n, d), q = bank.shape, queries.shape[0]
    block = max(1, 2**22 // (n * d))  # queries per step, so the (block, N, D) differences stay small
    distances, indices = [], []
    for start in range(0, q, block):
        chunk = queries[start : min(start + block, q), :]
        dist = xp.sqrt(xp.sum((chunk[:, None, :] - bank[None, :, :]) ** 2, axis=-1))
        block_d, block_i = _smallest_k(xp, dist, k)
        distances.append(block_d)
        indices.append(block_i)
    return xp.concat(distances, axis=0), xp.concat(indices, axis=0)


def approximate_nearest_neighbors(
    bank: Any,
    queries: Any,
    k: int = 1,
    *,
    n_neighbors: int = 30,
    epsilon: float = 0.3,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Approximate k nearest bank rows through a pynndescent graph, for banks too large to scan.

    Not standard: pynndescent searches NumPy arrays on the host, so the graph search converts the
    bank and the queries to NumPy (float32) at its boundary; the candidates it returns are re-ranked by
    exact Euclidean distance in the caller's namespace. Recall is below 1 (it rises with `epsilon`).
    Shapes and dtypes as `nearest_neighbors`.
    """
    _checks.check_search_args(bank, queries, k)
    import pynndescent  # imported here: numba compiles on first use, which costs tens of seconds

    xp = namespace(bank, queries)
    bank, queries = _as_float(xp, bank, queries)
    host_bank = to_numpy(bank).astype(np.float32)
    index = pynndescent.NNDescent(host_bank, metric="euclidean", n_neighbors=max(n_neighbors, k), random_state=seed)
    # Searching a few more candidates than asked and keeping the exact best raises recall at k = 1
    # far more cheaply than a larger epsilon does.
    k_search = min(max(k, 10), host_bank.shape[0])
    found, _ = index.query(to_numpy(queries).astype(np.float32), k=k_search, epsilon=epsilon)
    q = queries.shape[0]
    found = xp.asarray(found.astype(np.int64), dtype=index_dtype(xp, device(bank)), device=device(bank))
    rows = xp.reshape(xp.take(bank, xp.reshape(found, (-1,)), axis=0), (q, k_search, bank.shape[1]))
    dist = xp.sqrt(xp.sum((rows - queries[:, None, :]) ** 2, axis=-1))
    dist, order = _smallest_k(xp, dist, k)  # candidates come in the graph's order, not by index
    return dist, xp.take_along_axis(found, order, axis=1)
