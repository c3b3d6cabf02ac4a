"""Greedy coreset subsampling (paper Algorithm 1) as one compiled loop.

The min-distance vector lives on the device for the whole loop (`lax.fori_loop`). The dense loop makes
one pass over the projected bank per step (`||a||^2 - 2 a.b + ||b||^2`, clamped at 0 before the square
root, squared norms computed once); the lazy loop (the default) refreshes only the blocks of rows that
can hold the next maximum, which selects the same rows while reading a few blocks per step. Nothing
`N x N` is built and the `N x D` bank is never copied: float32 cancellation is tamed by centring the
`N x P` projected bank (centring commutes with the linear map); without a projection, differences are
formed inside a fused reduction and need no centring.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.stages import checks as _checks

_HIGHEST = jax.lax.Precision.HIGHEST


def coreset_size(num_rows: int, fraction: float) -> int:
    """The one rule for the coreset's size: `max(1, int(N * fraction))` rows of `N`; a fraction of
    1 (or more) keeps every row. The model, the streaming builder and the diagnostics all use it."""
    return int(num_rows) if fraction >= 1 else max(1, int(num_rows * fraction))


def start_points(seed: int, num_rows: int, num_starts: int) -> tuple[int, ...]:
    """The one rule for the coreset's random start points: `num_starts` distinct rows of `N` (all of
    them if fewer), drawn by `np.random.default_rng(seed).choice` without replacement.

    DECISION: drawn on the host from the config's seed, so every backend and the reference start
    from the same rows."""
    rng = np.random.default_rng(seed)
    return tuple(int(i) for i in rng.choice(num_rows, size=min(num_starts, num_rows), replace=False))


def random_subset(seed: int, num_rows: int, num_samples: int) -> np.ndarray:
    """The published RandomSampler baseline: `num_samples` distinct rows of `N`, drawn uniformly
    without replacement by `np.random.default_rng(seed).choice`, returned sorted `(num_samples,)`.

    DECISION: seeded from the config's seed (the published code draws from NumPy's global state)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(int(num_rows), size=min(int(num_samples), int(num_rows)), replace=False))


def random_projection(key_or_seed, in_dim: int, out_dim: int, *, dtype=jnp.float32) -> jax.Array:
    """`(in_dim, out_dim)` projection psi, uniform in `+-1/sqrt(in_dim)` like a bias-free
    `torch.nn.Linear` (the published sampler's). The caller owns the key."""
    in_dim = _checks.check_int("in_dim", in_dim, low=1)
    out_dim = _checks.check_int("out_dim", out_dim, low=1)
    if isinstance(key_or_seed, (int, np.integer)):
        seed = int(key_or_seed)
        # Explicitly to the device (the same key as jax.random.key(seed)); nothing moves implicitly.
        key_or_seed = jax.random.key(jax.device_put(np.uint32(seed)) if 0 <= seed < 2**32 else seed)
    return _uniform_projection(key_or_seed, in_dim=in_dim, out_dim=out_dim, dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("in_dim", "out_dim", "dtype"))
def _uniform_projection(key, *, in_dim, out_dim, dtype):
    bound = 1.0 / np.sqrt(in_dim)
    return jax.random.uniform(key, (in_dim, out_dim), dtype, -bound, bound)


def accumulation_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def sq_dist_to_row(stored, norms, row):
    """Squared distances of every stored row to `row` (a stored row, in the accumulation dtype).

    With a projection, `stored` is the centred `N x P` projected bank: one matrix-vector product with
    the cached norms (the memory-bound minimum). Without one, `stored` is the caller's `N x D` bank,
    never copied, and the difference `x_m - x_i` is formed inside the fused reduction: exact, so no
    centring is needed (`norms` is None there).
    """
    acc = accumulation_dtype(stored.dtype)
    if norms is None:
        return jnp.sum(jnp.square(stored.astype(acc) - row), axis=-1)
    dots = jnp.dot(stored, row.astype(stored.dtype), precision=_HIGHEST, preferred_element_type=acc)
    # DECISION: (||a||^2 + ||b||^2) - 2 a.b, added in that order: the same rounding from either end, so
    # d(a, b) == d(b, a) exactly and exact ties (two start points' mean distances) stay ties.
    return (norms + jnp.sum(jnp.square(row))) - 2.0 * dots


def sq_dist_to(stored, norms, row_index):
    """Squared distances of every stored row to row `row_index`."""
    sq = sq_dist_to_row(stored, norms, stored[row_index].astype(accumulation_dtype(stored.dtype)))
    # DECISION: a row's distance to itself is exactly 0. The norm expansion leaves rounding there, and
    # its square root (~1e-8 in float64) would break the exact tie between two start points' mean
    # distances (each is 0 to itself) the wrong way.
    return sq.at[row_index].set(0.0)


def prepare(bank, projection, starts, *, store_dtype, n_real=None):
    """Projected, centred bank (or None), its squared norms (or None), and the start distances.

    Rows from `n_real` on are padding (a bank sharded in whole blocks, `sharding.greedy_coreset`): they
    are left out of the mean and carry a min-distance of -inf. One device runs this under `_prepare`,
    a mesh inside its own jitted loop: the same preparation in both.
    """
    acc = accumulation_dtype(bank.dtype)
    padded = n_real is not None and n_real < bank.shape[0]
    real = jnp.arange(bank.shape[0]) < n_real if padded else None
    if projection is None:
        psi, norms, stored = None, None, bank
    else:
        if padded:
            mean = jnp.sum(jnp.where(real[:, None], bank, 0.0), axis=0, dtype=acc) / n_real
        else:
            mean = jnp.mean(bank, axis=0, dtype=acc)
        # Centring after the (linear) projection: the N x D bank is never copied.
        psi = jnp.dot(bank, projection, precision=_HIGHEST) - jnp.dot(mean, projection, precision=_HIGHEST)
        psi = psi.astype(store_dtype)
        norms = jnp.sum(jnp.square(psi.astype(acc)), axis=1)
        stored = psi
    sq = jax.vmap(lambda s: sq_dist_to(stored, norms, s))(starts)  # (S, N)
    # DECISION: as the published sampler, start from the mean distance to the start points.
    min_dist = jnp.mean(jnp.sqrt(jnp.maximum(sq, 0.0)), axis=0)
    if padded:
        # DECISION: padding rows carry -inf, so they are never selected.
        min_dist = jnp.where(real, min_dist, -jnp.inf)
    return psi, norms, min_dist


_prepare = jax.jit(prepare, static_argnames=("store_dtype", "n_real"))


def farthest(min_dist, stored):
    """On one device: the row with the largest min-distance, as `select_step` wants it."""
    i = jnp.argmax(min_dist)
    return i, i, stored[i].astype(accumulation_dtype(stored.dtype)), True


def select_step(t, state, stored, norms, farthest=farthest):
    """Algorithm 1's loop body: take the farthest row, then fold its distances into the minimum.

    `farthest(min_dist, stored) -> (local index, global index, row, held here)` finds the row; a mesh
    passes one that agrees across shards (`sharding.greedy_coreset`), and the rest is this function.
    """
    min_dist, selected = state
    # DECISION: argmax takes the lowest index among ties; chosen rows carry -1 so they are never
    # taken again (the argmax runs over M - M_C) and indices stay distinct on repeated rows.
    local, chosen, row, held_here = farthest(min_dist, stored)
    sq = sq_dist_to_row(stored, norms, row)
    # DECISION: clamp before the square root; cancellation can leave tiny negatives.
    min_dist = jnp.minimum(min_dist, jnp.sqrt(jnp.maximum(sq, 0.0)))
    min_dist = min_dist.at[local].set(jnp.where(held_here, -1.0, min_dist[local]))
    return min_dist, selected.at[t].set(chosen.astype(selected.dtype))


@functools.partial(jax.jit, static_argnames=("num_steps",), donate_argnums=(0, 1))
def run_steps(min_dist, selected, first, stored, norms, *, num_steps):
    body = functools.partial(select_step, stored=stored, norms=norms)
    return jax.lax.fori_loop(first, first + num_steps, body, (min_dist, selected))


def _to_device(host: np.ndarray) -> jax.Array:
    """An explicit host-to-device transfer of a small host value (start rows, a step count), so the
    loop passes no host data to a compiled function implicitly (`jax.transfer_guard` allows it)."""
    return jax.device_put(host)


# -- the lazy blocked loop ------------------------------------------------------------------------
# Min-distances only ever decrease, so a stale value is an upper bound. The rows are kept in blocks;
# each block remembers its largest (stale) min-distance and how many of the selected centres it has
# absorbed. A step refreshes only the block holding the largest bound, absorbing its pending centres in
# small matrix products, until the block with the largest bound is up to date: its maximum is then the
# true global maximum (every other block's true maximum is at most its bound). Ties still go to the
# lowest index: among equal bounds the lowest block is examined first. Each step thus reads one or a
# few blocks instead of the whole projected bank.

LAZY_CHUNK = 32  # centres absorbed per matrix product


@functools.partial(jax.jit, static_argnames=("num_samples", "block"))
def lazy_prepare(psi, norms, min_dist, *, num_samples, block):
    """Blocks `(n_blocks, block, P)` of the projected bank, their norms, and the loop state."""
    n, p = psi.shape
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    rows = jnp.pad(psi, ((0, pad), (0, 0))).reshape(n_blocks, block, p)
    row_norms = jnp.pad(norms, (0, pad)).reshape(n_blocks, block)
    # DECISION: padding rows carry -inf, so they are never selected.
    dist = jnp.pad(min_dist, (0, pad), constant_values=-jnp.inf).reshape(n_blocks, block)
    return rows, row_norms, lazy_state(dist, num_samples, p, psi.dtype, norms.dtype)


def lazy_state(dist, num_samples, p, dtype, norm_dtype):
    """The lazy loop's state for min-distances `dist` `(n_blocks, block)` (padding at -inf)."""
    return {
        "dist": dist,
        "bound": jnp.max(dist, axis=1),
        "absorbed": jnp.zeros((dist.shape[0],), jnp.int32),
        "selected": jnp.zeros((num_samples,), jnp.int32),
        "centres": jnp.zeros((num_samples + LAZY_CHUNK, p), dtype),
        "centre_norms": jnp.zeros((num_samples + LAZY_CHUNK,), norm_dtype),
    }


def absorb_pending(state, b, t, rows, row_norms):
    """Brings block `b` up to date with the centres selected at steps `absorbed[b] .. t - 1`."""
    block_rows, block_norms, acc = rows[b], row_norms[b], row_norms.dtype
    first = state["absorbed"][b]

    def chunk_body(c, dist):
        start = first + c * LAZY_CHUNK
        centres = jax.lax.dynamic_slice_in_dim(state["centres"], start, LAZY_CHUNK)
        centre_norms = jax.lax.dynamic_slice_in_dim(state["centre_norms"], start, LAZY_CHUNK)
        dots = jnp.dot(block_rows, centres.T, precision=_HIGHEST, preferred_element_type=acc)
        sq = (block_norms[:, None] + centre_norms[None, :]) - 2.0 * dots  # as sq_dist_to_row
        d = jnp.sqrt(jnp.maximum(sq, 0.0))  # DECISION: clamp before the square root
        d = jnp.where((start + jnp.arange(LAZY_CHUNK) < t)[None, :], d, jnp.inf)
        return jnp.minimum(dist, jnp.min(d, axis=1))

    n_chunks = (t - first + LAZY_CHUNK - 1) // LAZY_CHUNK
    dist = jax.lax.fori_loop(0, n_chunks, chunk_body, state["dist"][b])
    return {**state, "dist": state["dist"].at[b].set(dist), "bound": state["bound"].at[b].set(jnp.max(dist)),
            "absorbed": state["absorbed"].at[b].set(t)}


def lazy_step(t, state, rows, row_norms):
    """Algorithm 1's loop body, lazily: refresh the most promising blocks, then take the farthest row."""

    def stale(state):
        return state["absorbed"][jnp.argmax(state["bound"])] != t

    def refresh(state):
        return absorb_pending(state, jnp.argmax(state["bound"]), t, rows, row_norms)

    state = jax.lax.while_loop(stale, refresh, state)
    # DECISION: argmax takes the lowest index among ties (lowest block, then lowest row in it); the
    # chosen row carries -1 so it is never taken again (the argmax runs over M - M_C).
    b = jnp.argmax(state["bound"])
    j = jnp.argmax(state["dist"][b])
    dist = state["dist"][b].at[j].set(-1.0)
    return {
        **state,
        "dist": state["dist"].at[b].set(dist),
        "bound": state["bound"].at[b].set(jnp.max(dist)),
        "selected": state["selected"].at[t].set((b * rows.shape[1] + j).astype(jnp.int32)),
        "centres": state["centres"].at[t].set(rows[b, j]),
        "centre_norms": state["centre_norms"].at[t].set(row_norms[b, j]),
    }


@functools.partial(jax.jit, static_argnames=("num_steps",), donate_argnums=(0,))
def lazy_run(state, first, rows, row_norms, *, num_steps):
    body = functools.partial(lazy_step, rows=rows, row_norms=row_norms)
    return jax.lax.fori_loop(first, first + num_steps, body, state)


# DECISION: "auto" picks the loop by backend until a device measurement says otherwise. On a CPU the
# lazy loop reads a few 1024-row blocks per step and measured 4.5x (100k, 1%) to 7x (100k, 10%) faster
# than the dense loop (README). On a GPU or TPU each step of the lazy loop is a chain of small,
# dependent kernels (a while loop of 1024 x 128 x 32 products), while the dense loop is one
# bandwidth-bound pass that these devices run at TB/s: dense is expected to win there (not measured
# yet: `python -m bench.device` records both).
_AUTO_METHOD = {"cpu": "lazy", "gpu": "dense", "cuda": "dense", "rocm": "dense", "tpu": "dense"}


def resolve_method(method: str) -> str:
    """`"lazy"`, `"dense"`, or `"auto"` -> the loop for `jax.default_backend()`."""
    if method == "auto":
        return _AUTO_METHOD.get(jax.default_backend(), "dense")
    if method not in ("lazy", "dense"):
        raise ValueError(f"method: expected 'auto', 'lazy' or 'dense', got {method!r}")
    return method


def greedy_coreset(
    bank: jax.Array,
    num_samples: int,
    *,
    projection: jax.Array | None = None,
    start_indices: Sequence[int] = (0,),
    store_dtype=None,
    method: str = "auto",
    block: int = 1024,
    progress: Callable[[int], None] | None = None,
    chunk: int = 256,
) -> jax.Array:
    """Algorithm 1: `m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||_2`.

    Args:
      bank: `(N, D)` patch features.
      num_samples: coreset size, `0 <= num_samples <= N`.
      projection: `(D, P)` random projection psi, or None to measure in the full space.
      start_indices: rows whose mean distance initialises the min-distance vector.
      store_dtype: dtype of the stored projected bank; `jnp.bfloat16` halves its memory at a small
        cost in covering radius (README). Default: the bank's float dtype. Choose bfloat16 where memory
        is short or the loop is bandwidth-bound on a device with native bfloat16 (GPU, TPU); keep
        float32 on a CPU, where XLA's bfloat16 products are slower (measured, README).
      method: "lazy" refreshes only the blocks of `block` rows that can hold the next maximum;
        "dense" reads the whole projected bank every step; "auto" (the default) picks lazy on a CPU and
        dense on a GPU or TPU (`resolve_method`). Both select the same rows in exact arithmetic (float
        rounding of the dot products may differ). Without a projection the dense loop runs.
      progress: called with the number of steps done; the loop then runs in jitted chunks of `chunk`
        steps (still no host round trip inside a chunk). Without it, the whole loop is one call.
    Returns:
      `(num_samples,)` int32 indices into `bank`, in the order selected.
    """
    _, num_samples, starts = _checks.check_coreset_args(bank, num_samples, projection, start_indices)
    bank = jnp.asarray(bank)
    if not jnp.issubdtype(bank.dtype, jnp.floating):
        bank = bank.astype(jnp.float32)
    if projection is not None:
        projection = jnp.asarray(projection, bank.dtype)
    store_dtype = jnp.dtype(bank.dtype if store_dtype is None else store_dtype)
    if projection is None and store_dtype != bank.dtype:
        raise ValueError("store_dtype: only applies to a projected bank; pass a projection or leave it None")
    method = resolve_method(method)
    psi, norms, min_dist = _prepare(bank, projection, _to_device(np.asarray(starts, np.int32)), store_dtype=store_dtype)
    block = _checks.check_int("block", block, low=1)
    if num_samples == 0:
        return _to_device(np.zeros((0,), np.int32))
    if method == "lazy" and psi is not None:
        rows, row_norms, state = lazy_prepare(psi, norms, min_dist, num_samples=num_samples, block=min(block, psi.shape[0]))

        def run(state, done, steps):
            return lazy_run(state, _to_device(np.int32(done)), rows, row_norms, num_steps=steps)

        def result(state):
            return state["selected"]
    else:
        stored = bank if psi is None else psi
        state = (min_dist, _to_device(np.zeros((num_samples,), np.int32)))

        def run(state, done, steps):
            return run_steps(*state, _to_device(np.int32(done)), stored, norms, num_steps=steps)

        def result(state):
            return state[1]
    if progress is None:
        return result(run(state, 0, num_samples))
    done = 0
    while done < num_samples:
        steps = min(chunk, num_samples - done)
        state = jax.block_until_ready(run(state, done, steps))
        done += steps
        progress(done)
    return result(state)
