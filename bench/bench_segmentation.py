"""Anomaly maps: 8 maps 28x28 -> 224x224 (bilinear + Gaussian sigma 4): JAX vs reference (SciPy)."""

import jax.numpy as jnp

import patchcore_jax as pj
import reference
from bench.conftest import gaussian, timed_jax, timed_once
from patchcore_jax._src.stages import segmentation


def test_jax(benchmark):
    benchmark.group = "anomaly maps 8 x 28x28 -> 224x224"
    scores = jnp.asarray(abs(gaussian(0, (8, 28, 28))))
    timed_jax(benchmark, pj.anomaly_maps, scores, (224, 224), rounds=20, compiled=(segmentation.anomaly_maps_unchecked,))


def test_reference(benchmark):
    benchmark.group = "anomaly maps 8 x 28x28 -> 224x224"
    scores = abs(gaussian(0, (8, 28, 28)))
    timed_once(benchmark, reference.anomaly_maps, scores, (224, 224), rounds=5)
