"""The clustered index: exact search that prunes, held to the float64 reference like brute force."""

import jax
import numpy as np
import pytest
from hypothesis import given, strategies as st

import patchcore_jax
import reference
from patchcore_jax._src.stages.search import clustered, common
from tests.helpers import assert_close, gaussian, shape_buckets, x64

_jit_search = jax.jit(patchcore_jax.search, static_argnames=("k", "query_block"))


def _mixture(seed, n, d, centres, spread, offset=0.0):
    """Rows around a few centres, as patch features of one texture sit around a few prototypes."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, d)) * 5.0
    return means[rng.integers(0, centres, n)] + rng.normal(size=(n, d)) * spread + offset


@st.composite
def cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**16)),
        # leaf 4: many leaves, most pruned; 32: few, most visited
        **draw(shape_buckets(n=[40, 300], leaf=[4, 32], k=[1, 4])),
        centres=draw(st.sampled_from([1, 6])),
        spread=draw(st.sampled_from([0.3, 1.0])),
        offset=draw(st.sampled_from([0.0, 20.0])),
    )


@given(cases())
def test_same_rows_as_the_reference(c):
    """x64: indices equal to the float64 brute force exactly; float32 (jitted): distances to the
    table, and the chosen rows' true distances are the reference's k smallest."""
    bank = _mixture(c["seed"], c["n"], 8, c["centres"], c["spread"], c["offset"])
    queries = _mixture(c["seed"] + 1, 16, 8, c["centres"], c["spread"] * 1.5, c["offset"])
    want_d, want_i = reference.nearest_neighbors(bank, queries, c["k"])
    with x64():
        index = patchcore_jax.build_clustered_index(bank, leaf_size=c["leaf"], seed=c["seed"])
        got_d, got_i = patchcore_jax.search(index, queries, c["k"])
        np.testing.assert_array_equal(np.asarray(got_i), want_i)
        assert_close(got_d, want_d, np.float64)
    index = patchcore_jax.build_clustered_index(bank.astype(np.float32), leaf_size=c["leaf"], seed=c["seed"])
    got_d, got_i = _jit_search(index, queries.astype(np.float32), k=c["k"])
    assert_close(got_d, want_d, np.float32, err_msg="jit")
    true_d = np.linalg.norm(bank[np.asarray(got_i)] - queries[:, None], axis=-1)
    assert_close(true_d, want_d, np.float32, err_msg="jit")


def test_near_duplicates_and_extreme_magnitudes_stay_exact():
    # 40 rows within 1e-3 of each other (float32 keys cannot rank them) and a bank around 1e19
    # (whose squares overflow float32): certified or searched again by exact differences.
    rng = np.random.default_rng(3)
    dups = (rng.normal(size=(1, 24)) * 4 + rng.normal(size=(40, 24)) * 1e-3).astype(np.float32)
    index = patchcore_jax.build_clustered_index(dups, leaf_size=8)
    d, i = patchcore_jax.search(index, dups, 2)
    np.testing.assert_array_equal(np.asarray(i)[:, 0], np.arange(40))
    np.testing.assert_array_equal(np.asarray(d)[:, 0], 0.0)
    big = (_mixture(4, 200, 16, 4, 0.5) * 1e19).astype(np.float32)
    queries = (_mixture(5, 30, 16, 4, 0.8) * 1e19).astype(np.float32)
    want_d, want_i = reference.nearest_neighbors(big.astype(np.float64), queries.astype(np.float64), 3)
    got_d, got_i = patchcore_jax.search(patchcore_jax.build_clustered_index(big, leaf_size=16), queries, 3)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    assert_close(np.asarray(got_d, np.float64) / 1e19, want_d / 1e19)


def test_it_prunes_on_clustered_data():
    """Not a timing: the rows read per query against brute force's, which is what makes it fast."""
    bank = _mixture(0, 2000, 16, 20, 0.3).astype(np.float32)
    queries = _mixture(0, 2000, 16, 20, 0.3)[:200].astype(np.float32) + 0.01
    index = patchcore_jax.build_clustered_index(bank, leaf_size=32)
    assert clustered.visited_fraction(index, queries) < 0.25
    want_d, want_i = reference.nearest_neighbors(bank, queries, 1)
    got_d, got_i = patchcore_jax.search(index, queries, 1)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)


def test_arrays_round_trip_and_scores_match_brute_force():
    bank = _mixture(1, 500, 32, 5, 1.0).astype(np.float32)
    feats = _mixture(2, 3 * 49, 32, 5, 1.5).astype(np.float32).reshape(3, 49, 32)
    index = patchcore_jax.build_clustered_index(bank, leaf_size=16)
    arrays = index.to_arrays()
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    again = patchcore_jax.ClusteredIndex.from_arrays(dict(arrays))
    queries = feats.reshape(-1, 32)
    for a, b in zip(patchcore_jax.search(index, queries, 3), patchcore_jax.search(again, queries, 3)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Scores through the common entry point: the same as brute force's and the reference's.
    want_s, want_p = reference.image_scores(bank.astype(np.float64), feats.astype(np.float64), num_neighbors=9)
    for idx in (again, patchcore_jax.build_index(bank)):
        got_s, got_p = patchcore_jax.image_scores_from_index(idx, feats, num_neighbors=9)
        assert_close(got_p, want_p)
        assert_close(got_s, want_s)
    with pytest.raises(ValueError, match="missing.*radii"):
        patchcore_jax.ClusteredIndex.from_arrays({k: v for k, v in arrays.items() if k != "radii"})
    with pytest.raises(ValueError, match="slots"):
        patchcore_jax.ClusteredIndex.from_arrays(dict(arrays, slots=arrays["slots"][:-1]))


def _damaged(arrays, what):
    a = {k: np.array(v) for k, v in arrays.items()}
    real = np.flatnonzero(a["ids"] != np.iinfo(np.int32).max)
    if what == "zeroed row":
        a["rows"][real[3]] = 0.0
        a["sq_norms"][real[3]] = 0.0
    elif what == "slot out of range":
        a["slots"][0] = len(a["ids"]) + 5
    elif what == "swapped slots":
        a["slots"][[0, 1]] = a["slots"][[1, 0]]
    elif what == "id out of range":
        a["ids"][real[0]] = a["size"] + 7
    elif what == "scale":
        a["log2_scale"] = np.asarray(1000, np.int32)
    elif what == "scale by one":
        a["log2_scale"] = np.asarray(int(a["log2_scale"]) + 1, np.int32)
    elif what == "size a vector":
        a["size"] = np.asarray([int(a["size"])] * 2)
    elif what == "radius too small":
        a["radii"][np.argmax(a["radii"])] *= 0.5
    elif what == "NaN row":
        a["rows"][real[0], 0] = np.nan
    elif what == "centre moved":
        a["centre"] = a["centre"] + 1.0
    return a


@pytest.mark.parametrize("what, match", [
    ("zeroed row", "not the bank's"), ("slot out of range", "slots"), ("swapped slots", "inverse"),
    ("id out of range", "ids"), ("scale", "log2_scale.*outside"), ("scale by one", "not the bank's"),
    ("size a vector", "size.*integer scalar"), ("radius too small", "radii"), ("NaN row", "rows.*NaN"),
    ("centre moved", "not the bank's"),
])
def test_an_index_that_does_not_describe_its_bank_is_refused(what, match):
    """A saved index is checked against itself and against its bank when it is read back: every
    damage that would change scores silently is refused, naming the array."""
    bank = _mixture(4, 300, 8, 4, 1.0).astype(np.float32)
    arrays = patchcore_jax.build_clustered_index(bank, leaf_size=16).to_arrays()
    patchcore_jax.ClusteredIndex.from_arrays(dict(arrays), bank)  # the intact index passes
    with pytest.raises(ValueError, match=match):
        patchcore_jax.ClusteredIndex.from_arrays(_damaged(arrays, what), bank)


def test_bad_input():
    with pytest.raises(ValueError, match="leaf_size"):
        patchcore_jax.build_clustered_index(np.ones((4, 3)), leaf_size=0)
    with pytest.raises(ValueError, match="bank.*finite"):
        patchcore_jax.build_clustered_index(np.full((4, 3), np.nan))
    index = patchcore_jax.build_clustered_index(gaussian(0, (10, 3)), leaf_size=4)
    with pytest.raises(ValueError, match="k.*<= 10"):
        patchcore_jax.search(index, np.ones((2, 3)), 11)


@given(shape=shape_buckets(parts=[2, 3], num=[7, 40], k=[1, 3]), seed=st.integers(0, 2**16))
def test_host_threads_give_the_same_results_as_one_call(shape, seed):
    """On a CPU a large search is split over host threads (one per core); the parts together must
    equal one call bit for bit, and a search inside a trace (no threads) too."""
    parts, num, k = shape["parts"], shape["num"], shape["k"]
    bank = _mixture(seed, 300, 16, 6, 0.5).astype(np.float32)
    queries = _mixture(seed + 1, num, 16, 6, 0.8).astype(np.float32)
    index = patchcore_jax.build_clustered_index(bank, leaf_size=16, seed=seed)
    one = patchcore_jax.search(index, queries, k)
    used = []
    real_in_parts = common.in_parts

    def spy(fn, n, *arrays):
        used.append(n)
        return real_in_parts(fn, n, *arrays)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "MIN_PART", 1)
        mp.setattr(common, "cpu_cores", lambda: parts)
        mp.setattr(common, "in_parts", spy)
        split = patchcore_jax.search(index, queries, k)
    assert used == [parts]
    traced = _jit_search(index, queries, k=k)
    for a, b, c in zip(one, split, traced):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
