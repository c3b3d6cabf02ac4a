"""Exact and approximate nearest-neighbour search in the memory bank, tiled for bounded memory.

The exact search walks the bank in blocks for each block of queries (`lax.map` over query blocks,
`lax.scan` over bank blocks), keeping a running top list, so memory is `query_block x bank_block`
whatever the bank's size. The bank is prepared once (`BankIndex`: centred, scaled by a power of two,
padded, squared norms cached) and reused across calls.

One device searches through `brute_fused` (sub-blocks of 256 rows against whole query tiles, only
minimum reductions after each product: the faster shape on CPU); `search_block` below, the running
list, is the search of one shard of a sharded bank (`run.sharding`). Both are exact the same way.
Besides one product's keys, the fast path keeps `k` integer keys per 256 bank rows for each query of
a tile (`tile x k x N / 256`; 0.3 MB per 1,000 queries of a 20k bank at k = 1).

Why the result is exact, not merely usually right:
- Ranking uses `||b||^2 - 2 q.b` (the query's own norm is a constant per query), less its
  worst-case float32 error `gamma (||b||^2 + 2 ||q|| ||b||)`, `gamma = (D + 4) eps / 2` (Higham's bound
  for a D-term dot product): a lower bound of each row's key whatever the summation order of the
  matrix product. With `product="bfloat16x3"` (`build_index`'s choice for float32 banks on CPUs with
  AMX) the product is three bfloat16 products of the operands' head and tail, and the bound grows by
  their split error (`common.SPLIT_ERROR`, 2**-15 relative to ||q|| ||b||). Each bank block hands on
  its `k + 7` rows with the smallest lower bounds; a running list keeps the `k + 15` smallest of those. The search recomputes their distances as `||q - b||` by
  differences, and certifies per query that the k-th of these lies below every other row's lower
  bound (with room for its own rounding): a row that left the list has a bound at least the list's
  last, and a row that never entered it a bound at least its block's `(k + 7)`-th (the "floor", the
  least of these over the blocks). A query whose certificate fails
  (near-duplicate rows, a query equidistant from many rows) is searched again by exact differences
  over the whole bank. Ties go to the lower bank index either way.
- Magnitudes: the centred bank is scaled by a power of two so its largest entry lies in [0.5, 1), and
  each query by a further power of two when it lies far outside the bank. Scaling by a power of two
  is exact, so features around 1e19 (whose squares overflow float32) or 1e-25 (whose squares
  underflow) are searched as exactly as features around 1; distances are scaled back at the end.
  That holds for a bank whose rows share its scale; within one bank, float32 resolves what its
  centred values resolve: centring rounds each value to the bank's extent, and squares below the
  smallest normal float flush to zero on the CPU, so rows nearer to each other or to a query than
  about 1e-19 of the bank's extent (their squared differences underflow) may tie at 0 or swap. The
  bounds allow for those flushed values, so the rows the search certifies are still the nearest by
  the float32 distances it computes. Only a result that itself overflows float32 (a distance above
  ~3.4e38, or inputs whose difference from the bank mean does) comes back as inf or NaN; callers on the host can refuse it there, with
  no transfer on the hot path.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.stages import checks
from patchcore_jax._src.stages.search import brute_fused, common
from patchcore_jax._src.stages.search.index import search

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
      product: the matrix product that ranks candidates on one device, "highest" or "bfloat16x3"
        (`common.PRODUCTS`); results are exact with either.
    """

    rows: jax.Array
    sq_norms: jax.Array
    centre: jax.Array
    size: int = flax.struct.field(pytree_node=False)
    block: int = flax.struct.field(pytree_node=False)
    log2_scale: jax.Array | int = 0
    product: str = flax.struct.field(pytree_node=False, default="highest")

    # The index protocol (`search.common`): what `search.index` and `scoring` call on any index.
    def search_traced(self, queries, *, k, query_block=common.QUERY_BLOCK):
        """Traceable exact search of `(Q, D)` queries (`search` without the checks)."""
        return search_jit(self, queries, k=k, query_block=query_block)

    def bank_rows(self, idx):
        """Bank rows `idx` in the bank's units, as stored (centred, scaled, then scaled back)."""
        return common.scale_pow2(self.rows[idx], -self.log2_scale) + self.centre

    def distances_to(self, centred_queries, idx):
        """Exact distances, in the bank's units, from `(b, D)` queries minus `centre` to the rows `idx`
        `(b, m)`: the same arithmetic as the search's (differences, then squares summed), so values agree
        with it to the summation order XLA picks for each shape (a last-place difference at most)."""
        q, g = common.scaled_queries(centred_queries, self.log2_scale)
        return common.unscale_distances(common.exact_sq(q, g, self.rows[idx]), g, self.log2_scale)

    def host_parts(self, queries) -> int:
        """Brute force is one matrix product per block: one call uses every core already."""
        return 1


def build_index(bank: jax.Array, *, block: int = 2048, product: str = "auto") -> BankIndex:
    """Prepares `bank` `(N, D)` for `search`: centred, scaled, padded to blocks, squared norms cached.

    `product` ranks the candidates (`common.PRODUCTS`): "highest" (the bank's dtype at full precision)
    or "bfloat16x3" (float32 banks: three bfloat16 products, faster where the CPU has AMX); "auto" takes
    "bfloat16x3" for a float32 bank on such a CPU, else "highest". The search is exact with either."""
    n, _ = checks.check_array("bank", bank, ndim=2)
    block = checks.check_int("block", block, low=1)
    if checks.is_host_data(bank):
        _check_representable(np.asarray(bank))
        bank = jax.device_put(np.asarray(bank))
    dtype = bank.dtype if jnp.issubdtype(bank.dtype, jnp.floating) else jnp.float32
    # Under a trace (build_index inside jit) the devices are not known yet: the default backend's.
    traced = isinstance(bank, jax.core.Tracer)
    platforms = {jax.default_backend()} if traced else {d.platform for d in bank.devices()}
    product = common.choose_product(product, dtype, platforms)
    return build_index_jit(bank, block=min(block, n)).replace(product=product)


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



def _centre_and_scale(bank, real=None):
    """The bank mean (computed on a power-of-two-scaled copy, so the sum cannot overflow) and the
    exponent that brings the centred rows' largest entry into [0.5, 1). `real`: a row mask or None."""
    n = bank.shape[0] if real is None else jnp.sum(real)
    masked = bank if real is None else jnp.where(real[:, None], bank, 0.0)
    e0 = -common.exponent(jnp.max(jnp.abs(masked)))
    centre = common.scale_pow2(jnp.sum(common.scale_pow2(masked, e0), axis=0) / n, -e0)
    centred = masked - centre if real is None else jnp.where(real[:, None], bank - centre, 0.0)
    return centre, -common.exponent(jnp.max(jnp.abs(centred))).astype(jnp.int32)


def prepare_index(bank, *, block, n_real=None) -> BankIndex:
    """The `BankIndex` of `bank`: centred, padded to whole blocks, squared norms cached.

    Rows from `n_real` on are padding the caller added (a mesh's whole shards,
    `sharding.build_index`): they are left out of the centre and never rank. One device runs this
    under `build_index_jit`, a mesh under its own jit: the same index in both.
    """
    bank = bank if jnp.issubdtype(bank.dtype, jnp.floating) else bank.astype(jnp.float32)
    n_rows = bank.shape[0]
    n = n_rows if n_real is None else n_real
    real = (jnp.arange(n_rows) < n) if n < n_rows else None
    centre, log2_scale = _centre_and_scale(bank, real)
    centred = bank - centre if real is None else jnp.where(real[:, None], bank - centre, 0.0)
    n_pad = -(-n_rows // block) * block
    rows = jnp.pad(common.scale_pow2(centred, log2_scale), ((0, n_pad - n_rows), (0, 0)))
    sq = jnp.sum(jnp.square(rows), axis=1)
    sq = jnp.where(jnp.arange(n_pad) < n, sq, jnp.inf)
    return BankIndex(rows=rows, sq_norms=sq, centre=centre, size=n, block=block, log2_scale=log2_scale)


build_index_jit = jax.jit(prepare_index, static_argnames=("block", "n_real"))



# Candidates kept beyond k for the exact re-ranking. The certificate below decides whether they were
# enough; a query it fails takes the slow exact pass over the whole bank. Brute force ranks by the norm
# expansion in global coordinates, whose worst-case error is relative to ||q||^2, not to the distance:
# on real PatchCore queries of the bank's own category (||q||^2 about 140 times the nearest squared
# distance), 3 extra candidates left 8.3% of the queries uncertified and made the search 3 times slower;
# 15 leave none (0 of 2048; 7 left 11).
_RERANK_MARGIN = 15
# Rows each bank block hands on beyond k. Taking the top k + 15 of every block cost more than the
# certificate saved (the search ran at 0.50x faiss flat, 20k x 1024 Gaussian bank; 0.66x with this);
# the floor keeps the certificate valid with fewer. On the real own-category bank above, k + 3 per
# block left 8 of 6272 queries uncertified, k + 7 none (neither on a 20k x 1024 Gaussian bank).
_BLOCK_MARGIN = 7


def search_block(queries, index: BankIndex, k_out: int):
    """`(qb, D)` queries minus `index.centre` -> the k nearest rows: `(distances (qb, k_out) in the
    bank's units, indices)`. Ranks by lower bounds of the norm expansion, keeps `k_out + 7` rows per
    bank block and `k_out + 15` in all, re-ranks those by exact distance and certifies them; an
    uncertified query takes the exact pass."""
    k = min(k_out + _RERANK_MARGIN, index.size)
    # A list that can hold the whole bank takes whole blocks: nothing is dropped, nothing to certify.
    kb = index.block if k >= index.size else min(k_out + _BLOCK_MARGIN, index.block)
    q, g = common.scaled_queries(queries, index.log2_scale)
    w = common.rank_weight(g, q.dtype)
    gamma = common.gamma(q.shape[1], q.dtype)
    q_norm = jnp.sqrt(jnp.sum(jnp.square(q), axis=1))
    n_blocks = index.rows.shape[0] // index.block
    rows = index.rows.reshape(n_blocks, index.block, -1)
    norms = index.sq_norms.reshape(n_blocks, index.block)

    def scan_body(carry, inputs):
        best_d, best_i, floor = carry
        b_rows, b_norms, offset = inputs
        keys = common.rank_lower_bounds(q, w, b_rows, b_norms, q_norm, gamma)
        new_neg, new_pos = jax.lax.top_k(-keys, kb)
        if kb < index.block:
            # The block's kb-th bound, read as a reduction: a slice of top_k's values kept XLA:CPU
            # from rewriting the sort into its TopK kernel, and the search ran 8 times slower.
            floor = jnp.minimum(floor, -jnp.min(new_neg, axis=1))
        best_d, best_i = common.merge_topk(best_d, best_i, -new_neg, new_pos.astype(jnp.int32) + offset, k)
        return (best_d, best_i, floor), None

    init = (jnp.full((q.shape[0], k), jnp.inf, q.dtype), jnp.full((q.shape[0], k), -1, jnp.int32),
            jnp.full((q.shape[0],), jnp.inf, q.dtype))
    offsets = jnp.arange(n_blocks, dtype=jnp.int32) * index.block
    (lower, idx, floor), _ = jax.lax.scan(scan_body, init, (rows, norms, offsets))
    # Padding rows (infinite norm) and unfilled slots (-1) only surface when a shard of a sharded bank
    # holds fewer real rows than k; they sort last.
    pad = (idx < 0) | jnp.isinf(index.sq_norms[jnp.maximum(idx, 0)])
    sq = jnp.where(pad, jnp.inf, common.exact_sq(q, g, index.rows[jnp.maximum(idx, 0)]))
    # DECISION: the final order is by exact distance, ties to the lower index.
    sq, idx = jax.lax.sort((sq, idx), dimension=1, num_keys=2)
    sq, idx = sq[:, :k_out], idx[:, :k_out]
    valid = ~jnp.isinf(index.sq_norms)
    # Every row outside the list has a bound of at least the list's last or its block's floor. When no
    # block dropped a row and the list holds every real row, there is nothing outside it.
    kept_all = (k >= jnp.sum(valid)) if kb >= index.block else False
    ok = kept_all | common.certified(q, w, jnp.minimum(lower[:, -1], floor), sq[:, k_out - 1], gamma)
    ids = jnp.arange(index.rows.shape[0], dtype=jnp.int32)
    sq, idx = common.fix_uncertified(
        ok, sq, idx, lambda i: common.exact_pass(q[i], g[i], index.rows, valid, ids, k_out, index.block))
    idx = jnp.where(jnp.isinf(sq), -1, idx)
    return common.unscale_distances(sq, g, index.log2_scale), idx


def query_blocks(index: BankIndex, queries, query_block: int, *, multiple: int = 0):
    """`(Q, D)` queries -> `(tiles, tile, D)`, centred like the bank, zero-padded; the fewest tiles of
    at most `query_block` queries, of equal size (one tile of Q, or a multiple of 8 where `query_block`
    allows). With `multiple`, every tile is a multiple of it (and may pass `query_block` by less)."""
    q = queries.shape[0]
    queries = queries.astype(index.rows.dtype) - index.centre
    tiles = -(-q // query_block)
    even = -(-q // tiles)
    if multiple:
        tile = -(-even // multiple) * multiple
    else:
        tile = q if tiles == 1 else min(-(-even // 8) * 8, query_block)
    tiles = -(-q // tile)
    return jnp.pad(queries, ((0, tiles * tile - q), (0, 0))).reshape(tiles, tile, -1)


@functools.partial(jax.jit, static_argnames=("k", "query_block"))
def search_jit(index: BankIndex, queries, *, k, query_block):
    """The fast path (`brute_fused`): its products take `SUB_BLOCK` bank rows, so a tile takes as many
    more queries as that is smaller than `index.block` (the same memory of keys per product)."""
    q = queries.shape[0]
    sub, _ = brute_fused.layout(index)
    blocks = query_blocks(index, queries, query_block * (index.block // sub), multiple=brute_fused.CHUNK)
    dist, idx = jax.lax.map(lambda qb: brute_fused.search_tile(qb, index, k), blocks)
    q_pad = blocks.shape[0] * blocks.shape[1]
    return dist.reshape(q_pad, k)[:q], idx.reshape(q_pad, k)[:q]


def nearest_neighbors(bank: jax.Array, queries: jax.Array, k: int = 1) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest bank rows of each query.

    Args:
      bank: `(N, D)`; queries: `(Q, D)`; k: `1 <= k <= N`.
    Returns:
      distances `(Q, k)`, Euclidean (not squared), ascending; indices `(Q, k)` int32, ties to the
      lower bank index. For repeated searches of one bank, `build_index` once and call `search`.
    """
    checks.check_search_args(bank, queries, k)
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
    _, k = checks.check_search_args(bank, queries, k)
    if not 0.0 < recall_target <= 1.0:
        raise ValueError(f"recall_target: expected a value in (0, 1], got {recall_target}")
    query_block = min(checks.check_int("query_block", query_block, low=1), queries.shape[0])
    bank = jnp.asarray(bank)
    return _approximate(bank, jnp.asarray(queries, bank.dtype), k=k, query_block=query_block, recall_target=float(recall_target))
