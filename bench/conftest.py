"""Shared pieces of the benchmark suite (run it with the command in README, never in the tests).

Contenders share one process, one at a time; OpenMP workers are told to sleep rather than spin after
their work (OMP_WAIT_POLICY=PASSIVE, set before torch or faiss load), so no library's thread pool is
busy while another is timed.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_FAISS = importlib.util.find_spec("faiss") is not None


def gaussian(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def timed_jax(benchmark, fn, *args, rounds=3, compiled=()):
    """Times `fn(*args)` to completion after one compiling warm-up, and fails if a timed call
    recompiled: each jitted function in `compiled` must keep its cache size."""

    def run():
        return jax.block_until_ready(fn(*args))

    run()  # compile
    sizes = [f._cache_size() for f in compiled]
    result = benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert [f._cache_size() for f in compiled] == sizes, "a timed call recompiled"
    return result


def timed_once(benchmark, fn, *args, rounds=1):
    return benchmark.pedantic(lambda: fn(*args), rounds=rounds, iterations=1)


def copy_bandwidth_gbps(nbytes=1 << 28, repeats=5) -> float:
    """This machine's memory copy rate (read + write counted once each), best of `repeats`."""
    import time

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


@pytest.fixture(scope="session")
def bandwidth():
    return copy_bandwidth_gbps()
