"""Greedy coreset subsampling of the memory bank (paper Sec. 3.2, Algorithm 1), float64."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from reference import _checks


def random_projection(seed: int, in_dim: int, out_dim: int) -> np.ndarray:
    """`(in_dim, out_dim)` projection psi, uniform in `+-1/sqrt(in_dim)` like a bias-free
    `torch.nn.Linear` (the published sampler's). The caller owns the seed."""
    in_dim = _checks.check_int("in_dim", in_dim, low=1)
    out_dim = _checks.check_int("out_dim", out_dim, low=1)
    bound = 1.0 / np.sqrt(in_dim)
    return np.random.default_rng(seed).uniform(-bound, bound, size=(in_dim, out_dim))


def greedy_coreset(
    bank: np.ndarray,
    num_samples: int,
    *,
    projection: np.ndarray | None = None,
    start_indices: Sequence[int] = (0,),
) -> np.ndarray:
    """Algorithm 1: `m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||_2`.

    Args:
      bank: `(N, D)` patch features M.
      num_samples: coreset size l, `0 <= l <= N`.
      projection: `(D, P)` random linear projection psi, or None for the identity.
      start_indices: rows whose mean distance initialises the min-distance vector.
    Returns:
      `(num_samples,)` int64 indices into `bank`, in the order selected.
    """
    _, num_samples, starts = _checks.check_coreset_args(bank, num_samples, projection, start_indices)
    psi = np.asarray(bank, dtype=np.float64)
    if projection is not None:
        psi = psi @ np.asarray(projection, dtype=np.float64)

    def dist_to(i: int) -> np.ndarray:
        return np.sqrt(((psi - psi[i]) ** 2).sum(axis=1))

    # DECISION: as the published sampler, start from the mean distance to the start points; they are
    # not selected by that alone.
    min_dist = np.mean([dist_to(s) for s in starts], axis=0)
    selected = np.empty(num_samples, dtype=np.int64)
    for t in range(num_samples):
        # DECISION: np.argmax takes the lowest index among ties; selected rows are excluded (the argmax
        # runs over M - M_C), so indices stay distinct even when the bank repeats rows.
        i = int(np.argmax(min_dist))
        selected[t] = i
        min_dist = np.minimum(min_dist, dist_to(i))
        min_dist[selected[: t + 1]] = -1.0
    return selected


def covering_radius(bank: np.ndarray, indices: np.ndarray, *, projection: np.ndarray | None = None) -> float:
    """`max_m min_{c in indices} ||psi(m) - psi(c)||`: how well the coreset covers the bank."""
    psi = np.asarray(bank, dtype=np.float64)
    if projection is not None:
        psi = psi @ np.asarray(projection, dtype=np.float64)
    centres = psi[np.asarray(indices)]
    best = np.full(len(psi), np.inf)
    for c in centres:
        best = np.minimum(best, np.sqrt(((psi - c) ** 2).sum(axis=1)))
    return float(best.max())
