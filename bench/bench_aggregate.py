"""Patch aggregation, B = 8, layer2 28x28x512 + layer3 14x14x1024 -> 28x28x1024: JAX vs reference."""

import jax.numpy as jnp

import patchcore_jax as pj
import reference
from bench.conftest import gaussian, timed_jax, timed_once
from patchcore_jax._src.stages import aggregate

LAYER2, LAYER3 = (8, 28, 28, 512), (8, 14, 14, 1024)


def test_jax(benchmark):
    benchmark.group = "aggregate B=8 WRN50 layer2+3"
    feats = [jnp.asarray(gaussian(0, LAYER2)), jnp.asarray(gaussian(1, LAYER3))]
    timed_jax(benchmark, pj.aggregate_patches, feats, rounds=5, compiled=(aggregate.aggregate_linear,))


def test_reference(benchmark):
    benchmark.group = "aggregate B=8 WRN50 layer2+3"
    feats = [gaussian(0, LAYER2), gaussian(1, LAYER3)]
    timed_once(benchmark, reference.aggregate_patches, feats)
