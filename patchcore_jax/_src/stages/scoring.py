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


def knn_patch_scores(dist):
    """The published NearestNeighbourScorer's patch score from the k nearest distances `(Q, k)`:
    `sqrt(mean_j d_j^2)` `(Q,)`; for k = 1 the distance itself.

    DECISION: the published code averages faiss's squared distances; averaging squares and taking the
    root keeps this project's units and ranks every patch (hence every image) as the published score."""
    if dist.shape[1] == 1:
        return dist[:, 0]
    return jnp.sqrt(jnp.mean(jnp.square(dist), axis=1))


def scores_from_search(index, patch_features, search, *, num_neighbors, num_nn=1):
    """Eq. 6/7 for a batch, given `search(index, queries, k) -> (dist, idx)` (plain or sharded) on a
    prepared index; `num_nn`: k of the published scorer (`knn_patch_scores`). Returns image scores
    `(B,)` and patch scores `(B, P)`."""
    b, p, d = patch_features.shape
    dist, idx = search(index, patch_features.reshape(b * p, d), num_nn)
    return scores_from_neighbours(index, patch_features, dist, idx, search, num_neighbors=num_neighbors, num_nn=num_nn)


def scores_from_neighbours(index, patch_features, dist, idx, search, *, num_neighbors, num_nn):
    """Eq. 6/7 for a batch from a search already made: `dist`, `idx` `(B * P, k)` with `k >= num_nn`
    (the first `num_nn` columns are used), so one search for the largest k serves every smaller one.
    Returns image scores `(B,)` and patch scores `(B, P)`."""
    b, p, d = patch_features.shape
    patch_scores = knn_patch_scores(dist[:, :num_nn]).reshape(b, p)
    centred = patch_features.astype(index.rows.dtype) - index.centre
    scores = scores_from_nearest(
        patch_scores, idx[:, 0].reshape(b, p), centred, num_neighbors=num_neighbors,
        neighbours_of=lambda m: search(index, index_lib.bank_rows(index, m), num_neighbors)[1],
        distances_to=lambda q, rows: index_lib.distances_to(index, q, rows))
    return scores, patch_scores


@functools.partial(jax.jit, static_argnames=("num_neighbors", "query_block", "num_nn"))
def image_scores_unchecked(index, patch_features, *, num_neighbors, query_block, num_nn=1):
    """`image_scores_from_index` without the checks (trusted inner callers, traceable)."""
    def search(idx, queries, k):
        return index_lib.search_traced(idx, queries, k=k, query_block=min(query_block, queries.shape[0]))

    return scores_from_search(index, patch_features, search, num_neighbors=num_neighbors, num_nn=num_nn)


@functools.partial(jax.jit, static_argnames=("k", "query_block"))
def search_patches(index, patch_features, *, k, query_block):
    """The k nearest bank rows of every patch `(B, P, D)`: `(dist, idx)` `(B * P, k)` (traced, trusted)."""
    b, p, d = patch_features.shape
    return index_lib.search_traced(index, patch_features.reshape(b * p, d), k=k, query_block=min(query_block, b * p))


@functools.partial(jax.jit, static_argnames=("num_neighbors", "num_nn", "query_block"))
def image_scores_from_neighbours(index, patch_features, dist, idx, *, num_neighbors, num_nn, query_block):
    """`image_scores_unchecked` on the result of `search_patches` with k >= num_nn (trusted callers)."""
    def search(i, queries, k):
        return index_lib.search_traced(i, queries, k=k, query_block=min(query_block, queries.shape[0]))

    return scores_from_neighbours(index, patch_features, dist, idx, search, num_neighbors=num_neighbors, num_nn=num_nn)


def image_scores_from_index(
    index, patch_features: jax.Array, *, num_neighbors: int = 9, query_block: int = search_common.QUERY_BLOCK,
    anomaly_scorer_num_nn: int = 1
) -> tuple[jax.Array, jax.Array]:
    """`image_scores` on a bank prepared once (the model's path): a `BankIndex` from
    `build_index` (brute force) or a `ClusteredIndex` from `build_clustered_index` (prunes;
    the same scores)."""
    b, p, _ = checks.check_width("patch_features", patch_features, "B, P", index.rows.shape[1], "the bank")
    num_neighbors = checks.check_int("num_neighbors", num_neighbors, low=1, high=index.size)
    num_nn = checks.check_int("anomaly_scorer_num_nn", anomaly_scorer_num_nn, low=1, high=index.size)
    query_block = min(checks.check_int("query_block", query_block, low=1), b * p)
    return image_scores_unchecked(index, jnp.asarray(patch_features), num_neighbors=num_neighbors,
                                  query_block=query_block, num_nn=num_nn)


def image_scores(bank: jax.Array, patch_features: jax.Array, *, num_neighbors: int = 9,
                 anomaly_scorer_num_nn: int = 1) -> tuple[jax.Array, jax.Array]:
    """Image scores `s` (Eq. 7) and patch scores (Eq. 6's inner min).

    Args:
      bank: `(N, D)` memory bank.
      patch_features: `(B, P, D)` test patch features.
      num_neighbors: b, the size of `N_b(m*)`; 1 gives `s = s*` (the published code's image score).
      anomaly_scorer_num_nn: k; a patch's score is `sqrt(mean of its k nearest squared distances)`
        (`knn_patch_scores`); 1 (the default) is its nearest distance.
    Returns:
      image scores `(B,)`; patch scores `(B, P)`, each patch's (k-NN) distance to the bank.
    """
    checks.check_scores_args(bank, patch_features, num_neighbors)
    return image_scores_from_index(brute.build_index(bank), patch_features, num_neighbors=num_neighbors,
                                   anomaly_scorer_num_nn=anomaly_scorer_num_nn)
