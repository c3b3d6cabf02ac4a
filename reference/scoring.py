"""Patch and image anomaly scores (paper Sec. 3.3, Eq. 6 and Eq. 7), float64."""

from __future__ import annotations

import numpy as np

from reference import _checks
from reference.neighbors import nearest_neighbors


def reweight(distances: np.ndarray) -> float:
    """Eq. 7's factor `1 - exp(d_0) / sum_j exp(d_j)`, computed as one minus a stable softmax.

    `distances[0]` is `||m_test* - m*||`, the rest the distances to the other rows of `N_b(m*)`.
    """
    shifted = np.exp(distances - distances.max())
    return float(1.0 - shifted[0] / shifted.sum())


def image_scores(bank: np.ndarray, patch_features: np.ndarray, *, num_neighbors: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Image scores `s` (Eq. 7) and patch scores (Eq. 6's inner min).

    Args:
      bank: `(N, D)` memory bank M.
      patch_features: `(B, P, D)` test patch features.
      num_neighbors: b, the size of `N_b(m*)`; 1 gives `s = s*` (the published code's image score).
    Returns:
      image scores `(B,)`, patch scores `(B, P)`: distance of each patch to its nearest bank row.
    """
    n, d = _checks.check_array("bank", bank, ndim=2)
    b, p, dp = _checks.check_array("patch_features", patch_features, ndim=3)
    if dp != d:
        raise ValueError(f"patch_features: expected shape (B, P, {d}) to match bank (N, {d}), got {(b, p, dp)}")
    num_neighbors = _checks.check_int("num_neighbors", num_neighbors, low=1, high=n)
    bank = np.asarray(bank, dtype=np.float64)
    patch_features = np.asarray(patch_features, dtype=np.float64)

    dist, idx = nearest_neighbors(bank, patch_features.reshape(b * p, d), k=1)
    patch_scores = dist[:, 0].reshape(b, p)
    nearest = idx[:, 0].reshape(b, p)
    scores = np.empty(b)
    for i in range(b):
        # Eq. 6: the test patch with the largest distance to the bank; np.argmax keeps the lowest index.
        worst = int(np.argmax(patch_scores[i]))
        s_star, m_star = patch_scores[i, worst], int(nearest[i, worst])
        if num_neighbors == 1:
            # DECISION: b = 1 means no reweighting (Eq. 7 would give 0), the published image score.
            scores[i] = s_star
            continue
        neighbourhood = _neighbourhood(bank, m_star, num_neighbors)
        dists = np.sqrt(((bank[neighbourhood] - patch_features[i, worst]) ** 2).sum(axis=1))
        scores[i] = reweight(dists) * s_star
    return scores, patch_scores


def _neighbourhood(bank: np.ndarray, m_star: int, num_neighbors: int) -> np.ndarray:
    """N_b(m*): `m*` first, then the `b - 1` bank rows nearest to it.

    DECISION: `m*` itself leads even when the bank holds copies of it at lower indices.
    """
    _, idx = nearest_neighbors(bank, bank[m_star][None], k=num_neighbors)
    others = [j for j in idx[0] if j != m_star][: num_neighbors - 1]
    return np.array([m_star] + others)
