"""Greedy coreset subsampling (paper Algorithm 1) as one compiled loop.

The min-distance vector lives on the device for the whole loop (`lax.fori_loop`); each step is one
pass over the projected bank (`||a||^2 - 2 a.b + ||b||^2`, clamped at 0 before the square root) with
the squared norms computed once. Nothing `N x N` is built and the `N x D` bank is never copied:
float32 cancellation is tamed by centring, which for a projection is applied to the `N x P` projected
bank (centring commutes with the linear map) and without one is folded into the dot products.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reference import _checks

_HIGHEST = jax.lax.Precision.HIGHEST


def random_projection(key_or_seed, in_dim: int, out_dim: int, *, dtype=jnp.float32) -> jax.Array:
    """`(in_dim, out_dim)` projection psi, uniform in `+-1/sqrt(in_dim)` like a bias-free
    `torch.nn.Linear` (the published sampler's). The caller owns the key."""
    in_dim = _checks.check_int("in_dim", in_dim, low=1)
    out_dim = _checks.check_int("out_dim", out_dim, low=1)
    key = jax.random.key(key_or_seed) if isinstance(key_or_seed, (int, np.integer)) else key_or_seed
    bound = 1.0 / np.sqrt(in_dim)
    return jax.random.uniform(key, (in_dim, out_dim), dtype, -bound, bound)


def _acc_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _sq_dist_to(stored, norms, row_index):
    """Squared distances of every stored row to row `row_index`.

    With a projection, `stored` is the centred `N x P` projected bank: one matrix-vector product with
    the cached norms (the memory-bound minimum). Without one, `stored` is the caller's `N x D` bank,
    never copied, and the difference `x_m - x_i` is formed inside the fused reduction: exact, so no
    centring is needed (`norms` is None there).
    """
    acc = _acc_dtype(stored.dtype)
    row = stored[row_index].astype(acc)
    if norms is None:
        return jnp.sum(jnp.square(stored.astype(acc) - row), axis=-1)
    dots = jnp.dot(stored, row.astype(stored.dtype), precision=_HIGHEST, preferred_element_type=acc)
    return norms - 2.0 * dots + jnp.sum(jnp.square(row))


@functools.partial(jax.jit, static_argnames=("store_dtype",))
def _prepare(bank, projection, starts, *, store_dtype):
    """Projected, centred bank (or None), its squared norms (or None), and the start distances."""
    acc = _acc_dtype(bank.dtype)
    if projection is None:
        psi, norms, stored = None, None, bank
    else:
        mean = jnp.mean(bank, axis=0, dtype=acc)
        # Centring after the (linear) projection: the N x D bank is never copied.
        psi = jnp.dot(bank, projection, precision=_HIGHEST) - jnp.dot(mean, projection, precision=_HIGHEST)
        psi = psi.astype(store_dtype)
        norms = jnp.sum(jnp.square(psi.astype(acc)), axis=1)
        stored = psi
    sq = jax.vmap(lambda s: _sq_dist_to(stored, norms, s))(starts)  # (S, N)
    # DECISION: as the published sampler, start from the mean distance to the start points.
    min_dist = jnp.mean(jnp.sqrt(jnp.maximum(sq, 0.0)), axis=0)
    return psi, norms, min_dist


def _select_step(t, state, stored, norms):
    """Algorithm 1's loop body: take the farthest row, then fold its distances into the minimum."""
    min_dist, selected = state
    # DECISION: argmax takes the lowest index among ties; chosen rows carry -1 so they are never
    # taken again (the argmax runs over M - M_C) and indices stay distinct on repeated rows.
    i = jnp.argmax(min_dist)
    sq = _sq_dist_to(stored, norms, i)
    # DECISION: clamp before the square root; cancellation can leave tiny negatives.
    min_dist = jnp.minimum(min_dist, jnp.sqrt(jnp.maximum(sq, 0.0)))
    return min_dist.at[i].set(-1.0), selected.at[t].set(i.astype(selected.dtype))


@functools.partial(jax.jit, static_argnames=("num_steps",), donate_argnums=(0, 1))
def _run_steps(min_dist, selected, first, stored, norms, *, num_steps):
    body = functools.partial(_select_step, stored=stored, norms=norms)
    return jax.lax.fori_loop(first, first + num_steps, body, (min_dist, selected))


def greedy_coreset(
    bank: jax.Array,
    num_samples: int,
    *,
    projection: jax.Array | None = None,
    start_indices: Sequence[int] = (0,),
    store_dtype=None,
    progress: Callable[[int], None] | None = None,
    chunk: int = 256,
) -> jax.Array:
    """Algorithm 1: `m_i = argmax_{m in M - M_C} min_{n in M_C} ||psi(m) - psi(n)||_2`.

    Args:
      bank: `(N, D)` patch features.
      num_samples: coreset size, `0 <= num_samples <= N`.
      projection: `(D, P)` random projection psi, or None to measure in the full space.
      start_indices: rows whose mean distance initialises the min-distance vector.
      store_dtype: dtype of the stored projected bank; `jnp.bfloat16` halves each step's memory
        traffic at a small cost in covering radius (README). Default: the bank's float dtype.
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
    psi, norms, min_dist = _prepare(bank, projection, jnp.asarray(starts), store_dtype=store_dtype)
    stored = bank if psi is None else psi
    selected = jnp.zeros((num_samples,), jnp.int32)
    if num_samples == 0:
        return selected
    if progress is None:
        return _run_steps(min_dist, selected, 0, stored, norms, num_steps=num_samples)[1]
    state, done = (min_dist, selected), 0
    while done < num_samples:
        steps = min(chunk, num_samples - done)
        state = _run_steps(*state, done, stored, norms, num_steps=steps)
        jax.block_until_ready(state)
        done += steps
        progress(done)
    return state[1]
