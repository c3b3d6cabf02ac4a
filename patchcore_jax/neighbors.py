"""Exact and approximate nearest-neighbour search in the memory bank, tiled for bounded memory.

The exact search walks the bank in blocks for each block of queries (`lax.map` over query blocks,
`lax.scan` over bank blocks), keeping a running top list, so memory is `query_block x bank_block`
whatever the bank's size. The bank is prepared once (`BankIndex`: centred, scaled by a power of two,
padded, squared norms cached) and reused across calls.

Why the result is exact, not merely usually right:
- Ranking uses `||b||^2 - 2 q.b` (the query's own norm is a constant per query), less its
  worst-case float32 error `gamma (||b||^2 + 2 ||q|| ||b||)`, `gamma = (D + 4) eps / 2` (Higham's bound
  for a D-term dot product): a lower bound of each row's key whatever the summation order of the
  matrix product. The search keeps the `k + 3` rows with the smallest lower bounds, recomputes their
  distances as `||q - b||` by differences, and certifies per query that the k-th of these lies below
  every other row's lower bound (with room for its own rounding). A query whose certificate fails
  (near-duplicate rows, a query equidistant from many rows) is searched again by exact differences
  over the whole bank. Ties go to the lower bank index either way.
- Magnitudes: the centred bank is scaled by a power of two so its largest entry lies in [0.5, 1), and
  each query by a further power of two when it lies far outside the bank. Scaling by a power of two
  is exact, so features around 1e19 (whose squares overflow float32) or 1e-25 (whose squares
  underflow) are searched as exactly as features around 1; distances are scaled back at the end.
  Only a result that itself overflows float32 (a distance above ~3.4e38, or inputs whose difference
  from the bank mean does) comes back as inf or NaN; callers on the host can refuse it there, with
  no transfer on the hot path.
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
      rows: `(N_pad, D)` bank rows minus `centre`, times `2**log2_scale`, zero-padded to a whole number
        of blocks.
      sq_norms: `(N_pad,)` squared norms of `rows`; `+inf` on padding, so padding never ranks.
      centre: `(D,)` the bank mean (distances are translation-invariant), in the bank's units.
      size: N, the number of real rows.
      block: rows per bank block of the search.
      log2_scale: int32 scalar; the power of two that brings the centred rows' largest entry into
        [0.5, 1) (exact, so squares neither overflow nor underflow). 0 means unscaled rows.
    """

    rows: jax.Array
    sq_norms: jax.Array
    centre: jax.Array
    size: int = flax.struct.field(pytree_node=False)
    block: int = flax.struct.field(pytree_node=False)
    log2_scale: jax.Array | int = 0


def build_index(bank: jax.Array, *, block: int = 2048) -> BankIndex:
    """Prepares `bank` `(N, D)` for `search`: centred, scaled, padded to blocks, squared norms cached."""
    n, _ = _checks.check_array("bank", bank, ndim=2)
    block = _checks.check_int("block", block, low=1)
    if _checks.is_host_data(bank):
        _check_representable(np.asarray(bank))
        bank = jax.device_put(np.asarray(bank))
    return _build_index(bank, block=min(block, n))


def _check_representable(bank: np.ndarray) -> None:
    """Refuses a host bank whose rows lie so far from their mean that the difference overflows its
    dtype (the one input the power-of-two scaling cannot rescue). Checked on host data only, once,
    when the index is built; a device bank is not read back (its search returns inf there)."""
    if bank.dtype.kind != "f":
        return
    centre = np.mean(bank, axis=0, dtype=np.float64).astype(bank.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(bank - centre).all()
    if not finite:
        raise ValueError(f"bank: rows differ from their mean by more than the largest {bank.dtype} (overflow); "
                         "rescale the features or pass float64 with jax_enable_x64")


def _exponent(x):
    """`e` with `x = m * 2**e`, `m` in [0.5, 1) (0 for x = 0): the binary exponent, exactly."""
    return jnp.frexp(x)[1]


def _scale(x, e):
    """`x * 2**e` exactly for integer `e` (broadcast), in two steps so that `2**e` itself need not be
    representable (|e| up to ~250 covers every float32 ratio)."""
    half = e // 2
    one = jnp.ones((), x.dtype)
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, e - half)


def _centre_and_scale(bank, real=None):
    """The bank mean (computed on a power-of-two-scaled copy, so the sum cannot overflow) and the
    exponent that brings the centred rows' largest entry into [0.5, 1). `real`: a row mask or None."""
    n = bank.shape[0] if real is None else jnp.sum(real)
    masked = bank if real is None else jnp.where(real[:, None], bank, 0.0)
    e0 = -_exponent(jnp.max(jnp.abs(masked)))
    centre = _scale(jnp.sum(_scale(masked, e0), axis=0) / n, -e0)
    centred = masked - centre if real is None else jnp.where(real[:, None], bank - centre, 0.0)
    return centre, -_exponent(jnp.max(jnp.abs(centred))).astype(jnp.int32)


def prepare_index(bank, *, block, n_real=None) -> BankIndex:
    """The `BankIndex` of `bank`: centred, padded to whole blocks, squared norms cached.

    Rows from `n_real` on are padding the caller added (a mesh's whole shards,
    `sharding.build_index`): they are left out of the centre and never rank. One device runs this
    under `_build_index`, a mesh under its own jit: the same index in both.
    """
    bank = bank if jnp.issubdtype(bank.dtype, jnp.floating) else bank.astype(jnp.float32)
    n_rows = bank.shape[0]
    n = n_rows if n_real is None else n_real
    real = (jnp.arange(n_rows) < n) if n < n_rows else None
    centre, log2_scale = _centre_and_scale(bank, real)
    centred = bank - centre if real is None else jnp.where(real[:, None], bank - centre, 0.0)
    n_pad = -(-n_rows // block) * block
    rows = jnp.pad(_scale(centred, log2_scale), ((0, n_pad - n_rows), (0, 0)))
    sq = jnp.sum(jnp.square(rows), axis=1)
    sq = jnp.where(jnp.arange(n_pad) < n, sq, jnp.inf)
    return BankIndex(rows=rows, sq_norms=sq, centre=centre, size=n, block=block, log2_scale=log2_scale)


_build_index = jax.jit(prepare_index, static_argnames=("block", "n_real"))


def _merge_topk(best_d, best_i, new_d, new_i, k):
    """Keeps the k smallest of two candidate lists; on equal distances the earlier list (lower bank
    indices) wins, because `lax.top_k` is stable."""
    d = jnp.concatenate([best_d, new_d], axis=1)
    i = jnp.concatenate([best_i, new_i], axis=1)
    neg, pos = jax.lax.top_k(-d, k)
    return -neg, jnp.take_along_axis(i, pos, axis=1)


# Candidates kept beyond k for the exact re-ranking. The certificate below decides whether they were
# enough; a query it fails takes the slow exact pass over the whole bank. Brute force ranks by the norm
# expansion in global coordinates, whose worst-case error is relative to ||q||^2, not to the distance:
# on real PatchCore queries of the bank's own category (||q||^2 about 140 times the nearest squared
# distance), 3 extra candidates left 8.3% of the queries uncertified and made the search 3 times slower;
# 15 leave none (0 of 2048; 7 left 11), at 13% more time where 3 were enough.
_RERANK_MARGIN = 15
_RANK_SCALE_FLOOR = -126  # the ranking's per-query weight 2**-g stays a normal float32


# -- the pieces every exact search shares (the brute-force and the clustered index) ---------------
def _scaled_queries(centred, log2_scale):
    """Centred queries (bank units) -> `(q, g)`: `q = centred * 2**(log2_scale - g)` with its largest
    entry below 2, where `g >= 0` is the extra per-query exponent of a query far outside the bank."""
    e_q = _exponent(jnp.max(jnp.abs(centred), axis=1))
    g = jnp.maximum(e_q + log2_scale - 1, 0).astype(jnp.int32)
    return _scale(centred, (log2_scale - g)[:, None]), g


def _rank_weight(g, dtype):
    return jnp.ldexp(jnp.ones((), dtype), jnp.maximum(-g, _RANK_SCALE_FLOOR))


def _rank_keys(q, w, rows, norms):
    """`(||b||^2 * 2**-g - 2 q.b)`: the squared distance up to a per-query constant and scale."""
    return norms[None, :] * w[:, None] - 2.0 * jnp.dot(q, rows.T, precision=_HIGHEST)


def _gamma(dim, dtype):
    """The worst-case relative error of a `dim`-term dot product (Higham's gamma_n), with room for
    the few roundings around it."""
    return (dim + 4) * jnp.finfo(dtype).eps / 2


def _rank_lower_bounds(q, w, rows, norms, q_norm, gamma):
    """Lower bounds of `_rank_keys`: each key less its worst-case error `gamma (w ||b||^2 + 2 ||q|| ||b||)`
    (doubled, which also covers the few roundings of forming it). Padding (infinite norm) stays inf."""
    finite = jnp.isfinite(norms)
    b_norm = jnp.sqrt(jnp.where(finite, norms, 0.0))
    keys = (norms[None, :] * (w * (1.0 - 2.0 * gamma))[:, None] - 2.0 * jnp.dot(q, rows.T, precision=_HIGHEST)
            - (4.0 * gamma * q_norm)[:, None] * b_norm[None, :])
    return jnp.where(finite[None, :], keys, jnp.inf)


def _exact_sq(q, g, cand_rows):
    """`||q - b * 2**-g||^2` for candidates `(qb, c, D)`: differences, so no cancellation."""
    return jnp.sum(jnp.square(q[:, None, :] - _scale(cand_rows, -g[:, None, None])), axis=-1)


def _certified(q, w, lower_last, dk_sq, gamma):
    """True where no row outside the candidates can be nearer than the k-th candidate.

    A row outside the candidates has a key lower bound of at least `lower_last`, so its squared
    distance (per-query units) is at least `||q||^2 + w * lower_last`; the k-th exact squared distance
    must lie below that, with room for the rounding of both sides (`||q||^2` and the exact distance
    carry at most `gamma` relative error each, doubled for the sums here).
    """
    q_sq = jnp.sum(jnp.square(q), axis=1)
    return dk_sq * (1.0 + 2.0 * gamma) < q_sq * (1.0 - 2.0 * gamma) + w * lower_last


def _unscale_distances(sq, g, log2_scale):
    """Per-query squared distances in scaled units -> distances in the bank's units."""
    return _scale(jnp.sqrt(sq), g[:, None] - log2_scale)


def _exact_pass(q, g, rows, valid, ids, k, block):
    """The fallback for one query: exact squared distances by differences to every row (bank block
    by bank block), then the k smallest; `valid` masks padding. `ids` must ascend, so the stable
    top-k sends ties to the lower id."""
    n_blocks = rows.shape[0] // block
    blocks = rows.reshape(n_blocks, block, -1)
    sq = jax.lax.map(lambda b_rows: jnp.sum(jnp.square(q[None, :] - _scale(b_rows, -g)), axis=1), blocks)
    neg, pos = jax.lax.top_k(-jnp.where(valid, sq.reshape(-1), jnp.inf), k)
    return -neg, ids[pos]


def _fix_uncertified(ok, sq, idx, one_query):
    """Replaces the results of the queries not certified by `one_query(i) -> (sq (k,), idx (k,))`,
    one query at a time (a while loop: certified queries cost nothing)."""
    def body(state):
        ok, sq, idx = state
        i = jnp.argmin(ok)
        s, j = one_query(i)
        return ok.at[i].set(True), sq.at[i].set(s), idx.at[i].set(j)

    _, sq, idx = jax.lax.while_loop(lambda s: ~jnp.all(s[0]), body, (ok, sq, idx))
    return sq, idx


def _search_block(queries, index: BankIndex, k_out: int):
    """`(qb, D)` queries minus `index.centre` -> the k nearest rows: `(distances (qb, k_out) in the
    bank's units, indices)`. Ranks by lower bounds of the norm expansion, re-ranks `k_out + 15`
    candidates by exact distance and certifies them; an uncertified query takes the exact pass."""
    k = min(k_out + _RERANK_MARGIN, index.size)
    q, g = _scaled_queries(queries, index.log2_scale)
    w = _rank_weight(g, q.dtype)
    gamma = _gamma(q.shape[1], q.dtype)
    q_norm = jnp.sqrt(jnp.sum(jnp.square(q), axis=1))
    n_blocks = index.rows.shape[0] // index.block
    rows = index.rows.reshape(n_blocks, index.block, -1)
    norms = index.sq_norms.reshape(n_blocks, index.block)

    def scan_body(carry, inputs):
        best_d, best_i = carry
        b_rows, b_norms, offset = inputs
        keys = _rank_lower_bounds(q, w, b_rows, b_norms, q_norm, gamma)
        new_neg, new_pos = jax.lax.top_k(-keys, min(k, index.block))
        return _merge_topk(best_d, best_i, -new_neg, new_pos.astype(jnp.int32) + offset, k), None

    init = (jnp.full((q.shape[0], k), jnp.inf, q.dtype), jnp.full((q.shape[0], k), -1, jnp.int32))
    offsets = jnp.arange(n_blocks, dtype=jnp.int32) * index.block
    (lower, idx), _ = jax.lax.scan(scan_body, init, (rows, norms, offsets))
    # Padding rows (infinite norm) and unfilled slots (-1) only surface when a shard of a sharded bank
    # holds fewer real rows than k; they sort last.
    pad = (idx < 0) | jnp.isinf(index.sq_norms[jnp.maximum(idx, 0)])
    sq = jnp.where(pad, jnp.inf, _exact_sq(q, g, index.rows[jnp.maximum(idx, 0)]))
    # DECISION: the final order is by exact distance, ties to the lower index.
    sq, idx = jax.lax.sort((sq, idx), dimension=1, num_keys=2)
    sq, idx = sq[:, :k_out], idx[:, :k_out]
    valid = ~jnp.isinf(index.sq_norms)
    ok = (k >= jnp.sum(valid)) | _certified(q, w, lower[:, -1], sq[:, k_out - 1], gamma)
    ids = jnp.arange(index.rows.shape[0], dtype=jnp.int32)
    sq, idx = _fix_uncertified(
        ok, sq, idx, lambda i: _exact_pass(q[i], g[i], index.rows, valid, ids, k_out, index.block))
    idx = jnp.where(jnp.isinf(sq), -1, idx)
    return _unscale_distances(sq, g, index.log2_scale), idx


# -- the common entry points for any prepared index ----------------------------------------------
# A prepared index is a `BankIndex` (brute force) or any index with the same duck-typed methods
# (`clustered.ClusteredIndex`): `_search(queries, k=, query_block=)`, `_bank_rows(idx)` and
# `_distances_to(centred_queries, idx)`, plus `centre`, `size` and `rows` (for dtype and width).
def _bank_rows(index, idx):
    """Bank rows `idx` in the bank's units, as stored (centred, scaled, then scaled back)."""
    if not isinstance(index, BankIndex):
        return index._bank_rows(idx)
    return _scale(index.rows[idx], -index.log2_scale) + index.centre


def _distances_to(index, queries, idx):
    """Exact distances, in the bank's units, from `(b, D)` queries minus `index.centre` to the rows
    `idx` `(b, m)`: the same arithmetic as the search's, so values agree with it bit for bit."""
    if not isinstance(index, BankIndex):
        return index._distances_to(queries, idx)
    q, g = _scaled_queries(queries, index.log2_scale)
    return _unscale_distances(_exact_sq(q, g, index.rows[idx]), g, index.log2_scale)


def _search_any(index, queries, *, k, query_block):
    """Traceable exact search of any prepared index (`search` without the checks)."""
    if isinstance(index, BankIndex):
        return _search(index, queries, k=k, query_block=query_block)
    return index._search(queries, k=k, query_block=query_block)


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


def search(index, queries: jax.Array, k: int = 1, *, query_block: int = 256) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest rows of a prepared bank; shapes and meaning as `nearest_neighbors`.

    `index`: a `BankIndex` (`build_index`, brute force) or a `clustered.ClusteredIndex`
    (`build_clustered_index`, prunes); both give the same rows.

    A query whose difference from the bank mean overflows the dtype, or whose nearest distance does,
    gets inf or NaN distances (never a finite wrong one); check `jnp.isfinite` on the host if such
    inputs can occur. Nothing is checked on the device here, so nothing waits for a transfer, except
    that a clustered index on a CPU searches 512 or more queries per core from as many host threads
    (`clustered.host_parts`) and returns when they are done; the results are the same bit for bit.
    """
    _checks.check_width("queries", queries, "Q", index.rows.shape[1], "the bank")
    k = _checks.check_int("k", k, low=1, high=index.size)
    query_block = min(_checks.check_int("query_block", query_block, low=1), queries.shape[0])
    queries = jnp.asarray(queries)
    if isinstance(index, BankIndex):
        return _search(index, queries, k=k, query_block=query_block)
    from patchcore_jax import clustered  # the index that prunes: host threads on a CPU

    return clustered.in_parts(lambda part: index._search(part, k=k, query_block=query_block),
                              clustered.host_parts(index, queries), queries)


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
