import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import patchcore_jax
import reference
from patchcore_jax import neighbors
from tests.helpers import assert_close, both_ways, gaussian, oracle, x64


@st.composite
def search_cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**16)),
        n=draw(st.sampled_from([5, 50, 700])),
        q=draw(st.sampled_from([1, 30])),
        d=draw(st.sampled_from([2, 24])),
        k=draw(st.sampled_from([1, 3, 5])),
        offset=draw(st.sampled_from([0.0, 20.0])),
    )


def _inputs(c):
    return gaussian(c["seed"], (c["n"], c["d"]), offset=c["offset"]), gaussian(c["seed"] + 1, (c["q"], c["d"]), offset=c["offset"])


@given(search_cases())
def test_indices_equal_reference_under_x64(c):
    bank, queries = _inputs(c)
    want_d, want_i = oracle.nearest_neighbors(bank, queries, c["k"])
    with x64():
        for how, (got_d, got_i) in both_ways(patchcore_jax.nearest_neighbors, bank, queries, k=c["k"]):
            np.testing.assert_array_equal(np.asarray(got_i), want_i, err_msg=how)
            assert_close(got_d, want_d, np.float64, err_msg=how)


@given(search_cases())
def test_float32_distances_match_reference(c):
    bank, queries = _inputs(c)
    want_d, _ = oracle.nearest_neighbors(bank, queries, c["k"])
    for how, (got_d, got_i) in both_ways(patchcore_jax.nearest_neighbors, bank.astype(np.float32), queries.astype(np.float32), k=c["k"]):
        assert_close(got_d, want_d, np.float32, err_msg=how)
        # Whatever rows were chosen, their true distances are the reference's k smallest.
        true_d = np.linalg.norm(bank[np.asarray(got_i)] - queries[:, None], axis=-1)
        assert_close(true_d, want_d, np.float32, err_msg=how)


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
@given(bank=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.just(3)), elements=st.floats(-10, 10, width=32)),
       k=st.integers(1, 9))
def test_invariants(backend, bank, k):
    """Sorted ascending; k = N returns every row; a bank row finds itself at distance 0."""
    k = min(k, len(bank))
    dist, idx = (np.asarray(a) for a in backend.nearest_neighbors(bank, bank, k))
    assert np.all(np.diff(dist, axis=1) >= 0)
    assert np.all(dist >= 0)
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-5)
    _, all_idx = backend.nearest_neighbors(bank, bank[:1], len(bank))
    assert sorted(np.asarray(all_idx)[0].tolist()) == list(range(len(bank)))


def test_ties_go_to_the_lower_index():
    # Query at the origin: rows 1, 2, 3, 4 all at distance 1 exactly; rows 1 and 3 are equal.
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    for backend in (reference, patchcore_jax):
        d, i = backend.nearest_neighbors(bank, np.array([[0.0, 0.0], [2.0, 0.0]]), 4)
        np.testing.assert_array_equal(np.asarray(i), [[0, 1, 2, 3], [1, 3, 0, 2]])
        np.testing.assert_allclose(np.asarray(d), [[0, 1, 1, 1], [1, 1, 2, np.sqrt(5)]], rtol=1e-6)


def test_shuffling_the_bank_permutes_indices_only():
    bank, queries = gaussian(0, (300, 8)), gaussian(1, (20, 8))
    perm = np.random.default_rng(0).permutation(300)
    d1, i1 = patchcore_jax.nearest_neighbors(bank.astype(np.float32), queries.astype(np.float32), 3)
    d2, i2 = patchcore_jax.nearest_neighbors(bank[perm].astype(np.float32), queries.astype(np.float32), 3)
    np.testing.assert_allclose(np.asarray(d1), np.asarray(d2), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(i1), perm[np.asarray(i2)])


def test_many_bank_blocks_and_prepared_index():
    bank, queries = gaussian(4, (5000, 16)).astype(np.float32), gaussian(5, (600, 16)).astype(np.float32)
    index = patchcore_jax.build_index(bank, block=512)
    want_d, want_i = reference.nearest_neighbors(bank, queries, 2)
    got_d, got_i = patchcore_jax.search(index, queries, 2, query_block=128)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    assert_close(got_d, want_d)
    size = neighbors._search._cache_size()
    patchcore_jax.search(index, queries + 1, 2, query_block=128)
    assert neighbors._search._cache_size() == size


def test_approximate_jax_search_recall():
    bank, queries = gaussian(6, (2000, 32)).astype(np.float32), gaussian(7, (100, 32)).astype(np.float32)
    _, want = reference.nearest_neighbors(bank, queries, 5)
    got_d, got = patchcore_jax.approximate_nearest_neighbors(bank, queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(np.asarray(got), want)])
    assert recall >= 0.95
    assert np.all(np.diff(np.asarray(got_d), axis=1) >= 0)


def test_pynndescent_recall_against_exact():
    bank, queries = gaussian(8, (1500, 16)), gaussian(9, (200, 16))
    _, want = reference.nearest_neighbors(bank, queries, 1)
    got_d, got = reference.approximate_nearest_neighbors(bank, queries, 1, epsilon=0.3)
    recall = float(np.mean(got[:, 0] == want[:, 0]))
    assert recall >= 0.95, recall
    np.testing.assert_allclose(got_d[:, 0], np.linalg.norm(bank[got[:, 0]] - queries, axis=1))


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
def test_bad_input(backend):
    bank = np.ones((4, 3))
    with pytest.raises(ValueError, match="k.*<= 4"):
        backend.nearest_neighbors(bank, bank, 5)
    with pytest.raises(ValueError, match="k"):
        backend.nearest_neighbors(bank, bank, 0)
    with pytest.raises(ValueError, match="queries.*\\(Q, 3\\)"):
        backend.nearest_neighbors(bank, np.ones((2, 4)))
    with pytest.raises(ValueError, match="queries.*finite"):
        backend.nearest_neighbors(bank, np.full((2, 3), np.inf))
    with pytest.raises(ValueError, match="bank.*non-empty"):
        backend.nearest_neighbors(np.ones((0, 3)), bank)
