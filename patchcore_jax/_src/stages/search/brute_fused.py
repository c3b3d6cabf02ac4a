"""The brute-force search's fast path: one matrix product per sub-block of the bank, followed only by
elementwise work and minimum reductions (no top-k kernel over the keys).

The bank is read in sub-blocks of `SUB_BLOCK` rows against a whole tile of queries (the product's
fastest shape on XLA:CPU). Each sub-block's rows form `GROUP`-row groups, strided (rows `j`,
`j + SUB_BLOCK / GROUP`, ...), so a group's key is an elementwise minimum of contiguous slices. The
key of a row is its lower bound (`common.bounds_of`, through `index.product`); each group's key is the
minimum of its rows', made a lower bound still by rounding it down in its order-preserving integer form, whose low
bits then carry the group's position, so one integer minimum yields both the least key and where it
lies. Each sub-block hands on its `t = k` smallest group keys (min, mask, min again: cheap passes over
a quarter of the keys) and a floor: the least of its other groups' keys.

Exactness: the candidate rows are those of the `k + 1` groups with the smallest keys (then of `k + 7`
for the queries of a chunk that the first list does not certify). Every other row's key lower bound is at least the next
group key in the list or the floor, so a query whose k-th exact distance lies below both (with room
for rounding, `common.certified`) has its exact answer among the candidates; any other query takes
the exact pass over the whole bank. The final order is by exact distance, ties to the lower index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from patchcore_jax._src.stages.search import common

SUB_BLOCK = 256  # bank rows per product: with a tile of all queries, XLA:CPU's fastest product shape
GROUP = 4  # rows per group: the candidates of one group key
FIRST_LIST = 1  # groups beyond k in every query's list
SECOND_LIST = 7  # groups beyond k in the list of a query that the first list does not certify
# Queries re-ranked together: a chunk takes the second list only if one of them needs it. On a 20k x 1024
# Gaussian bank a first list of k + 1 groups leaves 1 query in 500 uncertified (k groups: 1 in 27), so
# chunks of 32 sent 6% of the chunks to the second list; chunks of 8 send fewer.
CHUNK = 8
_INT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}  # the integer of each float width


def sortable(x):
    """Floats -> integers of the same width, in the same order (negative floats have their magnitude
    bits flipped)."""
    itype = _INT[x.dtype.itemsize]
    i = jax.lax.bitcast_convert_type(x, itype)
    return jnp.where(i < 0, i ^ jnp.iinfo(itype).max, i)


def unsortable(s, dtype):
    """The inverse of `sortable`, back to floats `dtype`."""
    return jax.lax.bitcast_convert_type(jnp.where(s < 0, s ^ jnp.iinfo(s.dtype).max, s), dtype)


def inf_key(dtype):
    """The key of +inf (marks a group already taken; above every finite or padding key)."""
    return sortable(jnp.asarray(jnp.inf, dtype))


def layout(index):
    """`(rows per sub-block, rows per group)` for `index`: `SUB_BLOCK` and `GROUP` where the block
    allows, else the whole block and single rows."""
    sub = SUB_BLOCK if index.block % SUB_BLOCK == 0 else index.block
    return sub, (GROUP if sub % GROUP == 0 else 1)


def group_keys(q, w, q_norm, gamma, index, k):
    """`(Q, D)` scaled queries -> `(keys (Q, G), floor (Q,), bits)`: each sub-block's `t = min(k,
    groups)` smallest group keys (order-preserving integers, `sortable`, rounded down and the group's
    position in the low `bits` bits: each at most the key lower bound of every row of its group), key
    `s * t + i` from sub-block `s`; and per query the least key of the groups not handed on."""
    sub, gs = layout(index)
    per = sub // gs
    bits = max(per - 1, 1).bit_length()
    t = min(k, per)
    # Sub-blocks of padding only (the index pads to whole blocks of `index.block`) are left out.
    n_sub = min(-(-index.size // sub), index.rows.shape[0] // sub)
    rows = index.rows[: n_sub * sub].reshape(n_sub, sub, -1)
    norms = index.sq_norms[: n_sub * sub].reshape(n_sub, sub)
    top = inf_key(q.dtype)
    pos = jnp.arange(per, dtype=top.dtype)
    lower_bounds = common.bounds_of(q, w, q_norm, gamma, index.product)
    b_norm = jnp.sqrt(jnp.where(jnp.isfinite(norms), norms, 0.0))

    def body(floor, inputs):
        b_rows, b_norms, b_norm = inputs
        lb = jnp.min(lower_bounds(b_rows, b_norms, b_norm).reshape(q.shape[0], gs, per), axis=1)
        # Rounded down by one whole unit of the low bits, so the position never raises the key.
        keys = (((sortable(lb) >> bits) - 1) << bits) | pos
        best = []
        for _ in range(t):
            m = jnp.min(keys, axis=1)
            keys = jnp.where(keys == m[:, None], top, keys)  # positions make the keys distinct
            best.append(m)
        return jnp.minimum(floor, jnp.min(keys, axis=1)), jnp.stack(best, axis=1)

    floor, keys = jax.lax.scan(body, jnp.full((q.shape[0],), top), (rows, norms, b_norm.reshape(n_sub, sub)))
    return jnp.moveaxis(keys, 0, 1).reshape(q.shape[0], n_sub * t), floor, bits


def smallest(keys, n):
    """The `n` smallest of `(Q, G)` integer keys per row, ascending, and their positions: `n` rounds of
    minimum reductions (XLA:CPU's top-k kernel took longer than the search's products after them)."""
    ids = jnp.arange(keys.shape[1], dtype=jnp.int32)
    vals, pos = [], []
    for _ in range(n):
        m = jnp.min(keys, axis=1)
        j = jnp.min(jnp.where(keys == m[:, None], ids, keys.shape[1]), axis=1)
        keys = jnp.where(ids == j[:, None], jnp.iinfo(keys.dtype).max, keys)
        vals.append(m)
        pos.append(j)
    return jnp.stack(vals, axis=1), jnp.stack(pos, axis=1)


def candidate_rows(keys, order, bits, index, k):
    """Rows `(Q, len(order) * gs)` of the groups `order` `(Q, L)` (positions in `keys`)."""
    sub, gs = layout(index)
    per = sub // gs
    t = min(k, per)
    j = jnp.take_along_axis(keys, order, axis=1) & ((1 << bits) - 1)
    first = (order // t) * sub + j
    rows = first[:, :, None] + per * jnp.arange(gs, dtype=jnp.int32)
    return rows.reshape(order.shape[0], -1)


def nearest_candidates(q, g, rows_idx, index, k_out):
    """Exact squared distances from `(c, D)` queries to their candidate rows `(c, m)`, the `k_out`
    nearest by exact distance, ties to the lower index. Padding never ranks."""
    pad = jnp.isinf(index.sq_norms[rows_idx])
    # DECISION: the order is by exact distance, ties to the lower bank index.
    sq = jnp.where(pad, jnp.inf, common.exact_sq(q, g, index.rows[rows_idx]))
    if k_out == 1:
        best = jnp.min(sq, axis=1, keepdims=True)
        big = jnp.iinfo(jnp.int32).max
        return best, jnp.min(jnp.where(sq == best, rows_idx, big), axis=1, keepdims=True)
    sq, idx = jax.lax.sort((sq, rows_idx), dimension=1, num_keys=2)
    return sq[:, :k_out], idx[:, :k_out]


def search_tile(queries, index, k_out):
    """`(Qt, D)` queries minus `index.centre`, `Qt` a multiple of `CHUNK` -> `(distances (Qt, k_out)
    in the bank's units, indices)`, exact (see the module docstring)."""
    q, g = common.scaled_queries(queries, index.log2_scale)
    w = common.rank_weight(g, q.dtype)
    gamma = common.gamma(q.shape[1], q.dtype)
    q_norm = jnp.sqrt(jnp.sum(jnp.square(q), axis=1))
    keys, floor, bits = group_keys(q, w, q_norm, gamma, index, k_out)
    n_groups = keys.shape[1]
    mask = (1 << bits) - 1
    listed_keys, order = smallest(keys, min(k_out + SECOND_LIST + 1, n_groups))
    floor = unsortable(floor & ~mask, q.dtype)

    def bound(n):  # every row outside the first n groups of the list has a key bound at least this
        return jnp.minimum(floor, unsortable(listed_keys[:, n] & ~mask, q.dtype)) if n < n_groups else floor

    first = min(k_out + FIRST_LIST, n_groups)
    second = min(k_out + SECOND_LIST, n_groups)
    b1, b2 = bound(first), bound(second)

    def chunk(args):
        qc, gc, wc, kc, oc, b1c, b2c = args

        def listed(n, b):
            sq, idx = nearest_candidates(qc, gc, candidate_rows(kc, oc[:, :n], bits, index, k_out), index, k_out)
            return sq, idx, common.certified(qc, wc, b, sq[:, k_out - 1], gamma)

        one = listed(first, b1c)
        if second == first:
            return one
        return jax.lax.cond(jnp.all(one[2]), lambda: one, lambda: listed(second, b2c))

    c = q.shape[0] // CHUNK
    split = lambda x: x.reshape(c, CHUNK, *x.shape[1:])  # noqa: E731
    sq, idx, ok = jax.lax.map(chunk, tuple(map(split, (q, g, w, keys, order, b1, b2))))
    sq, idx, ok = sq.reshape(-1, k_out), idx.reshape(-1, k_out), ok.reshape(-1)
    valid = ~jnp.isinf(index.sq_norms)
    ids = jnp.arange(index.rows.shape[0], dtype=jnp.int32)
    sq, idx = common.fix_uncertified(
        ok, sq, idx, lambda i: common.exact_pass(q[i], g[i], index.rows, valid, ids, k_out, index.block))
    idx = jnp.where(jnp.isinf(sq), -1, idx)
    return common.unscale_distances(sq, g, index.log2_scale), idx
