"""The pieces every exact search shares (the brute-force and the clustered index): the power-of-two
scaling, the ranking keys and their error bounds, the certificate, the exact fallback, and the split
of a CPU search over host threads.

A prepared index (`brute.BankIndex`, `clustered.ClusteredIndex`) answers the protocol that
`search.index` dispatches on: `search_traced(queries, *, k, query_block)`, `bank_rows(idx)`,
`distances_to(centred_queries, idx)` and `host_parts(queries)`, and has `centre`, `size` and `rows`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
# Brute force's queries per tile, at most. Tiles are balanced: 3136 queries make 4 tiles of 784, not 4
# of 1024 with 30% padding. Memory is one tile x one bank block of keys (8 MB at 1024 x 2048, float32).
# On 2 CPU cores, tiles of 256 made the search 9% slower than tiles of 784 (20k x 1024 bank).
QUERY_BLOCK = 1024


def exponent(x):
    """`e` with `x = m * 2**e`, `m` in [0.5, 1) (0 for x = 0): the binary exponent, exactly."""
    return jnp.frexp(x)[1]


def scale_pow2(x, e):
    """`x * 2**e` exactly for integer `e` (broadcast), in two steps so that `2**e` itself need not be
    representable (|e| up to ~250 covers every float32 ratio)."""
    half = e // 2
    one = jnp.ones((), x.dtype)
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, e - half)


def merge_topk(best_d, best_i, new_d, new_i, k):
    """Keeps the k smallest of two candidate lists; on equal distances the earlier list (lower bank
    indices) wins, because `lax.top_k` is stable."""
    d = jnp.concatenate([best_d, new_d], axis=1)
    i = jnp.concatenate([best_i, new_i], axis=1)
    neg, pos = jax.lax.top_k(-d, k)
    return -neg, jnp.take_along_axis(i, pos, axis=1)


RANK_SCALE_FLOOR = -126  # the ranking's per-query weight 2**-g stays a normal float32


# -- the pieces every exact search shares (the brute-force and the clustered index) ---------------
def scaled_queries(centred, log2_scale):
    """Centred queries (bank units) -> `(q, g)`: `q = centred * 2**(log2_scale - g)` with its largest
    entry below 2, where `g >= 0` is the extra per-query exponent of a query far outside the bank."""
    e_q = exponent(jnp.max(jnp.abs(centred), axis=1))
    g = jnp.maximum(e_q + log2_scale - 1, 0).astype(jnp.int32)
    return scale_pow2(centred, (log2_scale - g)[:, None]), g


def rank_weight(g, dtype):
    return jnp.ldexp(jnp.ones((), dtype), jnp.maximum(-g, RANK_SCALE_FLOOR))


def rank_keys(q, w, rows, norms):
    """`(||b||^2 * 2**-g - 2 q.b)`: the squared distance up to a per-query constant and scale."""
    return norms[None, :] * w[:, None] - 2.0 * jnp.dot(q, rows.T, precision=HIGHEST)


def gamma(dim, dtype):
    """The worst-case relative error of a `dim`-term dot product (Higham's gamma_n), with room for
    the few roundings around it."""
    return (dim + 4) * jnp.finfo(dtype).eps / 2


# -- the ranking product -----------------------------------------------------------------------------
# Brute force ranks rows by a matrix product whose error the lower bounds absorb. Two products:
# - "highest": `jnp.dot(..., precision=HIGHEST)` in the bank's dtype, error at most `gamma` (Higham)
#   relative to ||q|| ||b||;
# - "bfloat16x3": each float32 operand split into a bfloat16 head and tail (`x = h + l + r`, |r| <= 2**-16
#   |x|), and `q.b ~ qh.bh + qh.bl + ql.bh`, three bfloat16 products accumulated in float32. What it
#   leaves out (`ql.bl`, the tails' tails) is at most 3.1 * 2**-16 of sum |q_i| |b_i| <= ||q|| ||b||, and its
#   three float32 sums carry at most 1.02 `gamma` of the same: `SPLIT_ERROR` added to `gamma` covers both
#   within the doubled room the bounds already keep. On CPUs with AMX (bfloat16 tiles) the three
#   products take 0.6 of the float32 product's time (a 2-core Xeon, 3,136 x 20,000 x 1,024).
# The search stays exact with either: only the candidates' ranking bound changes, and the candidates
# are re-ranked by exact float32 differences and certified as before.
PRODUCTS = ("highest", "bfloat16x3")
SPLIT_ERROR = 2.0**-15


def bf16_split(x):
    """float32 `x` -> `(head, tail)` bfloat16 with `x - head - tail` at most `2**-16 |x|` (round to
    nearest twice; tiny entries may flush to zero, absolute error below 2**-126)."""
    head = x.astype(jnp.bfloat16)
    return head, (x - head.astype(x.dtype)).astype(jnp.bfloat16)


def split_dot_t(a_split, b):
    """`a . b.T` for `a` given as `bf16_split(a)` `((m, D), (m, D))` and float32 `b` `(n, D)`: three
    bfloat16 products, float32 accumulation (`bfloat16x3` above). -> `(m, n)` float32."""
    (ah, al), (bh, bl) = a_split, bf16_split(b)
    dims = (((1,), (1,)), ((), ()))
    dot = lambda x, y: jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)  # noqa: E731
    return dot(ah, bh) + (dot(ah, bl) + dot(al, bh))


def product_gamma(product, gamma_f32):
    """The relative error bound the lower bounds use for the cross term of `product`."""
    return gamma_f32 + SPLIT_ERROR if product == "bfloat16x3" else gamma_f32


def product_floor(product, dim, dtype):
    """The absolute error bound of `product` beyond its relative one: entries and products below the
    smallest normal float (`tiny`, 2**-126 in float32) may flush to zero (the CPU does), each term
    losing at most `4 tiny` of `-2 q.b` (|2 q_i| < 4, |b_i| < 1), in `dim` terms ("highest") or `3 dim`
    ("bfloat16x3"); doubled."""
    return (24.0 if product == "bfloat16x3" else 8.0) * dim * float(jnp.finfo(dtype).tiny)


def norm_allowance(dim, dtype):
    """What flushing can take from a norm computed as `sqrt(sum x_i**2)`: squares below `tiny` may flush
    to zero (a row or query whose entries all lie below `2**-63` in float32 then has norm 0), so
    `||x|| <= computed + sqrt(2 dim tiny)`. The bounds' relative slack uses norms raised by this."""
    return float(np.sqrt(2.0 * dim * float(jnp.finfo(dtype).tiny)))


@functools.lru_cache(maxsize=1)
def amx_bfloat16() -> bool:
    """True where this host's CPU reports AMX bfloat16 tiles (Linux's /proc/cpuinfo flag `amx_bf16`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def choose_product(product: str, dtype, platforms) -> str:
    """`product` ("auto", or one of `PRODUCTS`) for a bank of `dtype` on devices of `platforms`: "auto"
    takes "bfloat16x3" for float32 banks on CPUs with AMX (where it was measured faster), else "highest"."""
    if product not in ("auto", *PRODUCTS):
        raise ValueError(f"product: expected 'auto' or one of {PRODUCTS}, got {product!r}")
    if product == "bfloat16x3" and dtype != jnp.float32:
        raise ValueError(f"product: 'bfloat16x3' splits float32 banks only, this bank is {jnp.dtype(dtype).name}")
    if product != "auto":
        return product
    return "bfloat16x3" if dtype == jnp.float32 and set(platforms) == {"cpu"} and amx_bfloat16() else "highest"


def bounds_of(q, w, q_norm, gamma, product):
    """`f(rows (n, D), sq_norms (n,), norms (n,)) -> (Q, n)`: lower bounds of the rows' ranking keys
    (`rank_keys`) for the `(Q, D)` scaled queries through `product`: each key less its worst-case error
    `gamma' (w ||b||^2 + 2 ||q|| ||b||)` (doubled, which also covers the few roundings of forming it),
    `gamma'` the product's (`product_gamma`), with norms and product allowing for flushed tiny values
    (`norm_allowance`, `product_floor`). The per-query and per-row factors are drawn out, and -2 folded
    into the queries (exact): one multiply-add and one product term per key. Padding rows (infinite
    norm) get infinite keys without a select, as the query factor is positive."""
    q2 = -2.0 * q
    norm_factor = (w * (1.0 - 2.0 * gamma))[:, None]
    a = norm_allowance(q.shape[1], q.dtype)  # norms that flushed to zero still bound the error
    cross_factor = (4.0 * product_gamma(product, gamma) * (q_norm + a))[:, None]
    floor_term = product_floor(product, q.shape[1], q.dtype)
    if product == "bfloat16x3":
        q2_split = bf16_split(q2)  # -2 q splits exactly as q does (a power of two)
        dot = lambda rows: split_dot_t(q2_split, rows)  # noqa: E731
    else:
        dot = lambda rows: jnp.dot(q2, rows.T, precision=HIGHEST)  # noqa: E731
    return lambda rows, sq_norms, norms: (sq_norms[None, :] * norm_factor + dot(rows)
                                          - (cross_factor * (norms + a) + floor_term))


def rank_lower_bounds(q, w, rows, norms, q_norm, gamma):
    """`bounds_of` the float32 product ("highest") for `rows` with squared norms `norms`; padding
    (infinite norm) stays inf."""
    finite = jnp.isfinite(norms)
    keys = bounds_of(q, w, q_norm, gamma, "highest")(rows, norms, jnp.sqrt(jnp.where(finite, norms, 0.0)))
    return jnp.where(finite[None, :], keys, jnp.inf)


def exact_sq(q, g, cand_rows):
    """`||q - b * 2**-g||^2` for candidates `(qb, c, D)`: differences, so no cancellation."""
    return jnp.sum(jnp.square(q[:, None, :] - scale_pow2(cand_rows, -g[:, None, None])), axis=-1)


def certified(q, w, lower_last, dk_sq, gamma):
    """True where no row outside the candidates can be nearer than the k-th candidate.

    A row outside the candidates has a key lower bound of at least `lower_last`, so its squared
    distance (per-query units) is at least `||q||^2 + w * lower_last`; the k-th exact squared distance
    must lie below that, with room for the rounding of both sides (`||q||^2` and the exact distance
    carry at most `gamma` relative error each, doubled for the sums here).
    """
    q_sq = jnp.sum(jnp.square(q), axis=1)
    return dk_sq * (1.0 + 2.0 * gamma) < q_sq * (1.0 - 2.0 * gamma) + w * lower_last


def unscale_distances(sq, g, log2_scale):
    """Per-query squared distances in scaled units -> distances in the bank's units."""
    return scale_pow2(jnp.sqrt(sq), g[:, None] - log2_scale)


def exact_pass(q, g, rows, valid, ids, k, block):
    """The fallback for one query: exact squared distances by differences to every row (bank block
    by bank block), then the k smallest; `valid` masks padding. `ids` must ascend, so the stable
    top-k sends ties to the lower id."""
    n_blocks = rows.shape[0] // block
    blocks = rows.reshape(n_blocks, block, -1)
    sq = jax.lax.map(lambda b_rows: jnp.sum(jnp.square(q[None, :] - scale_pow2(b_rows, -g)), axis=1), blocks)
    neg, pos = jax.lax.top_k(-jnp.where(valid, sq.reshape(-1), jnp.inf), k)
    return -neg, ids[pos]


def fix_uncertified(ok, sq, idx, one_query):
    """Replaces the results of the queries not certified by `one_query(i) -> (sq (k,), idx (k,))`,
    one query at a time (a while loop: certified queries cost nothing)."""
    def body(state):
        ok, sq, idx = state
        i = jnp.argmin(ok)
        s, j = one_query(i)
        return ok.at[i].set(True), sq.at[i].set(s), idx.at[i].set(j)

    _, sq, idx = jax.lax.while_loop(lambda s: ~jnp.all(s[0]), body, (ok, sq, idx))
    return sq, idx


# -- host threads -------------------------------------------------------------------------------
# The visits are one `lax.while_loop` of small products, and XLA runs a loop on one CPU core. On a CPU
# device a search of many queries is therefore split into parts searched from as many host threads as
# the process has cores (XLA runs programs from different threads at once), the way faiss spreads its
# queries over OpenMP threads. Each query's result does not depend on the others, so the parts give
# the same results, bit for bit, as one call. Accelerators run one call: their loops are not bound to
# one core.
MIN_PART = 512  # queries per thread at least; smaller searches run in one call


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def in_parts(fn, parts: int, *arrays):
    """`fn(*arrays)` computed on `parts` contiguous slices of the leading axis from as many threads,
    the outputs (a pytree of arrays with that leading axis) concatenated."""
    if parts <= 1:
        return fn(*arrays)
    n = arrays[0].shape[0]
    bounds = [n * i // parts for i in range(parts + 1)]
    with concurrent.futures.ThreadPoolExecutor(parts) as pool:
        outs = list(pool.map(lambda i: jax.block_until_ready(fn(*(a[bounds[i] : bounds[i + 1]] for a in arrays))),
                             range(parts)))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
