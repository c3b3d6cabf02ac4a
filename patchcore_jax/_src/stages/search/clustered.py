"""Exact nearest-neighbour search that prunes: the bank partitioned into small balls.

The bank (centred and scaled as `neighbors.BankIndex`'s) is split by k-means into clusters, and clusters
larger than `leaf_size` are halved along their principal axis until they fit; each piece is a leaf of
at most `leaf_size` rows, padded to exactly `leaf_size` (static shapes), with its centroid `c` and a
radius `r` that bounds `||b - c||` for every row `b` in it. No row of a leaf can be nearer to a query
`q` than `max(0, ||q - c|| - r)` (the triangle inequality), so a leaf whose bound exceeds an upper
bound of the query's k-th distance is skipped, and the result is still the exact one.

The search is cluster-major, so that skipped work is really skipped on a CPU while the work done stays
matrix products: (1) every query visits the leaf whose centroid is nearest, which gives an upper bound
of its k-th distance; (2) every leaf is then visited by the queries whose lower bound for it does not
exceed that upper bound, `chunk` queries at a time, in one `lax.while_loop` over a work list of
(leaf, chunk of queries).

Each leaf stores its rows relative to its centroid (local coordinates), and a visit ranks by
`||q - c||^2 + ||b||^2 - 2 (q - c).b` with `q - c` and `b` local: the magnitudes in play are then
those of the leaf's radius and the query's distance to it, not the rows' norms, so the worst-case
float32 error of a D-term dot product, `(D + 2) eps / 2` relative, is small against the distances
that matter. Candidates are ranked by a lower bound (key minus that error), re-ranked by exact
differences, and certified against the worst case: the result is provably the exact one (indices
equal to the float64 brute force's on the stored rows, ties to the lower bank index). Lower and
upper bounds for pruning are widened by the same worst-case error, so rounding never prunes a leaf
that holds a neighbour. A query that cannot be certified (near-ties within float32's error) is
searched again by exact differences over the whole bank.

Memory: the index holds the bank once (plus `leaf_size` padding per leaf); a search holds
`(Q, leaves)` bounds and work lists. It is built once, at fit, on the host (k-means in NumPy) and is
saved with `to_arrays` / `from_arrays`. Single device: a sharded bank uses `sharding`'s brute force.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.stages import checks
from patchcore_jax._src.stages.search import brute as neighbors
from patchcore_jax._src.stages.search import common, index_checks

_HIGHEST = jax.lax.Precision.HIGHEST
_NO_ID = index_checks.NO_ID  # the id of padding slots: sorts after every real id
_LEAF_MULTIPLE = 16
# Candidates kept beyond k for the exact re-ranking: fewer than brute force needs, since keys are
# formed in a leaf's local coordinates and their error bound is small against the distances.
_RERANK_MARGIN = 3
FORMAT_VERSION = 1


@flax.struct.dataclass
class ClusteredIndex:
    """A memory bank partitioned into leaves for exact search that prunes.

    Attributes:
      rows: `(L * S, D)` leaf by leaf, each row relative to its leaf's centroid (local coordinates);
        the stored point is `centroid + row`, in `BankIndex.rows`'s units (centred, `2**log2_scale`).
      sq_norms: `(L * S,)` squared norms of `rows` (rounded up); `+inf` on padding slots.
      ids: `(L * S,)` int32 bank index of each slot; `2**31 - 1` on padding.
      slots: `(N,)` int32 slot of each bank row (the inverse of `ids`).
      centroids: `(L, D)` leaf centroids, in `BankIndex.rows`'s units.
      radii: `(L,)` upper bounds of the norms of each leaf's `rows`; -1 marks an empty leaf (the
        count of leaves is padded to a multiple of 16).
      centre, log2_scale: as `BankIndex`.
      size: N; leaf_size: S.
    """

    rows: jax.Array
    sq_norms: jax.Array
    ids: jax.Array
    slots: jax.Array
    centroids: jax.Array
    radii: jax.Array
    centre: jax.Array
    log2_scale: jax.Array
    size: int = flax.struct.field(pytree_node=False)
    leaf_size: int = flax.struct.field(pytree_node=False)

    @property
    def num_leaves(self) -> int:
        return self.centroids.shape[0]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every array and setting as NumPy arrays (0-d for scalars), for a model file."""
        out = {name: np.asarray(getattr(self, name)) for name in
               ("rows", "sq_norms", "ids", "slots", "centroids", "radii", "centre", "log2_scale")}
        out["size"] = np.asarray(self.size, np.int64)
        out["leaf_size"] = np.asarray(self.leaf_size, np.int64)
        out["format_version"] = np.asarray(FORMAT_VERSION, np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], bank: np.ndarray | None = None) -> "ClusteredIndex":
        """The inverse of `to_arrays`; ValueError naming the key that is missing or inconsistent
        (`index_checks`), and, given the `(N, D)` bank it was built on, naming any stored row that is
        not the bank's."""
        names = ("rows", "sq_norms", "ids", "slots", "centroids", "radii", "centre", "log2_scale", "size",
                 "leaf_size", "format_version")
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ValueError(f"arrays: missing {missing} for a ClusteredIndex")
        version = index_checks.scalar_int(arrays, "format_version", 0, 2**31)
        if version > FORMAT_VERSION:
            raise ValueError(f"arrays: format_version {version} is newer than this library reads ({FORMAT_VERSION})")
        size = index_checks.scalar_int(arrays, "size", 1, 2**31 - 2)
        leaf = index_checks.scalar_int(arrays, "leaf_size", 1, 2**20)
        rows = np.asarray(arrays["rows"])
        centroids = np.asarray(arrays["centroids"])
        if rows.ndim != 2 or centroids.ndim != 2:
            raise ValueError(f"arrays['rows'], arrays['centroids']: expected 2-D, got shapes {rows.shape}, {centroids.shape}")
        leaves = centroids.shape[0]
        expect = {"rows": (leaves * leaf, rows.shape[1]), "sq_norms": (leaves * leaf,), "ids": (leaves * leaf,),
                  "slots": (size,), "centroids": (leaves, rows.shape[1]), "radii": (leaves,),
                  "centre": (rows.shape[1],), "log2_scale": ()}
        for name, shape in expect.items():
            if np.asarray(arrays[name]).shape != shape:
                raise ValueError(f"arrays[{name!r}]: expected shape {shape}, got {np.asarray(arrays[name]).shape}")
        index_checks.check_clustered_arrays(arrays, bank)
        return cls(**{n: jax.device_put(np.asarray(arrays[n])) for n in names[:8]}, size=size, leaf_size=leaf)

    # The index protocol (`search.common`): what `search.index` and `scoring` call on any index.
    def search_traced(self, queries, *, k, query_block=None):
        return _search(self, queries, k=k, chunk=_CHUNK)

    def bank_rows(self, idx):
        slot = self.slots[idx]
        point = self.centroids[slot // self.leaf_size] + self.rows[slot]
        return common.scale_pow2(point, -self.log2_scale) + self.centre

    def distances_to(self, centred_queries, idx):
        q, g = common.scaled_queries(centred_queries, self.log2_scale)
        slot = self.slots[idx]
        sq = _local_sq(q, g, self.centroids[slot // self.leaf_size], self.rows[slot])
        return common.unscale_distances(sq, g, self.log2_scale)

    def host_parts(self, queries) -> int:
        """How many host threads share a search of `queries` `(Q, D)` (1: one call, as inside a trace,
        off a CPU, or for fewer than 2 x 512 queries); see `search.common.in_parts`."""
        if any(isinstance(a, jax.core.Tracer) for a in (self.rows, queries)):
            return 1
        if any(d.platform != "cpu" for d in self.rows.devices()):
            return 1
        return max(1, min(common.cpu_cores(), queries.shape[0] // common.MIN_PART))


# -- building -------------------------------------------------------------------------------------
def _kmeans(x: np.ndarray, num: int, *, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means on the host; returns the cluster of each row (empty clusters are dropped)."""
    centres = x[rng.choice(len(x), num, replace=False)].astype(np.float32)
    x_sq = np.einsum("ij,ij->i", x, x)
    assign = np.zeros(len(x), np.int64)
    for _ in range(iterations):
        c_sq = np.einsum("ij,ij->i", centres, centres)
        for s in range(0, len(x), 8192):  # bounded memory: 8192 x clusters distances at a time
            d2 = x_sq[s : s + 8192, None] - 2.0 * x[s : s + 8192] @ centres.T + c_sq
            assign[s : s + 8192] = np.argmin(d2, axis=1)
        order = np.argsort(assign, kind="stable")
        used, starts, counts = np.unique(assign[order], return_index=True, return_counts=True)
        centres[used] = (np.add.reduceat(x[order].astype(np.float64), starts, axis=0) / counts[:, None]).astype(np.float32)
    return assign


def _split(members: np.ndarray, x: np.ndarray, leaf_size: int, out: list) -> None:
    """Halves `members` along their principal axis (power iteration) until each piece fits a leaf."""
    if len(members) <= leaf_size:
        out.append(members)
        return
    pts = x[members].astype(np.float64)
    pts -= pts.mean(axis=0)
    v = np.random.default_rng(len(members)).normal(size=pts.shape[1])
    for _ in range(8):
        v = pts.T @ (pts @ v)
        v /= max(np.linalg.norm(v), 1e-300)
    order = members[np.argsort(pts @ v, kind="stable")]
    half = len(order) // 2
    _split(order[:half], x, leaf_size, out)
    _split(order[half:], x, leaf_size, out)


def build_clustered_index(bank, *, leaf_size: int = 128, iterations: int = 10, seed: int = 0) -> ClusteredIndex:
    """Partitions `bank` `(N, D)` into leaves of at most `leaf_size` rows for `search` (built once, at
    fit; the k-means runs on the host, seeded by `seed`, so the index is reproducible)."""
    n, d = checks.check_array("bank", bank, ndim=2)
    leaf_size = checks.check_int("leaf_size", leaf_size, low=1)
    iterations = checks.check_int("iterations", iterations, low=0)
    base = neighbors.build_index(bank, block=n)  # the same centring and scaling as brute force
    x = np.asarray(jax.device_get(base.rows))[:n]  # explicitly to the host: the k-means runs there
    rng = np.random.default_rng(seed)
    num = max(1, min(n, round(n / leaf_size)))
    assign = _kmeans(x, num, iterations=iterations, rng=rng) if num > 1 else np.zeros(n, np.int64)
    leaves: list[np.ndarray] = []
    for c in np.unique(assign):
        _split(np.flatnonzero(assign == c), x, leaf_size, leaves)
    # DECISION: leaves in order of their lowest bank index, rows in bank order within a leaf; the
    # layout is then a pure function of the bank and the seed.
    leaves = [np.sort(m) for m in leaves]
    leaves.sort(key=lambda m: m[0])
    # Empty leaves pad the count to a multiple of 16, so that rebuilt indexes of similar banks share
    # compiled searches; an empty leaf has radius -1 and is never visited.
    num_leaves = -(-len(leaves) // _LEAF_MULTIPLE) * _LEAF_MULTIPLE
    ids = np.full(num_leaves * leaf_size, _NO_ID, np.int64)
    for j, m in enumerate(leaves):
        ids[j * leaf_size : j * leaf_size + len(m)] = m
    real = ids != _NO_ID
    slots = np.empty(n, np.int64)
    slots[ids[real]] = np.flatnonzero(real)
    centroids = np.zeros((num_leaves, d), x.dtype)
    centroids[: len(leaves)] = np.stack([x[m].astype(np.float64).mean(axis=0) for m in leaves])
    # Local coordinates, rounded once in the stored dtype (the stored point is centroid + local row);
    # norms and radii of the stored local rows in float64, rounded up: true bounds.
    rows = np.zeros((num_leaves * leaf_size, d), x.dtype)
    leaf_of = np.repeat(np.arange(num_leaves), leaf_size)
    rows[real] = x[ids[real]] - centroids[leaf_of[real]]
    sq64 = np.einsum("ij,ij->i", rows.astype(np.float64), rows.astype(np.float64))
    up = np.asarray(np.inf, x.dtype)
    radii = np.nextafter(np.sqrt(np.where(real, sq64, 0.0).reshape(num_leaves, leaf_size).max(axis=1)).astype(x.dtype), up)
    radii[len(leaves):] = -1.0
    sq = np.where(real, np.nextafter(sq64.astype(x.dtype), up), np.inf).astype(x.dtype)
    put = jax.device_put  # every array to the device explicitly, once
    return ClusteredIndex(rows=put(rows), sq_norms=put(sq), ids=put(ids.astype(np.int32)),
                          slots=put(slots.astype(np.int32)), centroids=put(centroids),
                          radii=put(radii), centre=base.centre, log2_scale=base.log2_scale.astype(jnp.int32),
                          size=n, leaf_size=leaf_size)


# -- searching ------------------------------------------------------------------------------------
# Queries per visit: one (chunk x D) @ (D x leaf_size) product. DECISION: leaves of 128 rows visited
# 64 queries at a time. On real PatchCore banks (19.6k x 1024) leaves of 64 read fewer rows (4.7% of
# the bank against 7.3%) but the smaller products run at half the rate on a CPU core: 0.40 s against
# 0.57 s for 6272 queries (`bench/bench_neighbors.py`).
_CHUNK = 64


def _local_sq(q, g, centroids, local_rows):
    """Exact squared distances (per-query units) by differences: `(qb, D)` queries against stored
    points `centroid + local row` given as `(qb, c, D)` each."""
    return jnp.sum(jnp.square((q[:, None, :] - common.scale_pow2(centroids, -g[:, None, None]))
                              - common.scale_pow2(local_rows, -g[:, None, None])), axis=-1)


def _visit(need, q_pad, w_pad, index, keys, slots, *, chunk):
    """Visits every leaf `l` with the queries `q` where `need[q, l]`, `chunk` queries at a time,
    merging each visit's lower-bound keys into the running candidates `keys`, `slots`
    (`(Q + 1, kc)`; row Q is a scratch row for the unused places of a chunk)."""
    num_q, num_leaves = need.shape
    leaf_size, dim = index.leaf_size, index.rows.shape[1]
    rows3 = index.rows.reshape(num_leaves, leaf_size, dim)
    norms2 = index.sq_norms.reshape(num_leaves, leaf_size)
    kc = keys.shape[1]
    gamma = common.gamma(dim, index.rows.dtype)
    # Work lists: lists[l] holds the queries that need leaf l, first counts[l] places, then Q.
    pos = jnp.cumsum(need, axis=0, dtype=jnp.int32) - 1
    pos = jnp.where(need, pos, num_q + chunk)  # out of range: dropped
    lists = jnp.full((num_leaves, num_q + chunk), num_q, jnp.int32)
    lists = lists.at[jnp.broadcast_to(jnp.arange(num_leaves)[None, :], need.shape), pos].set(
        jnp.broadcast_to(jnp.arange(num_q, dtype=jnp.int32)[:, None], need.shape), mode="drop")
    counts = jnp.sum(need, axis=0, dtype=jnp.int32)
    chunks = (counts + chunk - 1) // chunk
    ends = jnp.cumsum(chunks)

    def body(state):
        t, keys, slots = state
        leaf = jnp.sum(ends <= t, dtype=jnp.int32)  # the chunk's leaf: one vector compare, no search loop
        start = (t - (ends[leaf] - chunks[leaf])) * chunk
        qi = jax.lax.dynamic_slice_in_dim(lists[leaf], start, chunk)
        w = w_pad[qi]
        u = q_pad[qi] - w[:, None] * index.centroids[leaf]  # the query in the leaf's coordinates
        u_sq = jnp.sum(jnp.square(u), axis=1)
        dots = jnp.dot(u, rows3[leaf].T, precision=_HIGHEST)
        new = u_sq[:, None] + jnp.square(w)[:, None] * norms2[leaf][None, :] - 2.0 * w[:, None] * dots
        # Rank by a lower bound: the key less its worst-case error (every magnitude is local).
        err = 3.0 * gamma * jnp.square(jnp.sqrt(u_sq) + w * index.radii[leaf])
        new = new - err[:, None]
        new_slots = jnp.broadcast_to(leaf * leaf_size + jnp.arange(leaf_size, dtype=jnp.int32), new.shape)
        k, s = common.merge_topk(keys[qi], slots[qi], new, new_slots, kc)
        return t + 1, keys.at[qi].set(k), slots.at[qi].set(s)

    _, keys, slots = jax.lax.while_loop(lambda s: s[0] < ends[-1], body, (jnp.int32(0), keys, slots))
    return keys, slots


def _candidates_exact(index, q, g, slots):
    """Exact squared distances of candidate slots `(Q, c)` (inf on padding / unfilled) and their ids."""
    safe = jnp.maximum(slots, 0)
    pad = (slots < 0) | jnp.isinf(index.sq_norms[safe])
    sq = _local_sq(q, g, index.centroids[safe // index.leaf_size], index.rows[safe])
    return jnp.where(pad, jnp.inf, sq), jnp.where(pad, _NO_ID, index.ids[safe])


def _exact_one(index, qi, gi, k):
    """One query against every slot by exact differences; k smallest by (distance, bank index)."""
    num_leaves, leaf_size = index.num_leaves, index.leaf_size
    rows3 = index.rows.reshape(num_leaves, leaf_size, -1)
    diff = (qi - common.scale_pow2(index.centroids, -gi))[:, None, :] - common.scale_pow2(rows3, -gi)
    sq = jnp.where(jnp.isinf(index.sq_norms), jnp.inf, jnp.sum(jnp.square(diff), axis=-1).reshape(-1))
    sq, ids = jax.lax.sort((sq, index.ids), num_keys=2)
    return sq[:k], ids[:k]


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _search(index: ClusteredIndex, queries, *, k, chunk=_CHUNK):
    return _search_impl(index, queries, k=k, chunk=chunk)[:2]


def _search_impl(index: ClusteredIndex, queries, *, k, chunk):
    """-> (distances (Q, k), bank indices (Q, k), leaves visited per query (Q,))."""
    dtype = index.rows.dtype
    q, g = common.scaled_queries(queries.astype(dtype) - index.centre, index.log2_scale)
    w = common.rank_weight(g, dtype)
    num_q, dim = q.shape
    kc = min(k + _RERANK_MARGIN, index.size)
    num_leaves = index.num_leaves
    gamma = common.gamma(dim, dtype)
    max_radius = jnp.max(index.radii)

    # Lower bounds per (query, leaf): ||q - c|| by the norm expansion (global coordinates), less its
    # worst-case error, less the radius.
    c_norms = jnp.sum(jnp.square(index.centroids), axis=1)
    q_sq = jnp.sum(jnp.square(q), axis=1)
    c_err = 3.0 * gamma * jnp.square(jnp.sqrt(q_sq) + w * jnp.sqrt(jnp.max(c_norms)))
    c_sq = q_sq[:, None] + w[:, None] * common.rank_keys(q, w, index.centroids, c_norms)
    lower = jnp.maximum(jnp.sqrt(jnp.maximum(c_sq - c_err[:, None], 0.0)) - w[:, None] * index.radii, 0.0)
    real_leaf = index.radii >= 0  # empty (padding) leaves are never visited
    lower = jnp.where(real_leaf[None, :], lower, jnp.inf)
    c_sq = jnp.where(real_leaf[None, :], c_sq, jnp.inf)

    q_pad = jnp.concatenate([q, jnp.zeros((1, dim), dtype)])
    w_pad = jnp.concatenate([w, jnp.ones((1,), dtype)])
    keys = jnp.full((num_q + 1, kc), jnp.inf, dtype)
    slots = jnp.full((num_q + 1, kc), -1, jnp.int32)
    first_leaf = jnp.argmin(c_sq, axis=1)
    first = jax.nn.one_hot(first_leaf, num_leaves, dtype=jnp.bool_)
    keys, slots = _visit(first, q_pad, w_pad, index, keys, slots, chunk=chunk)
    # An upper bound of each query's k-th squared distance from the first visit's keys: a key is its
    # value less its worst-case error `3 gamma (||u|| + w r)^2` (`u` the query less the leaf's
    # centroid), so the exact value lies below the key plus twice that error. `||u||^2` is bounded by
    # the centroid's key plus its own error. No exact pass is needed for the bound, and its validity
    # is not assumed: the certificate below checks the pruned leaves too.
    u_first = jnp.sqrt(jnp.maximum(jnp.take_along_axis(c_sq, first_leaf[:, None], 1)[:, 0] + c_err, 0.0))
    slack = 6.0 * gamma * jnp.square(u_first + w * index.radii[first_leaf])
    bound = keys[:num_q, k - 1] + slack
    # Widened by the certificate's own margin, so that a pruned leaf passes the certificate below.
    upper_sq = (bound + 8.0 * gamma * jnp.square(jnp.sqrt(bound) + w * max_radius)) * (1.0 + 4.0 * gamma)
    lower_sq = jnp.square(lower)
    need = (lower_sq <= upper_sq[:, None]) & ~first
    keys, slots = _visit(need, q_pad, w_pad, index, keys, slots, chunk=chunk)
    keys, slots = keys[:num_q], slots[:num_q]

    sq, ids = _candidates_exact(index, q, g, slots)
    # DECISION: the final order is by exact distance, ties to the lower bank index.
    sq, ids = jax.lax.sort((sq, ids), dimension=1, num_keys=2)
    sq, ids = sq[:, :k], ids[:, :k]
    # Certificate: every visited row outside the candidates has a key lower bound >= keys[:, -1];
    # every row of a leaf not visited lies at least that leaf's lower bound away. The k-th distance
    # must sit below both, with room for its own rounding, which is bounded by the radius of the leaf
    # that holds it (its local row and the query's offset from that leaf's centroid are what it sums).
    dk = jnp.sqrt(sq[:, k - 1])
    kth_leaf = index.slots[jnp.clip(ids[:, k - 1], 0, index.size - 1)] // index.leaf_size
    bar = sq[:, k - 1] + 8.0 * gamma * jnp.square(dk + w * index.radii[kth_leaf])
    pruned = jnp.min(jnp.where(need | first, jnp.inf, lower_sq), axis=1)
    ok = (bar < keys[:, -1]) & (bar < pruned)

    # Uncertified queries (rare: near-ties within float32's error) are searched by exact differences.
    sq, ids = common.fix_uncertified(ok, sq, ids, lambda i: _exact_one(index, q[i], g[i], k))
    ids = jnp.where(ids == _NO_ID, -1, ids)
    return common.unscale_distances(sq, g, index.log2_scale), ids, jnp.sum(need | first, axis=1)



def visited_fraction(index: ClusteredIndex, queries, k: int = 1) -> float:
    """The rows a search of `queries` reads per query (padding slots of the visited leaves included),
    as a fraction of the bank's rows: the work relative to brute force. A diagnostic for benchmarks,
    computed by the search itself."""
    return float(_visited(index, jnp.asarray(queries), k=k))


@functools.partial(jax.jit, static_argnames=("k",))
def _visited(index, queries, *, k):
    return jnp.mean(_search_impl(index, queries, k=k, chunk=_CHUNK)[2]) * index.leaf_size / index.size
