"""Patch and image anomaly scores (paper Sec. 3.3, Eq. 6 and Eq. 7), in array-API calls."""

from __future__ import annotations

from typing import Any

from reference import _checks
from reference._array_api import device, index_dtype, namespace, real_float
from reference.neighbors import nearest_neighbors


def reweight(distances: Any) -> Any:
    """Eq. 7's factor `1 - exp(d_0) / sum_j exp(d_j)`, computed as one minus a stable softmax.

    `distances[0]` is `||m_test* - m*||`, the rest the distances to the other rows of `N_b(m*)`.
    Returns a 0-D array of the namespace of `distances`.
    """
    xp = namespace(distances)
    shifted = xp.exp(distances - xp.max(distances))
    return 1.0 - shifted[0] / xp.sum(shifted)


def image_scores(bank: Any, patch_features: Any, *, num_neighbors: int = 9,
                 anomaly_scorer_num_nn: int = 1) -> tuple[Any, Any]:
    """Image scores `s` (Eq. 7) and patch scores (Eq. 6's inner min).

    Args:
      bank: `(N, D)` memory bank M.
      patch_features: `(B, P, D)` test patch features (same namespace as `bank`).
      num_neighbors: b, the size of `N_b(m*)`; 1 gives `s = s*` (the published code's image score).
      anomaly_scorer_num_nn: k of the published NearestNeighbourScorer: a patch's score is
        `sqrt(mean of its k nearest squared distances)` (the published code averages the squares).
    Returns:
      image scores `(B,)`, patch scores `(B, P)`: distance of each patch to its nearest bank row
      (float64 where the namespace has it).
    """
    b, p, d, num_neighbors = _checks.check_scores_args(bank, patch_features, num_neighbors)
    xp = namespace(bank, patch_features)
    bank, patch_features = xp.asarray(bank), xp.asarray(patch_features)
    bank = xp.astype(bank, real_float(xp, device(bank)))
    patch_features = xp.astype(patch_features, bank.dtype)

    k = int(anomaly_scorer_num_nn)
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"anomaly_scorer_num_nn: expected an integer in [1, {bank.shape[0]}], got {anomaly_scorer_num_nn!r}")
    dist, idx = nearest_neighbors(bank, xp.reshape(patch_features, (b * p, d)), k=k)
    # DECISION: the root of the mean squared distance: ranks as the published mean of faiss's squares.
    patch_scores = xp.reshape(dist[:, 0] if k == 1 else xp.sqrt(xp.mean(dist**2, axis=1)), (b, p))
    nearest = xp.reshape(idx[:, 0], (b, p))
    scores = []
    for i in range(b):
        # Eq. 6: the test patch with the largest distance to the bank; argmax keeps the lowest index.
        worst = int(xp.argmax(patch_scores[i, :]))
        s_star, m_star = patch_scores[i, worst], int(nearest[i, worst])
        if num_neighbors == 1:
            # DECISION: b = 1 means no reweighting (Eq. 7 would give 0), the published image score.
            scores.append(s_star)
            continue
        hood = xp.asarray(_neighbourhood(bank, m_star, num_neighbors), dtype=index_dtype(xp, device(bank)),
                          device=device(bank))
        dists = xp.sqrt(xp.sum((xp.take(bank, hood, axis=0) - patch_features[i, worst, :]) ** 2, axis=1))
        scores.append(reweight(dists) * s_star)
    return xp.stack(scores), patch_scores


def _neighbourhood(bank: Any, m_star: int, num_neighbors: int) -> list[int]:
    """N_b(m*): `m*` first, then the `b - 1` bank rows nearest to it.

    DECISION: `m*` itself leads even when the bank holds copies of it at lower indices.
    """
    _, idx = nearest_neighbors(bank, bank[m_star : m_star + 1, :], k=num_neighbors)
    others = [j for j in (int(idx[0, t]) for t in range(num_neighbors)) if j != m_star]
    return [m_star] + others[: num_neighbors - 1]
