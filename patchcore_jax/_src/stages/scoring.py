"""Patch and image anomaly scores (paper Eq. 6 and Eq. 7), on a prepared bank, vmapped over images."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from patchcore_jax._src.stages import checks
from patchcore_jax._src.stages.search import brute
from patchcore_jax._src.stages.search import common as search_common
from patchcore_jax._src.stages.search import index as index_lib


def neighbourhood(m_star, hood_idx, num_neighbors):
    """N_b(m*) for one image: `m*` first, then the rows nearest to it as searched."""
    # DECISION: N_b(m*) is m* followed by the b - 1 rows nearest to it, even if the bank holds copies
    # of m* at lower indices; a stable sort on (not m*) keeps the search's order otherwise.
    cand = jnp.concatenate([m_star[None], hood_idx])
    is_dup = jnp.concatenate([jnp.array([False]), hood_idx == m_star])
    order = jnp.argsort(is_dup, stable=True)[:num_neighbors]
    return cand[order]


def reweighted(dists, s_star):
    """Eq. 7 for one image: `(1 - softmax(||m_test* - m||, m in N_b(m*))[m*]) * s*`, `dists` with
    m* first. The softmax subtracts its maximum, so distances of any magnitude stay finite."""
    weight = 1.0 - jax.nn.softmax(dists)[0]
    return weight * s_star


def scores_from_nearest(patch_scores, nearest, centred_features, *, num_neighbors, neighbours_of, distances_to):
    """Eq. 6/7 for a batch, given each patch's nearest bank distance and row.

    Args:
      patch_scores: `(B, P)` distance of each patch to its nearest bank row (Eq. 6's inner min).
      nearest: `(B, P)` int, that row.
      centred_features: `(B, P, D)` the patches, minus the bank centre the search works in.
      neighbours_of: `m (B,) -> (B, >= b)` bank rows nearest to bank row `m`, nearest first.
      distances_to: `(queries (B, D), rows (B, b)) -> (B, b)` exact distances in the bank's units.
    Returns:
      image scores `(B,)`. Every search (brute force, clustered, sharded, an exported program's)
      reaches Eq. 7 through here.
    """
    # Eq. 6: the patch farthest from the bank; argmax keeps the lowest index among ties.
    worst = jnp.argmax(patch_scores, axis=1)
    s_star = jnp.take_along_axis(patch_scores, worst[:, None], 1)[:, 0]
    if num_neighbors == 1:
        # DECISION: b = 1 means no reweighting (Eq. 7 would give 0), the published image score.
        return s_star
    m_star = jnp.take_along_axis(nearest, worst[:, None], 1)[:, 0]
    m_test = jnp.take_along_axis(centred_features, worst[:, None, None], 1)[:, 0]
    hood = jax.vmap(neighbourhood, in_axes=(0, 0, None))(m_star, neighbours_of(m_star), num_neighbors)
    return jax.vmap(reweighted)(distances_to(m_test, hood), s_star)


def scores_from_search(index, patch_features, search, *, num_neighbors):
    """Eq. 6/7 for a batch, given `search(index, queries, k) -> (dist, idx)` (plain or sharded) on a
    prepared index. Returns image scores `(B,)` and patch scores `(B, P)`."""
    b, p, d = patch_features.shape
    dist, idx = search(index, patch_features.reshape(b * p, d), 1)
    patch_scores = dist[:, 0].reshape(b, p)
    centred = patch_features.astype(index.rows.dtype) - index.centre
    scores = scores_from_nearest(
        patch_scores, idx[:, 0].reshape(b, p), centred, num_neighbors=num_neighbors,
        neighbours_of=lambda m: search(index, index_lib.bank_rows(index, m), num_neighbors)[1],
        distances_to=lambda q, rows: index_lib.distances_to(index, q, rows))
    return scores, patch_scores


@functools.partial(jax.jit, static_argnames=("num_neighbors", "query_block"))
def image_scores_unchecked(index, patch_features, *, num_neighbors, query_block):
    """`image_scores_from_index` without the checks (trusted inner callers, traceable)."""
    def search(idx, queries, k):
        return index_lib.search_traced(idx, queries, k=k, query_block=min(query_block, queries.shape[0]))

    return scores_from_search(index, patch_features, search, num_neighbors=num_neighbors)


def image_scores_from_index(
    index, patch_features: jax.Array, *, num_neighbors: int = 9, query_block: int = search_common.QUERY_BLOCK
) -> tuple[jax.Array, jax.Array]:
    """`image_scores` on a bank prepared once (the model's path): a `BankIndex` from
    `build_index` (brute force) or a `ClusteredIndex` from `build_clustered_index` (prunes;
    the same scores)."""
    b, p, _ = checks.check_width("patch_features", patch_features, "B, P", index.rows.shape[1], "the bank")
    num_neighbors = checks.check_int("num_neighbors", num_neighbors, low=1, high=index.size)
    query_block = min(checks.check_int("query_block", query_block, low=1), b * p)
    return image_scores_unchecked(index, jnp.asarray(patch_features), num_neighbors=num_neighbors, query_block=query_block)


def image_scores(bank: jax.Array, patch_features: jax.Array, *, num_neighbors: int = 9) -> tuple[jax.Array, jax.Array]:
    """Image scores `s` (Eq. 7) and patch scores (Eq. 6's inner min).

    Args:
      bank: `(N, D)` memory bank.
      patch_features: `(B, P, D)` test patch features.
      num_neighbors: b, the size of `N_b(m*)`; 1 gives `s = s*` (the published code's image score).
    Returns:
      image scores `(B,)`; patch scores `(B, P)`, each patch's distance to its nearest bank row.
    """
    checks.check_scores_args(bank, patch_features, num_neighbors)
    return image_scores_from_index(brute.build_index(bank), patch_features, num_neighbors=num_neighbors)
