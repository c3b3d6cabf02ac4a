"""Exact and approximate nearest-neighbour search in the memory bank, tiled for bounded memory.

The exact search walks the bank in blocks for each block of queries (`lax.map` over query blocks,
`lax.scan` over bank blocks), keeping a running top-k, so memory is `query_block x bank_block` whatever
the bank's size. The bank is prepared once (`BankIndex`: centred, padded, squared norms cached) and
reused across calls. Ranking uses `||q||^2 - 2 q.b + ||b||^2` on centred rows; the distances returned
are recomputed as `||q - b||` for the chosen rows, so float32 cancellation does not reach the scores.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax import _checks

_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class BankIndex:
    """A memory bank prepared for repeated exact search.

    Attributes:
      rows: `(N_pad, D)` bank rows minus `centre`, zero-padded to a whole number of blocks.
      sq_norms: `(N_pad,)` squared norms of `rows`; `+inf` on padding, so padding never ranks.
      centre: `(D,)` the bank mean (distances are translation-invariant).
      size: N, the number of real rows.
      block: rows per bank block of the search.
    """

    rows: jax.Array
    sq_norms: jax.Array
    centre: jax.Array
    size: int = flax.struct.field(pytree_node=False)
    block: int = flax.struct.field(pytree_node=False)


def build_index(bank: jax.Array, *, block: int = 2048) -> BankIndex:
    """Prepares `bank` `(N, D)` for `search`: centred, padded to blocks, squared norms cached."""
    n, _ = _checks.check_array("bank", bank, ndim=2)
    block = _checks.check_int("block", block, low=1)
    return _build_index(jnp.asarray(bank), block=min(block, n))


def prepare_index(bank, *, block, n_real=None) -> BankIndex:
    """The `BankIndex` of `bank`: centred, padded to whole blocks, squared norms cached.

    Rows from `n_real` on are padding the caller added (a mesh's whole shards,
    `sharding.build_index`): they are left out of the centre and never rank. One device runs this
    under `_build_index`, a mesh under its own jit: the same index in both.
    """
    bank = bank if jnp.issubdtype(bank.dtype, jnp.floating) else bank.astype(jnp.float32)
    n_rows = bank.shape[0]
    n = n_rows if n_real is None else n_real
    if n < n_rows:
        real = (jnp.arange(n_rows) < n)[:, None]
        centre = jnp.sum(jnp.where(real, bank, 0.0), axis=0) / n
        rows = jnp.where(real, bank - centre, 0.0)
    else:
        centre = jnp.mean(bank, axis=0)
        rows = bank - centre
    n_pad = -(-n_rows // block) * block
    rows = jnp.pad(rows, ((0, n_pad - n_rows), (0, 0)))
    sq = jnp.sum(jnp.square(rows), axis=1)
    sq = jnp.where(jnp.arange(n_pad) < n, sq, jnp.inf)
    return BankIndex(rows=rows, sq_norms=sq, centre=centre, size=n, block=block)


_build_index = jax.jit(prepare_index, static_argnames=("block", "n_real"))


def _merge_topk(best_d, best_i, new_d, new_i, k):
    """Keeps the k smallest of two candidate lists; on equal distances the earlier list (lower bank
    indices) wins, because `lax.top_k` is stable."""
    d = jnp.concatenate([best_d, new_d], axis=1)
    i = jnp.concatenate([best_i, new_i], axis=1)
    neg, pos = jax.lax.top_k(-d, k)
    return -neg, jnp.take_along_axis(i, pos, axis=1)


# Candidates kept beyond k for the exact re-ranking, so float32 ranking noise between near-equal
# distances at the k-th place does not drop the row that exact arithmetic would keep.
_RERANK_MARGIN = 4


def _search_block(queries, index: BankIndex, k_out: int):
    """`(qb, D)` centred queries -> k nearest rows by the norm expansion, then exact distances."""
    # DECISION: k = 1 takes the plain argmin (the fast path for patch scores); k > 1 re-ranks a few
    # extra candidates by exact distance.
    k = 1 if k_out == 1 else min(k_out + _RERANK_MARGIN, index.size)
    q_sq = jnp.sum(jnp.square(queries), axis=1)
    n_blocks = index.rows.shape[0] // index.block
    rows = index.rows.reshape(n_blocks, index.block, -1)
    norms = index.sq_norms.reshape(n_blocks, index.block)

    def scan_body(carry, inputs):
        best_d, best_i = carry
        b_rows, b_norms, offset = inputs
        sq = q_sq[:, None] + b_norms[None, :] - 2.0 * jnp.dot(queries, b_rows.T, precision=_HIGHEST)
        if k == 1:
            # DECISION: argmin keeps the lowest index among ties, like the stable top-k.
            j = jnp.argmin(sq, axis=1).astype(jnp.int32)
            new_d, new_i = jnp.take_along_axis(sq, j[:, None], 1), (j + offset)[:, None]
            take = new_d < best_d  # strict: an equal distance keeps the earlier (lower) index
            return (jnp.where(take, new_d, best_d), jnp.where(take, new_i, best_i)), None
        new_neg, new_pos = jax.lax.top_k(-sq, min(k, index.block))
        return _merge_topk(best_d, best_i, -new_neg, new_pos.astype(jnp.int32) + offset, k), None

    init = (jnp.full((queries.shape[0], k), jnp.inf, q_sq.dtype),
            jnp.full((queries.shape[0], k), -1, jnp.int32))
    offsets = jnp.arange(n_blocks, dtype=jnp.int32) * index.block
    (_, idx), _ = jax.lax.scan(scan_body, init, (rows, norms, offsets))
    # Exact distances of the chosen rows, then a final ordering by them (ties: lower index first).
    dist = jnp.sqrt(jnp.sum(jnp.square(index.rows[idx] - queries[:, None, :]), axis=-1))
    # Padding rows (infinite norm) and unfilled slots (-1) only surface when a shard of a sharded bank
    # holds fewer real rows than k; they sort last.
    dist = jnp.where((idx < 0) | jnp.isinf(index.sq_norms[idx]), jnp.inf, dist)
    dist, idx = jax.lax.sort((dist, idx), dimension=1, num_keys=2)
    return dist[:, :k_out], idx[:, :k_out]


def query_blocks(index: BankIndex, queries, query_block: int):
    """`(Q, D)` queries -> `(Q_pad / query_block, query_block, D)`, centred like the bank, zero-padded."""
    q = queries.shape[0]
    queries = queries.astype(index.rows.dtype) - index.centre
    q_pad = -(-q // query_block) * query_block
    return jnp.pad(queries, ((0, q_pad - q), (0, 0))).reshape(q_pad // query_block, query_block, -1)


@functools.partial(jax.jit, static_argnames=("k", "query_block"))
def _search(index: BankIndex, queries, *, k, query_block):
    q = queries.shape[0]
    blocks = query_blocks(index, queries, query_block)
    dist, idx = jax.lax.map(lambda qb: _search_block(qb, index, k), blocks)
    q_pad = blocks.shape[0] * query_block
    return dist.reshape(q_pad, k)[:q], idx.reshape(q_pad, k)[:q]


def search(index: BankIndex, queries: jax.Array, k: int = 1, *, query_block: int = 256) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest rows of a prepared bank; shapes and meaning as `nearest_neighbors`."""
    _checks.check_width("queries", queries, "Q", index.rows.shape[1], "the bank")
    k = _checks.check_int("k", k, low=1, high=index.size)
    query_block = min(_checks.check_int("query_block", query_block, low=1), queries.shape[0])
    return _search(index, jnp.asarray(queries), k=k, query_block=query_block)


def nearest_neighbors(bank: jax.Array, queries: jax.Array, k: int = 1) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest bank rows of each query.

    Args:
      bank: `(N, D)`; queries: `(Q, D)`; k: `1 <= k <= N`.
    Returns:
      distances `(Q, k)`, Euclidean (not squared), ascending; indices `(Q, k)` int32, ties to the
      lower bank index. For repeated searches of one bank, `build_index` once and call `search`.
    """
    _checks.check_search_args(bank, queries, k)
    return search(build_index(bank), queries, k)


@functools.partial(jax.jit, static_argnames=("k", "query_block", "recall_target"))
def _approximate(bank, queries, *, k, query_block, recall_target):
    centre = jnp.mean(bank, axis=0)
    rows = bank - centre
    sq = jnp.sum(jnp.square(rows), axis=1)
    q = queries.shape[0]
    q_pad = -(-q // query_block) * query_block
    blocks = jnp.pad(queries - centre, ((0, q_pad - q), (0, 0))).reshape(q_pad // query_block, query_block, -1)

    def one_block(qb):
        d2 = sq[None, :] - 2.0 * jnp.dot(qb, rows.T, precision=_HIGHEST)
        _, idx = jax.lax.approx_min_k(d2, k, recall_target=recall_target)
        dist = jnp.sqrt(jnp.sum(jnp.square(rows[idx] - qb[:, None, :]), axis=-1))
        return jax.lax.sort((dist, idx.astype(jnp.int32)), dimension=1, num_keys=2)

    dist, idx = jax.lax.map(one_block, blocks)
    return dist.reshape(q_pad, k)[:q], idx.reshape(q_pad, k)[:q]


def approximate_nearest_neighbors(
    bank: jax.Array, queries: jax.Array, k: int = 1, *, recall_target: float = 0.95, query_block: int = 64
) -> tuple[jax.Array, jax.Array]:
    """Approximate k nearest bank rows through `jax.lax.approx_min_k` (fast on TPU; exact elsewhere).

    Shapes as `nearest_neighbors`; distances of the returned rows are exact. Memory is
    `query_block x N` per step.
    """
    _, k = _checks.check_search_args(bank, queries, k)
    if not 0.0 < recall_target <= 1.0:
        raise ValueError(f"recall_target: expected a value in (0, 1], got {recall_target}")
    query_block = min(_checks.check_int("query_block", query_block, low=1), queries.shape[0])
    bank = jnp.asarray(bank)
    return _approximate(bank, jnp.asarray(queries, bank.dtype), k=k, query_block=query_block, recall_target=float(recall_target))
