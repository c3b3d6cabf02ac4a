import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import patchcore_jax
import reference
from patchcore_jax._src.stages import coreset
from tests.helpers import both_ways, gaussian, oracle, shape_buckets, x64


def radius_after_each_step(bank, indices, projection=None):
    """Covering radius of every prefix of `indices` (float64): `r[t] = max_m min_{c <= t} ||m - c||`."""
    psi = np.asarray(bank, np.float64)
    if projection is not None:
        psi = psi @ np.asarray(projection, np.float64)
    best = np.full(len(psi), np.inf)
    radii = []
    for i in np.asarray(indices):
        best = np.minimum(best, np.linalg.norm(psi - psi[i], axis=1))
        radii.append(best.max())
    return np.array(radii)


@st.composite
def coreset_cases(draw):
    # p None: no projection; block: blocks of the lazy loop (1024 = one block here)
    shape = draw(shape_buckets(n=[40, 97, 160], d=[3, 16], p=[None, 2, 8], num_samples=[1, 10, 30],
                               block=[7, 32, 1024]))
    return dict(
        seed=draw(st.integers(0, 2**16)),
        **shape,
        starts=tuple(draw(st.lists(st.integers(0, shape["n"] - 1), min_size=1, max_size=4))),
        offset=draw(st.sampled_from([0.0, 10.0])),
    )


def _inputs(case):
    bank = gaussian(case["seed"], (case["n"], case["d"]), offset=case["offset"])
    proj = None if case["p"] is None else reference.random_projection(case["seed"], case["d"], case["p"])
    return bank, proj


@given(coreset_cases())
def test_indices_equal_reference_under_x64(case):
    bank, proj = _inputs(case)
    expected = oracle.greedy_coreset(bank, case["num_samples"], projection=proj, start_indices=case["starts"])
    with x64():
        for how, got in both_ways(
            patchcore_jax.greedy_coreset, bank, num_samples=case["num_samples"], projection=proj, start_indices=case["starts"],
            block=case["block"],
        ):
            np.testing.assert_array_equal(np.asarray(got), expected, err_msg=how)


@given(coreset_cases())
def test_float32_covering_radius_tracks_reference(case):
    bank, proj = _inputs(case)
    expected = oracle.greedy_coreset(bank, case["num_samples"], projection=proj, start_indices=case["starts"])
    want = radius_after_each_step(bank, expected, proj)
    proj32 = None if proj is None else proj.astype(np.float32)
    for how, got in both_ways(
        patchcore_jax.greedy_coreset, bank.astype(np.float32), num_samples=case["num_samples"], projection=proj32,
        start_indices=case["starts"], block=case["block"],
    ):
        have = radius_after_each_step(bank, got, proj)
        np.testing.assert_allclose(have, want, rtol=1e-4, err_msg=how)


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
@given(bank=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                       elements=st.floats(-100, 100, width=32)))
def test_invariants_on_arbitrary_banks(backend, bank):
    """Distinct indices (even with repeated rows); num_samples = N takes every row; every row chosen is
    a farthest unselected row from the start point (row 0) and the rows chosen before it."""
    n = len(bank)
    runs = [backend.greedy_coreset(bank, n)]
    if backend is patchcore_jax:  # the lazy loop (an identity projection) in blocks of 2 rows
        runs.append(backend.greedy_coreset(bank, n, projection=np.eye(bank.shape[1]), block=2))
    for idx in map(np.asarray, runs):
        assert sorted(idx.tolist()) == list(range(n))
        psi = np.asarray(bank, np.float64)
        for t in range(n):
            centres = psi[np.concatenate([[0], idx[:t]]).astype(int)]
            to_centres = np.linalg.norm(psi[:, None] - centres[None], axis=-1).min(axis=1)
            unselected = np.setdiff1d(np.arange(n), idx[:t])
            np.testing.assert_allclose(to_centres[idx[t]], to_centres[unselected].max(), rtol=1e-5, atol=1e-4)
        assert radius_after_each_step(bank, idx)[-1] == 0.0


def test_fixed_example():
    # Points on a line at 0, 1, 3, 7. Start at row 0: distances 0, 1, 3, 7 -> pick 3 (at 7); then
    # min(., |x - 7|) = 0, 1, 3, -> pick 2 (at 3, distance 3 vs 1); then 0, 1 -> pick 1; then 0.
    bank = np.array([[0.0], [1.0], [3.0], [7.0]])
    for backend in (reference, patchcore_jax):
        np.testing.assert_array_equal(np.asarray(backend.greedy_coreset(bank, 4)), [3, 2, 1, 0])
    # Two start points 0 and 3: mean distances 3.5, 3, 2, 3.5 -> tie between rows 0 and 3: lowest wins.
    for backend in (reference, patchcore_jax):
        assert int(np.asarray(backend.greedy_coreset(bank, 1, start_indices=(0, 3)))[0]) == 0


def test_far_from_origin_float32_is_centred():
    # Rows of norm ~1e3 with spread 1e-2: the uncentred expansion would lose every digit in float32.
    # The bank is made float32 first, so both backends see the same numbers.
    bank = gaussian(7, (300, 8), scale=1e-2, offset=1e3).astype(np.float32)
    want = radius_after_each_step(bank, reference.greedy_coreset(bank, 20))
    have = radius_after_each_step(bank, patchcore_jax.greedy_coreset(bank, 20))
    np.testing.assert_allclose(have, want, rtol=1e-4)


@pytest.mark.parametrize("projected", [False, True])
def test_progress_chunks_give_the_same_indices(projected):
    bank = gaussian(1, (200, 6)).astype(np.float32)
    proj = np.asarray(patchcore_jax.random_projection(1, 6, 3)) if projected else None
    seen = []
    chunked = patchcore_jax.greedy_coreset(bank, 50, projection=proj, block=16, progress=seen.append, chunk=16)
    whole = patchcore_jax.greedy_coreset(bank, 50, projection=proj, block=16)
    np.testing.assert_array_equal(np.asarray(chunked), np.asarray(whole))
    assert seen == [16, 32, 48, 50]


@given(seed=st.integers(0, 2**16), block=st.sampled_from([1, 5, 64]), num=st.sampled_from([1, 40, 150]))
def test_lazy_loop_selects_what_the_dense_loop_selects(seed, block, num):
    # In exact arithmetic the two loops are the same algorithm; x64 makes rounding differences vanish
    # on continuous random data. Clustered rows make many blocks go stale at once.
    centres = gaussian(seed, (5, 8)) * 4
    bank = centres[np.random.default_rng(seed).integers(0, 5, 150)] + gaussian(seed + 1, (150, 8))
    proj = gaussian(seed + 2, (8, 4))
    with x64():
        lazy = patchcore_jax.greedy_coreset(bank, num, projection=proj, start_indices=(0, 1, 2), block=block)
        dense = patchcore_jax.greedy_coreset(bank, num, projection=proj, start_indices=(0, 1, 2), method="dense")
        np.testing.assert_array_equal(np.asarray(lazy), np.asarray(dense))
        np.testing.assert_array_equal(np.asarray(lazy), reference.greedy_coreset(bank, num, projection=proj,
                                                                                 start_indices=(0, 1, 2)))


def test_bfloat16_store_keeps_the_radius_close():
    bank = gaussian(2, (2000, 64)).astype(np.float32)
    proj = np.asarray(patchcore_jax.random_projection(0, 64, 16))
    full = radius_after_each_step(bank, patchcore_jax.greedy_coreset(bank, 100, projection=proj), proj)
    half = radius_after_each_step(bank, patchcore_jax.greedy_coreset(bank, 100, projection=proj, store_dtype="bfloat16"), proj)
    # bfloat16 keeps 8 bits of mantissa: choices differ, coverage barely does.
    assert half[-1] <= 1.05 * full[-1]


def test_repeated_calls_do_not_recompile():
    bank = gaussian(3, (64, 4)).astype(np.float32)
    proj = np.asarray(patchcore_jax.random_projection(0, 4, 2))
    jitted = (coreset.run_steps, coreset._prepare, coreset.lazy_prepare, coreset.lazy_run)
    patchcore_jax.greedy_coreset(bank, 8)
    patchcore_jax.greedy_coreset(bank, 8, projection=proj)
    sizes = [f._cache_size() for f in jitted]
    patchcore_jax.greedy_coreset(bank + 1, 8)
    patchcore_jax.greedy_coreset(bank + 1, 8, projection=proj)
    assert [f._cache_size() for f in jitted] == sizes


def test_random_projection_shape_and_bounds():
    for backend, key in ((reference, 0), (patchcore_jax, 0)):
        p = np.asarray(backend.random_projection(key, 64, 8))
        assert p.shape == (64, 8)
        assert np.abs(p).max() <= 1 / 8 and p.std() > 0.03


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
def test_bad_input(backend):
    bank = np.ones((5, 3))
    with pytest.raises(ValueError, match="num_samples.*<= 5"):
        backend.greedy_coreset(bank, 6)
    with pytest.raises(ValueError, match="num_samples"):
        backend.greedy_coreset(bank, -1)
    with pytest.raises(ValueError, match="bank.*2-D"):
        backend.greedy_coreset(np.ones(5), 1)
    with pytest.raises(ValueError, match="bank.*non-empty"):
        backend.greedy_coreset(np.ones((0, 3)), 0)
    with pytest.raises(ValueError, match="bank.*finite"):
        backend.greedy_coreset(np.array([[np.nan, 0, 0]]), 1)
    with pytest.raises(ValueError, match="projection"):
        backend.greedy_coreset(bank, 1, projection=np.ones((4, 2)))
    with pytest.raises(ValueError, match="start_indices"):
        backend.greedy_coreset(bank, 1, start_indices=(7,))
    with pytest.raises(ValueError, match="start_indices"):
        backend.greedy_coreset(bank, 1, start_indices=())
    if backend is patchcore_jax:
        with pytest.raises(ValueError, match="method"):
            backend.greedy_coreset(bank, 1, method="fast")
