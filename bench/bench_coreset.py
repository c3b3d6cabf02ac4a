"""Greedy coreset: JAX (lazy and dense loops; float32 and bfloat16 store) vs the float64 reference vs a
published-style torch loop (the ApproximateGreedyCoresetSampler's), N = 20k, 100k and 245k rows of
D = 1024, projection 128, 1% and 10%. Also the
roofline: the dense loop's rate of reading the projected bank (N x 128 x itemsize per step) against
this machine's copy bandwidth, and the lazy loop's effective rate on the same count of bytes."""

import jax.numpy as jnp
import numpy as np
import pytest

import patchcore_jax as pj
import reference
from bench.conftest import HAS_TORCH, gaussian, timed_jax, timed_once
from patchcore_jax._src.stages import coreset

CASES = [(20_000, 0.01), (20_000, 0.10), (100_000, 0.01), (100_000, 0.10), (245_000, 0.10)]
# The paper's other setting at MVTec's largest bank (245k patches): only the default loop (lazy,
# float32) runs there, the dense loop and bfloat16 would take minutes per round on a CPU.
LARGE = 245_000
_banks = {}


def bank(n):
    if n not in _banks:
        _banks.clear()
        _banks[n] = gaussian(n, (n, 1024))
    return _banks[n]


def projection():
    return np.asarray(pj.random_projection(0, 1024, 128))


@pytest.mark.parametrize("n, frac", CASES, ids=[f"{n // 1000}k-{int(f * 100)}pct" for n, f in CASES])
@pytest.mark.parametrize("store", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["lazy", "dense"])
def test_jax(benchmark, n, frac, store, method, bandwidth):
    if n >= LARGE and (store, method) != ("float32", "lazy"):
        pytest.skip("only the default loop at 245k (minutes per round otherwise)")
    benchmark.group = f"coreset {n // 1000}k {int(frac * 100)}%"
    x = jnp.asarray(bank(n))
    num = int(n * frac)
    proj = jnp.asarray(projection())
    timed_jax(benchmark, lambda: pj.greedy_coreset(x, num, projection=proj, start_indices=tuple(range(10)), store_dtype=store,
                                                   method=method),
              rounds=2, compiled=(coreset.run_steps, coreset._prepare, coreset.lazy_prepare, coreset.lazy_run))
    per_step_bytes = n * 128 * (4 if store == "float32" else 2)
    rate = per_step_bytes * num / benchmark.stats.stats.min / 1e9
    key = "read_gbps" if method == "dense" else "effective_read_gbps"
    benchmark.extra_info.update({key: round(rate, 1), "copy_gbps": round(bandwidth, 1),
                                 "roofline_ratio": round(rate / bandwidth, 2)})


@pytest.mark.parametrize("n, frac", [(20_000, 0.01), (20_000, 0.10), (100_000, 0.01)],
                         ids=["20k-1pct", "20k-10pct", "100k-1pct"])
def test_reference(benchmark, n, frac):
    benchmark.group = f"coreset {n // 1000}k {int(frac * 100)}%"
    timed_once(benchmark, lambda: reference.greedy_coreset(bank(n), int(n * frac), projection=projection(),
                                                           start_indices=tuple(range(10))))


TORCH_CASES = [(20_000, 0.01), (20_000, 0.10), (100_000, 0.01), (100_000, 0.10), (245_000, 0.10)]


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("n, frac", TORCH_CASES, ids=[f"{n // 1000}k-{int(f * 100)}pct" for n, f in TORCH_CASES])
def test_published_style_torch(benchmark, n, frac):
    import torch

    from bench.published_torch import approximate_greedy_coreset

    benchmark.group = f"coreset {n // 1000}k {int(frac * 100)}%"
    feats = torch.from_numpy(bank(n))
    timed_once(benchmark, lambda: approximate_greedy_coreset(feats, int(n * frac)))
