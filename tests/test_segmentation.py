import numpy as np
import pytest
import scipy.ndimage
from hypothesis import given, strategies as st

import patchcore_jax
import reference
from tests.helpers import assert_close, both_ways, gaussian, oracle, x64


@st.composite
def map_cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**16)),
        shape=draw(st.sampled_from([(1, 4, 4), (2, 7, 5), (1, 28, 28)])),
        out=draw(st.sampled_from([(8, 8), (30, 17), (224, 224)])),
        sigma=draw(st.sampled_from([0.5, 2.0, 4.0])),
    )


@given(map_cases())
def test_matches_reference(c):
    scores = np.abs(gaussian(c["seed"], c["shape"]))
    want = oracle.anomaly_maps(scores, c["out"], sigma=c["sigma"])
    for how, got in both_ways(patchcore_jax.anomaly_maps, scores.astype(np.float32), out_size=c["out"], sigma=c["sigma"]):
        assert_close(got, want, np.float32, err_msg=how)
    with x64():
        assert_close(patchcore_jax.anomaly_maps(scores, c["out"], sigma=c["sigma"]), want, np.float64)


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
def test_constant_scores_give_a_constant_map(backend):
    got = np.asarray(backend.anomaly_maps(np.full((2, 5, 6), 3.0), (40, 33)))
    np.testing.assert_allclose(got, 3.0, rtol=1e-6)


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
def test_blur_keeps_the_mean_away_from_edges(backend):
    # A bump far from the border: the blur spreads it but keeps its total, so the mean is unchanged.
    scores = np.zeros((1, 16, 16))
    scores[0, 7:9, 7:9] = 1.0
    up = reference.bilinear_resize(scores, 128, 128)
    got = np.asarray(backend.anomaly_maps(scores, (128, 128), sigma=4.0))
    np.testing.assert_allclose(got.mean(), up.mean(), rtol=1e-6)
    assert got.max() < up.max()


@pytest.mark.parametrize("size", [1, 3, 16, 40, 224])
@pytest.mark.parametrize("sigma", [0.7, 4.0])
def test_blur_matrix_equals_scipy_reflect(size, sigma):
    # Sizes below the 16-pixel radius need SciPy's repeated reflection at both ends.
    from patchcore_jax._src.stages import linear_maps as _linear_maps

    want = scipy.ndimage.gaussian_filter1d(np.eye(size), sigma, axis=0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(_linear_maps.gaussian_matrix(size, sigma), want, atol=1e-15)
    # sigma 4, truncate 4: radius int(16.5) = 16, so 33 taps away from the edges.
    if size == 224 and sigma == 4.0:
        assert np.count_nonzero(want[:, 112]) == 33


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
def test_bad_input(backend):
    with pytest.raises(ValueError, match="patch_scores.*3-D"):
        backend.anomaly_maps(np.ones((4, 4)), (8, 8))
    with pytest.raises(ValueError, match="out_size"):
        backend.anomaly_maps(np.ones((1, 4, 4)), (8, 0))
    with pytest.raises(ValueError, match="sigma"):
        backend.anomaly_maps(np.ones((1, 4, 4)), (8, 8), sigma=-1.0)
    with pytest.raises(ValueError, match="patch_scores.*finite"):
        backend.anomaly_maps(np.full((1, 4, 4), np.nan), (8, 8))
