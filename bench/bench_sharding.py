"""1 -> 8 device overhead on the CPU: the sharded coreset and search on one device vs eight host
devices (the same two cores underneath, so this measures the cost of the collectives, not a
speed-up). Run in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import jax
import jax.numpy as jnp
import pytest

from bench.conftest import gaussian, timed_jax
from patchcore_jax._src.stages import coreset
from patchcore_jax._src.run import sharding

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="run with XLA_FLAGS=--xla_force_host_platform_device_count=8")

N = 50_000


@pytest.mark.parametrize("devices", [1, 8])
def test_coreset(benchmark, devices):
    benchmark.group = "sharded coreset 50k x 1024, 1%"
    mesh = sharding.make_mesh(jax.devices()[:devices])
    bank = sharding.shard_rows(gaussian(0, (N, 1024)), mesh)
    proj = coreset.random_projection(0, 1024, 128)
    timed_jax(benchmark, lambda: sharding.greedy_coreset(bank, N // 100, projection=proj, mesh=mesh), rounds=2,
              compiled=(sharding._sharded_coreset,))


@pytest.mark.parametrize("devices", [1, 8])
def test_search(benchmark, devices):
    benchmark.group = "sharded search 50k x 1024, 6272 queries"
    mesh = sharding.make_mesh(jax.devices()[:devices])
    index = sharding.build_index(gaussian(0, (N, 1024)), mesh)
    q = jnp.asarray(gaussian(1, (6272, 1024)))
    timed_jax(benchmark, lambda: sharding.nearest_neighbors(index, q, 1, mesh=mesh), rounds=2,
              compiled=(sharding._search_jit,))


def test_single_device_baseline(benchmark):
    benchmark.group = "sharded coreset 50k x 1024, 1%"
    bank = jnp.asarray(gaussian(0, (N, 1024)))
    proj = coreset.random_projection(0, 1024, 128)
    timed_jax(benchmark, lambda: coreset.greedy_coreset(bank, N // 100, projection=proj), rounds=2,
              compiled=(coreset.run_steps,))
