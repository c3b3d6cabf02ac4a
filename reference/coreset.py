"""Greedy coreset subsampling of the memory bank (paper Sec. 3.2, Algorithm 1), in array-API calls."""

from __future__ import annotations

import math
from typing import Any, Sequence

import array_api_extra as xpx
import numpy as np

from reference import _checks
from reference._array_api import device as device_of
from reference._array_api import index_dtype, namespace, namespace_of_module, real_float


def random_projection(key_or_seed, in_dim: int, out_dim: int, *, xp: Any = None, device: Any = None) -> Any:
    """`(in_dim, out_dim)` projection psi, uniform in `+-1/sqrt(in_dim)` like a bias-free
    `torch.nn.Linear` (the published sampler's). The caller owns the draw.

    Not standard: the array API has no random numbers. The draw is NumPy's
    (`numpy.random.default_rng(key_or_seed)`: an integer seed, a `SeedSequence` or a `Generator`), in
    float64, then converted to the namespace `xp` (default NumPy) on `device`.
    """
    in_dim = _checks.check_int("in_dim", in_dim, low=1)
    out_dim = _checks.check_int("out_dim", out_dim, low=1)
    bound = 1.0 / math.sqrt(in_dim)
    draw = np.random.default_rng(key_or_seed).uniform(-bound, bound, size=(in_dim, out_dim))
    if xp is None:
        return draw
    xp = namespace_of_module(xp)
    return xp.asarray(draw, dtype=real_float(xp, device), device=device)


def _projected(bank: Any, projection: Any) -> tuple[Any, Any]:
    """`psi(M)`: the bank (times the projection) in the namespace's float64; and the namespace."""
    xp = namespace(bank, projection)
    bank = xp.asarray(bank)
    psi = xp.astype(bank, real_float(xp, device_of(bank)))
    if projection is not None:
        psi = psi @ xp.astype(xp.asarray(projection), psi.dtype)
    return xp, psi


def greedy_coreset(
    bank: Any,
    num_samples: int,
    *,
    projection: Any | None = None,
    start_indices: Sequence[int] = (0,),
) -> Any:
    """Algorithm 1: `m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||_2`.

    Args:
      bank: `(N, D)` patch features M.
      num_samples: coreset size l, `0 <= l <= N`.
      projection: `(D, P)` random linear projection psi (same namespace as `bank`), or None for the
        identity.
      start_indices: rows whose mean distance initialises the min-distance vector.
    Returns:
      `(num_samples,)` indices into `bank` (the namespace's index dtype), in the order selected.
    """
    _, num_samples, starts = _checks.check_coreset_args(bank, num_samples, projection, start_indices)
    xp, psi = _projected(bank, projection)

    def dist_to(i: int) -> Any:
        return xp.sqrt(xp.sum((psi - psi[i, :]) ** 2, axis=1))

    # DECISION: as the published sampler, start from the mean distance to the start points; they are
    # not selected by that alone.
    min_dist = xp.mean(xp.stack([dist_to(s) for s in starts]), axis=0)
    selected = []
    for _ in range(num_samples):
        # DECISION: argmax takes the lowest index among ties (the standard's first occurrence);
        # selected rows are excluded (the argmax runs over M - M_C) by a distance of -1, which the
        # minimum keeps, so indices stay distinct even when the bank repeats rows.
        i = int(xp.argmax(min_dist))
        selected.append(i)
        min_dist = xp.minimum(min_dist, dist_to(i))
        min_dist = xpx.at(min_dist, i).set(-1.0)
    return xp.asarray(selected, dtype=index_dtype(xp, device_of(psi)), device=device_of(psi))


def covering_radius(bank: Any, indices: Any, *, projection: Any | None = None) -> float:
    """`max_m min_{c in indices} ||psi(m) - psi(c)||`: how well the coreset covers the bank.

    `indices`: a non-empty sequence or 1-D array (any namespace) of row indices.
    """
    n, _ = _checks.check_array("bank", bank, ndim=2)
    centres = _checks.check_indices("indices", indices, n)
    xp, psi = _projected(bank, projection)
    best = xp.full(n, math.inf, dtype=psi.dtype, device=device_of(psi))
    for c in centres:
        best = xp.minimum(best, xp.sqrt(xp.sum((psi - psi[c, :]) ** 2, axis=1)))
    return float(xp.max(best))
