"""End to end: PatchCore fit (16 images) and predict (8 images) on 224x224 crops, WRN50-2, 10%
coreset; extra_info holds the time per image."""

import warnings

from bench.conftest import timed_once
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax.data import make_synthetic
from patchcore_jax._src.api.patchcore import PatchCore

DATA = make_synthetic(seed=0, n_train=16, n_test_good=4, n_test_defect=4)


def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PatchCore(PatchCoreConfig(), progress=False)


def test_fit(benchmark):
    benchmark.group = "end to end, per call"
    m = model()
    m.fit(DATA["train"][:8])  # compile at these shapes
    timed_once(benchmark, m.fit, DATA["train"], rounds=2)
    benchmark.extra_info["seconds_per_image"] = round(benchmark.stats.stats.min / 16, 3)


def test_predict(benchmark):
    benchmark.group = "end to end, per call"
    m = model().fit(DATA["train"])
    m.predict(DATA["test"])
    timed_once(benchmark, m.predict, DATA["test"], rounds=3)
    benchmark.extra_info["seconds_per_image"] = round(benchmark.stats.stats.min / 8, 3)
