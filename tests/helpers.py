"""Shared tolerances and data builders for the agreement tests.

One tolerance table by dtype: the reference computes in float64; a JAX float32 result may differ by
rounding that grows with the magnitude of the values, so the bound is relative to the largest value.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

# dtype -> (rtol, atol relative to max(1, max |expected|))
TOLERANCES = {
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float64): (1e-10, 1e-10),
}


def assert_close(actual, expected, dtype=np.float32, *, err_msg: str = "") -> None:
    """`|actual - expected| <= atol * scale + rtol * |expected|`, with `scale = max(1, max|expected|)`."""
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {err_msg}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=err_msg)


@contextlib.contextmanager
def x64():
    """Runs a block with `jax_enable_x64`, restoring the setting after."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def gaussian(seed: int, shape, *, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Continuous random data: exact ties have probability zero, near-ties are vanishingly rare."""
    return np.random.default_rng(seed).normal(size=shape) * scale + offset


def both_ways(fn, *args, static=(), **kwargs):
    """Yields `(label, result)` for `fn` called plain and under `jax.jit` (kwargs static)."""
    yield "plain", fn(*args, **kwargs)
    jitted = jax.jit(lambda *a: fn(*a, **kwargs))
    yield "jit", jitted(*args)
