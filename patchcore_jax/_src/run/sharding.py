"""PatchCore across devices and hosts with JAX's own distribution (`jax.sharding`, `shard_map`).

The memory bank, its projection and the coreset's min-distance vector are sharded by rows over a 1-D
mesh (axis "rows"); nothing gathers the bank onto one device.
- greedy_coreset: each device updates its shard; per iteration one small collective (an all-gather of
  each shard's best value and global index, and a sum that broadcasts the chosen row) finds the global
  argmax, ties to the lowest global index, exactly as on one device.
- nearest neighbours / image scores: a local top-k per shard (exact distances), then a merge of the
  `devices x k` candidates by (distance, global index).
- feature extraction and aggregation: data-parallel over the batch.
Works the same on one host with several devices and on several hosts joined by `jax.distributed`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from patchcore_jax._src.stages import coreset as coreset_lib
from patchcore_jax._src.stages.search import brute as neighbors
from patchcore_jax._src.stages.search import common as search_common
from patchcore_jax._src.stages import scoring
from patchcore_jax._src.stages import checks as _checks

AXIS = "rows"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (AXIS,))


def row_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def _padded_rows(n: int, mesh: Mesh, multiple: int = 1) -> int:
    unit = mesh.size * multiple
    return -(-n // unit) * unit


def shard_rows(array, mesh: Mesh, *, pad_to: int | None = None) -> jax.Array:
    """Places a host array (or a jax.Array) row-sharded on `mesh`, zero-padding rows to `pad_to`."""
    if isinstance(array, jax.Array) and pad_to in (None, array.shape[0]) and array.sharding == row_sharding(mesh):
        return array
    rows = array.shape[0]
    pad_to = pad_to or _padded_rows(rows, mesh)
    host = np.asarray(array)
    if pad_to != rows:
        host = np.concatenate([host, np.zeros((pad_to - rows,) + host.shape[1:], host.dtype)])
    return jax.make_array_from_callback(host.shape, row_sharding(mesh), lambda idx: host[idx])


# -- coreset ------------------------------------------------------------------------------------------
def _farthest_over_shards(min_l, stored_l):
    """`coreset.select_step`'s `farthest` on a shard: the global farthest row, found collectively.

    Shards are ordered by rows, so the first maximum over shards, then within the shard, is the lowest
    global index among ties (as on one device). The chosen row reaches every shard by a sum.
    """
    i_loc = jnp.argmax(min_l)
    values = jax.lax.all_gather(min_l[i_loc], AXIS)
    owner = jnp.argmax(values)
    offset = jax.lax.axis_index(AXIS) * min_l.shape[0]
    chosen = jax.lax.all_gather(i_loc + offset, AXIS)[owner]
    mine = jax.lax.axis_index(AXIS) == owner
    row = jax.lax.psum(jnp.where(mine, stored_l[i_loc].astype(coreset_lib.accumulation_dtype(stored_l.dtype)), 0.0), AXIS)
    return i_loc, chosen, row, mine


def _sharded_steps(stored, norms, min_dist, *, num_samples, mesh):
    """The whole greedy loop under shard_map: every device holds `rows / devices` rows and runs the
    single-device step (`coreset.select_step`) on them, with a collective choice of the row."""
    has_norms = norms is not None

    def body(stored_l, norms_l, min_l):
        step = functools.partial(coreset_lib.select_step, stored=stored_l, norms=norms_l,
                                 farthest=_farthest_over_shards)
        selected = jnp.zeros((num_samples,), jnp.int32)
        _, selected = jax.lax.fori_loop(0, num_samples, step, (min_l, selected))
        return selected

    specs = (P(AXIS), P(AXIS) if has_norms else None, P(AXIS))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(stored, norms, min_dist)


@functools.partial(jax.jit, static_argnames=("num_samples", "mesh", "n_real", "store_dtype"))
def _sharded_coreset(bank, projection, starts, *, num_samples, mesh, n_real, store_dtype):
    psi, norms, min_dist = coreset_lib.prepare(bank, projection, starts, store_dtype=store_dtype, n_real=n_real)
    stored = bank if psi is None else jax.lax.with_sharding_constraint(psi, row_sharding(mesh))
    return _sharded_steps(stored, norms, min_dist, num_samples=num_samples, mesh=mesh)


def greedy_coreset(bank, num_samples: int, *, projection=None, start_indices=(0,), mesh: Mesh | None = None,
                   store_dtype=None) -> jax.Array:
    """`coreset.greedy_coreset` on a row-sharded bank; same indices as on one device.

    `bank` may be a host array (it is sharded here) or a jax.Array already row-sharded on `mesh`
    (used as it is when its rows divide evenly, never gathered).
    """
    mesh = mesh or make_mesh()
    n, num_samples, starts = _checks.check_coreset_args(bank, num_samples, projection, start_indices)
    dtype = bank.dtype if np.dtype(bank.dtype).kind == "f" else np.float32
    sharded = shard_rows(bank if np.dtype(bank.dtype) == dtype else np.asarray(bank, dtype), mesh)
    proj = None if projection is None else jnp.asarray(projection, dtype)
    store = jnp.dtype(dtype if store_dtype is None or projection is None else store_dtype)
    if num_samples == 0:
        return jnp.zeros((0,), jnp.int32)
    return _sharded_coreset(sharded, proj, jnp.asarray(starts), num_samples=num_samples, mesh=mesh, n_real=n,
                            store_dtype=store)


# -- search -------------------------------------------------------------------------------------------
def build_index(bank, mesh: Mesh | None = None, *, block: int = 2048) -> neighbors.BankIndex:
    """A `BankIndex` whose rows and norms are sharded by rows over `mesh`."""
    mesh = mesh or make_mesh()
    n, _ = _checks.check_array("bank", bank, ndim=2)
    block = max(1, min(block, -(-n // mesh.size)))
    n_pad = _padded_rows(n, mesh, block)
    sharded = shard_rows(np.asarray(bank) if not isinstance(bank, jax.Array) else bank, mesh, pad_to=n_pad)
    return _build_sharded(sharded, mesh=mesh, n_real=n, block=block)


@functools.partial(jax.jit, static_argnames=("mesh", "n_real", "block"))
def _build_sharded(bank, *, mesh, n_real, block):
    index = neighbors.prepare_index(bank, block=block, n_real=n_real)
    return index.replace(rows=jax.lax.with_sharding_constraint(index.rows, row_sharding(mesh)))


def _sharded_search(index: neighbors.BankIndex, queries, k, *, mesh, query_block=search_common.QUERY_BLOCK):
    """Exact k nearest rows: a local search per shard, then a merge by (distance, global index)."""
    q = queries.shape[0]
    blocks = neighbors.query_blocks(index, queries, min(query_block, q))
    q_pad = blocks.shape[0] * blocks.shape[1]
    local_len = index.rows.shape[0] // mesh.size
    k_local = min(k, local_len)

    def local(rows_l, norms_l, blocks):
        offset = jax.lax.axis_index(AXIS) * rows_l.shape[0]
        local_index = neighbors.BankIndex(rows=rows_l, sq_norms=norms_l, centre=index.centre, size=rows_l.shape[0],
                                          block=index.block, log2_scale=index.log2_scale)
        dist, idx = jax.lax.map(lambda b: neighbors.search_block(b, local_index, k_local), blocks)
        dist, idx = dist.reshape(q_pad, k_local), idx.reshape(q_pad, k_local) + offset
        all_d = jax.lax.all_gather(dist, AXIS, axis=1, tiled=True)  # (q_pad, devices * k_local)
        all_i = jax.lax.all_gather(idx, AXIS, axis=1, tiled=True)
        all_d, all_i = jax.lax.sort((all_d, all_i), dimension=1, num_keys=2)
        return all_d[:, :k], all_i[:, :k]

    dist, idx = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()), out_specs=(P(), P()),
                              check_vma=False)(index.rows, index.sq_norms, blocks)
    return dist[:q], idx[:q]


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def _search_jit(index, queries, *, k, mesh):
    return _sharded_search(index, queries, k, mesh=mesh)


def nearest_neighbors(bank, queries, k: int = 1, *, mesh: Mesh | None = None):
    """`neighbors.nearest_neighbors` over a row-sharded bank (or a sharded `BankIndex`)."""
    mesh = mesh or make_mesh()
    index = bank if isinstance(bank, neighbors.BankIndex) else build_index(bank, mesh)
    _checks.check_width("queries", queries, "Q", index.rows.shape[1], "the bank")
    k = _checks.check_int("k", k, low=1, high=index.size)
    return _search_jit(index, _host_or_device(queries), k=k, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("num_neighbors", "mesh", "num_nn"))
def _scores_jit(index, patch_features, *, num_neighbors, mesh, num_nn=1):
    search = functools.partial(_sharded_search, mesh=mesh)
    return scoring.scores_from_search(index, patch_features, search, num_neighbors=num_neighbors, num_nn=num_nn)


def image_scores(index_or_bank, patch_features, *, num_neighbors: int = 9, mesh: Mesh | None = None,
                 anomaly_scorer_num_nn: int = 1):
    """`scoring.image_scores` over a row-sharded bank; same values as on one device."""
    mesh = mesh or make_mesh()
    index = index_or_bank if isinstance(index_or_bank, neighbors.BankIndex) else build_index(index_or_bank, mesh)
    _checks.check_width("patch_features", patch_features, "B, P", index.rows.shape[1], "the bank")
    num_neighbors = _checks.check_int("num_neighbors", num_neighbors, low=1, high=index.size)
    num_nn = _checks.check_int("anomaly_scorer_num_nn", anomaly_scorer_num_nn, low=1, high=index.size)
    return _scores_jit(index, _host_or_device(patch_features), num_neighbors=num_neighbors, mesh=mesh, num_nn=num_nn)


def _host_or_device(x):
    """jax.Arrays pass as they are; anything else stays a host array, which jit replicates over the
    mesh (a single-device array would not be usable across processes)."""
    return x if isinstance(x, jax.Array) else np.asarray(x)


# -- data parallel embedding -------------------------------------------------------------------------
def replicate(tree, mesh: Mesh):
    """Places every array of `tree` (e.g. the backbone's state) on all devices of `mesh`, once."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def embed_data_parallel(embed_fn, state, images: np.ndarray, mesh: Mesh):
    """Runs the jitted `embed_fn(state, images)` with the batch split over `mesh` (padded to a
    multiple of the device count); `state` should already be `replicate`d."""
    b = images.shape[0]
    x = shard_rows(images, mesh, pad_to=_padded_rows(b, mesh))
    return embed_fn(state, x)[:b]
