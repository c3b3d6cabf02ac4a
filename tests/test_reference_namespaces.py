"""The reference on every array namespace: NumPy's results (to 1e-12), in the caller's namespace.

NumPy is the baseline. `array_api_strict` proves that nothing outside the standard is used (it
refuses NumPy-only calls, out-of-range slices and mixed-kind arithmetic). JAX, with x64, is the oracle
beside the product on an accelerator. PyTorch runs when it is installed (CI has none).
Inputs are continuous random draws, so the discrete outputs (indices) have no near-ties to split.
"""

import math

import numpy as np
import pytest
import scipy.ndimage
from array_api_compat import array_namespace
from hypothesis import given, strategies as st

import reference
from tests.helpers import assert_close, gaussian, in_namespace, namespace_available, to_namespace, x64

NAMESPACES = [
    pytest.param(name, marks=pytest.mark.skipif(not namespace_available(name), reason=f"{name} is not installed"))
    for name in ("array_api_strict", "jax", "torch")
]


def assert_same(got, want, like):
    """`got` is an array of the namespace of `like` and equals NumPy's `want`: floats (computed in
    float64) to 1e-12 of their scale, integers exactly."""
    assert array_namespace(got) is array_namespace(like)
    host = np.asarray(got)
    assert host.shape == want.shape
    if np.issubdtype(want.dtype, np.integer):
        assert np.issubdtype(host.dtype, np.integer), host.dtype
        np.testing.assert_array_equal(host, want)
    else:
        assert host.dtype == np.float64, host.dtype
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(host, want, rtol=1e-12, atol=1e-12 * scale)


def check_namespace(name, fn, *args, **kwargs):
    """Runs `fn` on NumPy `args` and on the same arrays in namespace `name`; compares every output."""
    want = fn(*args, **kwargs)
    with in_namespace(name) as convert:
        like = convert(np.zeros(1))  # an array of the namespace the results must come back in
        got = fn(*to_namespace(args, convert), **kwargs)
        if isinstance(want, float):  # covering_radius: a Python float in every namespace
            assert isinstance(got, float) and math.isclose(got, want, rel_tol=1e-12)
            return
        for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
            assert_same(g, np.asarray(w), like)


@st.composite
def seeds(draw):
    return draw(st.integers(0, 2**16))


@pytest.mark.parametrize("name", NAMESPACES)
@given(seed=seeds())
def test_aggregate_patches(name, seed):
    # One shape: JAX compiles each operation per shape (the reference runs op by op there). The NumPy
    # agreement tests (test_aggregate.py) draw the shapes and options; strides come up below.
    feats = [gaussian(seed, (2, 5, 4, 3)), gaussian(seed + 1, (2, 3, 2, 5))]
    check_namespace(name, lambda *f: reference.aggregate_patches(list(f), pretrain_dim=10, target_dim=16), *feats)


@pytest.mark.parametrize("name", NAMESPACES)
@given(seed=seeds(), out=st.sampled_from([(1, 1), (9, 5)]), out_len=st.sampled_from([7, 30]))
def test_unfold_resize_pool(name, seed, out, out_len):
    x = gaussian(seed, (2, 5, 4, 3))
    check_namespace(name, reference.unfold, x, 3, 2)
    check_namespace(name, reference.bilinear_resize, x, *out)
    check_namespace(name, reference.adaptive_avg_pool1d, x, out_len)


@pytest.mark.parametrize("name", NAMESPACES)
@given(seed=seeds(), n=st.sampled_from([7, 40]), num=st.sampled_from([0, 1, 7]), projected=st.booleans(),
       starts=st.sampled_from([(0,), (3, 1, 3)]))
def test_greedy_coreset_and_covering_radius(name, seed, n, num, projected, starts):
    bank = gaussian(seed, (n, 6), offset=5.0)
    proj = reference.random_projection(seed, 6, 3) if projected else None
    args = (bank,) if proj is None else (bank, proj)

    def coreset(bank, proj=None):
        return reference.greedy_coreset(bank, num, projection=proj, start_indices=starts)

    check_namespace(name, coreset, *args)
    chosen = reference.greedy_coreset(bank, max(num, 1), projection=proj)
    check_namespace(name, lambda bank, proj=None: reference.covering_radius(bank, chosen, projection=proj), *args)


@pytest.mark.parametrize("name", NAMESPACES)
@given(seed=seeds(), n=st.sampled_from([1, 9, 60]), q=st.sampled_from([1, 13]), k=st.sampled_from([1, 4]))
def test_nearest_neighbors(name, seed, n, q, k):
    bank, queries = gaussian(seed, (n, 5)), gaussian(seed + 1, (q, 5))
    check_namespace(name, reference.nearest_neighbors, bank, queries, min(k, n))


@pytest.mark.parametrize("name", NAMESPACES)
@given(seed=seeds(), num_neighbors=st.sampled_from([1, 9]))
def test_image_scores(name, seed, num_neighbors):
    bank, feats = gaussian(seed, (30, 4)), gaussian(seed + 1, (2, 6, 4), scale=2.0)
    check_namespace(name, lambda bank, feats: reference.image_scores(bank, feats, num_neighbors=num_neighbors), bank, feats)


@pytest.mark.parametrize("name", NAMESPACES)
@given(seed=seeds(), out=st.sampled_from([(4, 4), (21, 9)]), sigma=st.sampled_from([0.5, 4.0]))
def test_anomaly_maps(name, seed, out, sigma):
    scores = np.abs(gaussian(seed, (2, 5, 3)))
    check_namespace(name, lambda s: reference.anomaly_maps(s, out, sigma=sigma), scores)
    check_namespace(name, lambda s: reference.gaussian_blur_1d(s, sigma, axis=2), scores)


def test_pynndescent_recall_against_exact():
    # Beside the namespace test below: pynndescent's numba code compiles once per test process
    # (tens of seconds), and tests are grouped by module across workers.
    bank, queries = gaussian(8, (1500, 16)), gaussian(9, (200, 16))
    _, want = reference.nearest_neighbors(bank, queries, 1)
    got_d, got = reference.approximate_nearest_neighbors(bank, queries, 1, epsilon=0.3)
    recall = float(np.mean(got[:, 0] == want[:, 0]))
    assert recall >= 0.95, recall
    np.testing.assert_allclose(got_d[:, 0], np.linalg.norm(bank[got[:, 0]] - queries, axis=1))


@pytest.mark.parametrize("name", NAMESPACES)
def test_approximate_nearest_neighbors(name):
    # pynndescent runs on NumPy at the boundary; the same graph (same seed) gives the same rows.
    bank, queries = gaussian(0, (300, 6)), gaussian(1, (12, 6))
    check_namespace(name, reference.approximate_nearest_neighbors, bank, queries, 3)


@pytest.mark.parametrize("name", NAMESPACES)
def test_random_projection_in_a_namespace(name):
    want = reference.random_projection(5, 12, 4)
    with in_namespace(name) as convert:
        like = convert(np.zeros(1))
        got = reference.random_projection(5, 12, 4, xp=array_namespace(like))
        assert_same(got, want, like)


@given(seed=seeds(), size=st.sampled_from([1, 2, 5, 16, 40]), sigma=st.sampled_from([0.3, 1.0, 4.0, 7.5]),
       truncate=st.sampled_from([2.0, 4.0]))
def test_blur_is_scipy_reflect(seed, size, sigma, truncate):
    # The oracle's oracle: SciPy's filter, sizes below the radius included (repeated reflection).
    x = gaussian(seed, (2, size, 3))
    want = scipy.ndimage.gaussian_filter1d(x, sigma, axis=1, mode="reflect", truncate=truncate)
    np.testing.assert_allclose(reference.gaussian_blur_1d(x, sigma, axis=1, truncate=truncate), want, rtol=1e-12, atol=1e-12)


@given(seed=seeds(), shape=st.sampled_from([(1, 3, 3), (2, 7, 5)]), out=st.sampled_from([(8, 8), (30, 17)]))
def test_anomaly_maps_are_scipy_gaussian_filter(seed, shape, out):
    scores = np.abs(gaussian(seed, shape))
    up = reference.bilinear_resize(scores, *out)
    want = np.stack([scipy.ndimage.gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in up])
    np.testing.assert_allclose(reference.anomaly_maps(scores, out), want, rtol=1e-12, atol=1e-12)


def test_jax_without_x64_computes_in_float32():
    # "float64 where the namespace has it": without x64, JAX's default float is float32.
    import jax
    import jax.numpy as jnp

    assert not jax.config.jax_enable_x64
    bank, feats = gaussian(0, (30, 4)), gaussian(1, (2, 5, 4))
    want_s, want_p = reference.image_scores(bank, feats, num_neighbors=3)
    got_s, got_p = reference.image_scores(jnp.asarray(bank, jnp.float32), jnp.asarray(feats, jnp.float32), num_neighbors=3)
    assert got_s.dtype == got_p.dtype == jnp.float32
    assert_close(got_p, want_p, np.float32)
    assert_close(got_s, want_s, np.float32)


def test_results_stay_on_the_arguments_device():
    # Arrays the reference creates (aranges, index lists, the coreset's output) are placed on the
    # device of its arguments: here the fourth of the host devices, not the default first one.
    import jax

    device = jax.devices()[-1]
    assert device != jax.devices()[0]
    bank, feats = gaussian(0, (40, 4)), gaussian(1, (2, 3, 4))
    with x64():
        bank_d, feats_d = jax.device_put(bank, device), jax.device_put(feats, device)
        scores_d = jax.device_put(np.abs(feats), device)
        outputs = [
            reference.greedy_coreset(bank_d, 5, start_indices=(1, 2)),
            *reference.nearest_neighbors(bank_d, bank_d[:3], 2),
            *reference.image_scores(bank_d, feats_d, num_neighbors=3),
            reference.anomaly_maps(scores_d, (6, 7), sigma=1.0),
            reference.adaptive_avg_pool1d(bank_d, 3),
            *reference.approximate_nearest_neighbors(bank_d, bank_d[:3], 2),
        ]
    for out in outputs:
        assert out.devices() == {device}
