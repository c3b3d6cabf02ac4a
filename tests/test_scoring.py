import numpy as np
import pytest
from hypothesis import given, strategies as st

import patchcore_jax
import reference
from tests.helpers import assert_close, both_ways, gaussian, oracle, shape_buckets, x64


@st.composite
def scoring_cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**16)),
        **draw(shape_buckets(n=[12, 150], b=[1, 3], p=[4, 49], d=[3, 32], num_neighbors=[1, 2, 9])),
        spread=draw(st.sampled_from([0.5, 1.0, 3.0])),
    )


def _inputs(c):
    bank = gaussian(c["seed"], (c["n"], c["d"]))
    feats = gaussian(c["seed"] + 1, (c["b"], c["p"], c["d"]), scale=c["spread"])
    return bank, feats


@given(scoring_cases())
def test_matches_reference_float32(c):
    bank, feats = _inputs(c)
    want_s, want_p = oracle.image_scores(bank, feats, num_neighbors=c["num_neighbors"])
    for how, (got_s, got_p) in both_ways(
        patchcore_jax.image_scores, bank.astype(np.float32), feats.astype(np.float32), num_neighbors=c["num_neighbors"]
    ):
        assert_close(got_p, want_p, np.float32, err_msg=how)
        assert_close(got_s, want_s, np.float32, err_msg=how)


@given(scoring_cases())
def test_matches_reference_float64(c):
    bank, feats = _inputs(c)
    want_s, want_p = oracle.image_scores(bank, feats, num_neighbors=c["num_neighbors"])
    with x64():
        got_s, got_p = patchcore_jax.image_scores(bank, feats, num_neighbors=c["num_neighbors"])
        assert_close(got_p, want_p, np.float64)
        assert_close(got_s, want_s, np.float64)


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
@given(c=scoring_cases())
def test_invariants(backend, c):
    bank, feats = _inputs(c)
    scores, patch = (np.asarray(a) for a in backend.image_scores(bank, feats, num_neighbors=c["num_neighbors"]))
    assert np.all(scores >= 0) and np.all(patch >= 0)
    # Eq. 7's factor lies in [0, 1): the reweighted score never exceeds the largest patch score.
    assert np.all(scores <= patch.max(axis=1) * (1 + 1e-6))
    # A training patch scores 0, and so does an image made of training patches.
    train_s, train_p = backend.image_scores(bank, bank[None, : c["p"] % len(bank) + 1], num_neighbors=c["num_neighbors"])
    np.testing.assert_allclose(np.asarray(train_p), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(train_s), 0.0, atol=1e-5)
    # Shuffling the bank changes no score.
    perm = np.random.default_rng(c["seed"]).permutation(len(bank))
    s2, p2 = backend.image_scores(bank[perm], feats, num_neighbors=c["num_neighbors"])
    np.testing.assert_allclose(np.asarray(p2), patch, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s2), scores, rtol=1e-5, atol=1e-6)


def test_one_neighbour_is_the_maximum_patch_score():
    bank, feats = gaussian(0, (50, 4)), gaussian(1, (3, 10, 4), scale=2.0)
    for backend in (reference, patchcore_jax):
        scores, patch = backend.image_scores(bank, feats, num_neighbors=1)
        np.testing.assert_allclose(np.asarray(scores), np.asarray(patch).max(axis=1), rtol=1e-6)


def test_eq7_fixed_example():
    # Bank on a line: 0, 1, 10. One test image with patches at 3 and 0.5.
    # Patch scores: |3 - 1| = 2, |0.5 - 0| = 0.5 (nearest rows 1 and 0). m_test* = 3, m* = row 1, s* = 2.
    # N_2(m*) = {row 1, row 0} (distances 0 and 1 from m*). Distances from m_test*: 2 and 3.
    # s = (1 - e^2 / (e^2 + e^3)) * 2 = 2 * e^3 / (e^2 + e^3) = 2 / (1 + e^-1) = 1.4621171572600098.
    bank = np.array([[0.0], [1.0], [10.0]])
    feats = np.array([[[3.0], [0.5]]])
    for backend in (reference, patchcore_jax):
        scores, patch = backend.image_scores(bank, feats, num_neighbors=2)
        np.testing.assert_allclose(np.asarray(patch), [[2.0, 0.5]], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(scores), [2.0 / (1.0 + np.exp(-1.0))], rtol=1e-6)


def test_m_star_leads_its_neighbourhood_even_with_copies():
    # Rows 0 and 2 are equal; the test patch is nearest to row 0 (the lower copy), so m* = 0 and
    # N_2(m*) = {0, 2}: both at the same distance, the factor is 1 - 1/2.
    bank = np.array([[1.0], [5.0], [1.0]])
    feats = np.array([[[0.0]]])
    for backend in (reference, patchcore_jax):
        scores, _ = backend.image_scores(bank, feats, num_neighbors=2)
        np.testing.assert_allclose(np.asarray(scores), [0.5], rtol=1e-6)


def test_prepared_index_path_is_reused():
    from patchcore_jax._src.stages import scoring

    bank, feats = gaussian(0, (64, 8)).astype(np.float32), gaussian(1, (2, 16, 8)).astype(np.float32)
    index = patchcore_jax.build_index(bank)
    patchcore_jax.image_scores_from_index(index, feats)
    size = scoring.image_scores_unchecked._cache_size()
    patchcore_jax.image_scores_from_index(index, feats * 2)
    assert scoring.image_scores_unchecked._cache_size() == size


@pytest.mark.parametrize("magnitude", [1e-25, 1e19, 1e30])
def test_scores_at_extreme_magnitudes_are_finite_and_right(magnitude):
    """Squares of features around 1e19 overflow float32 and around 1e-25 underflow; scores must still
    match the float64 reference (relative to the magnitude), never NaN."""
    bank = (gaussian(0, (150, 32)) * magnitude).astype(np.float32)
    feats = (gaussian(1, (2, 49, 32)) * 1.5 * magnitude).astype(np.float32)
    want_s, want_p = reference.image_scores(bank.astype(np.float64), feats.astype(np.float64), num_neighbors=9)
    # Eq. 7's softmax is taken over the distances as they are, so its factor depends on the magnitude;
    # the reference computes it in float64 at the same magnitude.
    got_s, got_p = patchcore_jax.image_scores(bank, feats, num_neighbors=9)
    assert np.isfinite(np.asarray(got_s)).all() and np.isfinite(np.asarray(got_p)).all()
    assert_close(np.asarray(got_p, np.float64) / magnitude, want_p / magnitude)
    assert_close(np.asarray(got_s, np.float64) / magnitude, want_s / magnitude)


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
def test_bad_input(backend):
    bank = np.ones((4, 3))
    with pytest.raises(ValueError, match="patch_features.*3-D"):
        backend.image_scores(bank, np.ones((2, 3)))
    with pytest.raises(ValueError, match="patch_features.*\\(B, P, 3\\)"):
        backend.image_scores(bank, np.ones((1, 2, 5)))
    with pytest.raises(ValueError, match="num_neighbors.*<= 4"):
        backend.image_scores(bank, np.ones((1, 2, 3)), num_neighbors=9)
    with pytest.raises(ValueError, match="patch_features.*finite"):
        backend.image_scores(bank, np.full((1, 2, 3), np.nan))
