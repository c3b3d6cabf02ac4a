import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import patchcore_jax
import reference
from patchcore_jax._src.stages.search import brute as neighbors
from patchcore_jax._src.stages.search import common
from tests.helpers import assert_close, both_ways, gaussian, oracle, shape_buckets, x64


@st.composite
def search_cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**16)),
        **draw(shape_buckets(n=[5, 50, 700], q=[1, 30], d=[2, 24], k=[1, 3, 5])),
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
    bank32, queries32 = bank.astype(np.float32), queries.astype(np.float32)
    results = list(both_ways(patchcore_jax.nearest_neighbors, bank32, queries32, k=c["k"]))
    for product in common.PRODUCTS:  # "auto" above takes one of them; both must be exact on any machine
        results.append((product, patchcore_jax.search(patchcore_jax.build_index(bank32, product=product), queries32, c["k"])))
    for how, (got_d, got_i) in results:
        assert_close(got_d, want_d, np.float32, err_msg=how)
        # Whatever rows were chosen, their true distances are the reference's k smallest.
        true_d = np.linalg.norm(bank[np.asarray(got_i)] - queries[:, None], axis=-1)
        assert_close(true_d, want_d, np.float32, err_msg=how)


@st.composite
def bound_cases(draw):
    return dict(seed=draw(st.integers(0, 2**16)), **draw(shape_buckets(n=[40, 300], q=[16], d=[3, 64, 1024])),
                product=draw(st.sampled_from(common.PRODUCTS)),
                # Entries spread over many binades, down to where bfloat16 flushes them to zero.
                spread=draw(st.sampled_from([0, 8, 40, 140])), offset=draw(st.sampled_from([0.0, 30.0])))


@given(bound_cases())
def test_the_ranking_lower_bounds_hold_for_either_product(c):
    """Exactness rests on each row's key bound lying at or below its exact key (float64 arithmetic on
    the same float32 scaled values), whichever product ranked it: the float32 product within Higham's
    gamma, the three bfloat16 products within gamma plus their split error and flushed tiny terms."""
    rng = np.random.default_rng(c["seed"])
    shape = lambda n: (n, c["d"])  # noqa: E731
    spread = lambda n: np.exp2(-rng.integers(0, c["spread"] + 1, shape(n)))  # noqa: E731
    bank = (rng.normal(size=shape(c["n"])) * spread(c["n"]) + c["offset"]).astype(np.float32)
    if c["spread"] == 140:  # rows of entries 2**-60 to 2**-140 after centring (their squares, products and
        # norms flush to zero): opposite pairs keep the mean ~0
        half = rng.normal(size=shape(c["n"] // 4))
        tiny = rng.normal(size=shape(c["n"] // 2)) * np.exp2(-rng.integers(60, 141, (c["n"] // 2, 1)))
        bank = np.concatenate([half, -half, tiny]).astype(np.float32)
    queries = (rng.normal(size=shape(c["q"])) * spread(c["q"]) * 2 + c["offset"]).astype(np.float32)
    _assert_bounds_hold(bank, queries, c["product"])


def _assert_bounds_hold(bank, queries, product):
    """Every real row's key bound (`common.bounds_of`, which the fused search uses, and the running list's
    `common.rank_lower_bounds` for "highest") at or below its exact key, float64 on the same values."""
    index = patchcore_jax.build_index(bank, product=product)
    q, g = common.scaled_queries(jnp.asarray(queries) - index.centre, index.log2_scale)
    w = common.rank_weight(g, q.dtype)
    gamma = common.gamma(q.shape[1], q.dtype)
    q_norm = jnp.sqrt(jnp.sum(jnp.square(q), axis=1))
    norms = index.sq_norms
    real = slice(0, len(bank))
    rows64, q64, w64 = (np.asarray(a, np.float64) for a in (index.rows[real], q, w))
    exact = np.sum(np.square(rows64), axis=1)[None, :] * w64[:, None] - 2.0 * q64 @ rows64.T
    found = [common.bounds_of(q, w, q_norm, gamma, product)(index.rows, norms, jnp.sqrt(jnp.where(jnp.isfinite(norms), norms, 0)))]
    if product == "highest":
        found.append(common.rank_lower_bounds(q, w, index.rows, norms, q_norm, gamma))
    for bounds in found:
        bounds = np.asarray(bounds, np.float64)[:, real]
        assert np.all(bounds <= exact), np.max(bounds - exact)


@pytest.mark.parametrize("product", common.PRODUCTS)
def test_the_bounds_hold_for_a_row_whose_norm_flushes_to_zero(product):
    # The last row's entries lie below 2**-63 of the bank's extent: its squared norm flushes to 0, and
    # with it the relative slack `||q|| ||b||`, while the product's own error does not vanish.
    _assert_bounds_hold(np.array([[1.0], [-1.0], [2.2184967872800863e-20]], np.float32),
                        np.array([[-0.5212610960006714]], np.float32), product)


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
    size = neighbors.search_jit._cache_size()
    patchcore_jax.search(index, queries + 1, 2, query_block=128)
    assert neighbors.search_jit._cache_size() == size


def test_approximate_jax_search_recall():
    bank, queries = gaussian(6, (2000, 32)).astype(np.float32), gaussian(7, (100, 32)).astype(np.float32)
    _, want = reference.nearest_neighbors(bank, queries, 5)
    got_d, got = patchcore_jax.approximate_nearest_neighbors(bank, queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(np.asarray(got), want)])
    assert recall >= 0.95
    assert np.all(np.diff(np.asarray(got_d), axis=1) >= 0)


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


# -- numerics that never go silently wrong ----------------------------------------------------------
_jit_nearest = jax.jit(patchcore_jax.nearest_neighbors, static_argnames=("k",))


def _plain_and_jit(bank, queries, k):
    """Like `both_ways`, with one jitted function kept across examples (one compile per shape)."""
    yield "plain", patchcore_jax.nearest_neighbors(bank, queries, k)
    yield "jit", _jit_nearest(bank, queries, k=k)

@st.composite
def near_duplicate_cases(draw):
    """Banks of tight clusters: rows whose squared distances differ by far less than float32's error
    on the norm expansion (|b|^2 ~ 400 here), but by far more than the difference of two rows."""
    return dict(
        seed=draw(st.integers(0, 2**16)),
        clusters=3,
        copies=draw(st.sampled_from([2, 12])),  # 12 > the candidates kept: the certificate must fail
        spread=draw(st.sampled_from([1e-2, 1e-3])),
        k=draw(st.sampled_from([1, 3])),
        offset=draw(st.sampled_from([0.0, 100.0])),
    )


def _near_duplicates(c, d=24):
    rng = np.random.default_rng(c["seed"])
    base = rng.normal(size=(c["clusters"], d)) * 4.0 + c["offset"]
    bank = np.repeat(base, c["copies"], axis=0) + rng.normal(size=(c["clusters"] * c["copies"], d)) * c["spread"]
    queries = np.concatenate([bank[::2], bank[:2] + rng.normal(size=(2, d)) * c["spread"] * 0.1])
    return bank.astype(np.float32).astype(np.float64), queries.astype(np.float32).astype(np.float64)


@given(near_duplicate_cases())
def test_near_duplicates_find_the_exact_nearest(c):
    """The norm expansion alone cannot tell these rows apart (it once returned a near-duplicate at
    1e-5 for a bank row's own query); the re-ranked, certified search must."""
    bank, queries = _near_duplicates(c)
    k = min(c["k"], len(bank))
    want_d, want_i = reference.nearest_neighbors(bank, queries, k)
    for how, (got_d, got_i) in _plain_and_jit(bank.astype(np.float32), queries.astype(np.float32), k):
        got_i = np.asarray(got_i)
        true_d = np.linalg.norm(bank[got_i] - queries[:, None], axis=-1)
        # Rows are 1e-3 apart; float32 rounding of the centred rows is ~1e-5 at offset 100.
        np.testing.assert_allclose(true_d, want_d, rtol=0, atol=2e-5 * (1 + c["offset"]), err_msg=how)
        np.testing.assert_allclose(np.asarray(got_d), want_d, rtol=0, atol=2e-5 * (1 + c["offset"]), err_msg=how)
        # A query that is a bank row goes through the same arithmetic as that row: it finds itself at 0.
        own = np.arange(0, len(bank), 2)
        np.testing.assert_array_equal(got_i[: len(own), 0], own, err_msg=how)
        np.testing.assert_array_equal(np.asarray(got_d)[: len(own), 0], 0.0, err_msg=how)


def test_a_bank_row_finds_itself_among_many_near_duplicates():
    # 40 rows within 1e-3 of each other at norm ~20: the float32 keys of all of them agree to within
    # their error (~3e-2), so only the exact pass can rank them; each row must find itself at 0.
    rng = np.random.default_rng(3)
    bank = (rng.normal(size=(1, 24)) * 4 + rng.normal(size=(40, 24)) * 1e-3).astype(np.float32)
    for k in (1, 2):
        d, i = patchcore_jax.nearest_neighbors(bank, bank, k)
        np.testing.assert_array_equal(np.asarray(i)[:, 0], np.arange(40))
        np.testing.assert_array_equal(np.asarray(d)[:, 0], 0.0)


def test_rows_a_block_drops_are_ruled_out_by_its_floor():
    # Each bank block hands on only k + 7 rows to the running list. Here 40 rows within 1e-3 of each
    # other (float32 keys cannot rank them) are spread over blocks of 16 among 200 far rows, so every
    # block drops some of them: the certificate must count each block's floor, fail, and send the
    # query to the exact pass; each row must still find itself, and k rows must equal the reference.
    rng = np.random.default_rng(5)
    near = rng.normal(size=(1, 24)) * 4 + rng.normal(size=(40, 24)) * 1e-3
    bank = np.concatenate([near, rng.normal(size=(200, 24)) * 4 + 30.0]).astype(np.float32)
    order = rng.permutation(len(bank))
    bank = bank[order]
    own = np.argsort(order)[:40]  # where the near rows went
    index = patchcore_jax.build_index(bank, block=16)
    for k in (1, 3):
        d, i = patchcore_jax.search(index, bank[own], k)
        np.testing.assert_array_equal(np.asarray(i)[:, 0], own)
        np.testing.assert_array_equal(np.asarray(d)[:, 0], 0.0)
        want_d, _ = reference.nearest_neighbors(bank.astype(np.float64), bank[own].astype(np.float64), k)
        true_d = np.linalg.norm(bank.astype(np.float64)[np.asarray(i)] - bank[own, None].astype(np.float64), axis=-1)
        np.testing.assert_allclose(true_d, want_d, rtol=0, atol=1e-6)


@pytest.mark.parametrize("product", common.PRODUCTS)
def test_rows_tiny_against_the_extent_with_distances_above_the_underflow(product):
    """Rows about 2**-70 of the bank's extent, queries about 3e-19 away: the products q.b and the rows'
    squared norms flush to zero, the squared distances (about 1e-37) do not. The bounds must allow for
    the flushed values (once, "highest" certified a row 0.8% farther than the nearest)."""
    rng = np.random.default_rng(0)
    bank = np.concatenate([[[1.0], [-1.0]], rng.normal(size=(300, 1)) * 2.0**-70]).astype(np.float32)
    queries = np.array([[3.1e-19], [-3.1e-19], [2.5e-19], [-2.5e-19]], np.float32)
    want_d, want_i = reference.nearest_neighbors(bank.astype(np.float64), queries.astype(np.float64), 1)
    got_d, got_i = patchcore_jax.search(patchcore_jax.build_index(bank, product=product), queries, 1)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_allclose(np.asarray(got_d), want_d, rtol=1e-6)


def test_query_tiles_are_balanced_and_bounded():
    index = patchcore_jax.build_index(gaussian(0, (50, 8)).astype(np.float32))
    for q, block, want in [(3136, 1024, (4, 784)), (3136, 256, (13, 248)), (5, 1024, (1, 5)), (1000, 100, (10, 100))]:
        tiles = neighbors.query_blocks(index, np.zeros((q, 8), np.float32), block)
        assert tiles.shape[:2] == want and tiles.shape[1] <= block


@st.composite
def magnitude_cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**16)),
        # Up to 1e36 and down to 1e-36 once the query ratio applies: inside float32's normal range, and
        # distances below its largest value (beyond it they come back inf, tested below).
        bank_scale=draw(st.sampled_from([1e-28, 1e-20, 1.0, 1e19, 1e28])),
        query_ratio=draw(st.sampled_from([1.0, 1e-8, 1e8])),  # queries near, inside or far outside
        offset=draw(st.sampled_from([0.0, 3.0])),               # in units of the bank's scale
        k=draw(st.sampled_from([1, 3])),
    )


def _magnitude_inputs(c, n=60, q=20, d=16):
    s = c["bank_scale"]
    bank = (gaussian(c["seed"], (n, d)) + c["offset"]) * s
    queries = (gaussian(c["seed"] + 1, (q, d)) * c["query_ratio"] + c["offset"]) * s
    # Round to float32 first: the reference then measures the same points the float32 search sees.
    return bank.astype(np.float32).astype(np.float64), queries.astype(np.float32).astype(np.float64)


@given(magnitude_cases())
def test_any_magnitude_searches_exactly(c):
    """Features around 1e19 overflow float32 squares and around 1e-25 underflow them; the search
    scales by powers of two (exact), so it agrees with float64 at every magnitude."""
    bank, queries = _magnitude_inputs(c)
    want_d, want_i = reference.nearest_neighbors(bank, queries, c["k"])
    for how, (got_d, got_i) in _plain_and_jit(bank.astype(np.float32), queries.astype(np.float32), c["k"]):
        got_d, got_i = np.asarray(got_d, np.float64), np.asarray(got_i)
        assert np.isfinite(got_d).all(), how
        assert_close(got_d / c["bank_scale"], want_d / c["bank_scale"], np.float32, err_msg=how)
        true_d = np.linalg.norm(bank[got_i] - queries[:, None], axis=-1)
        assert_close(true_d / c["bank_scale"], want_d / c["bank_scale"], np.float32, err_msg=how)
        if c["query_ratio"] == 1.0:  # no near-ties to speak of: the very same rows
            np.testing.assert_array_equal(got_i, want_i, err_msg=how)


@given(magnitude_cases())
def test_any_magnitude_indices_equal_reference_under_x64(c):
    # float64's own range: with the query ratio, 1e-138 .. 1e138 square without leaving it (the
    # reference squares directly).
    scale = {1e-28: 1e-130, 1e-20: 1e-100, 1.0: 1.0, 1e19: 1e100, 1e28: 1e130}[c["bank_scale"]]
    bank = (gaussian(c["seed"], (60, 16)) + c["offset"]) * scale
    queries = (gaussian(c["seed"] + 1, (20, 16)) * c["query_ratio"] + c["offset"]) * scale
    want_d, want_i = reference.nearest_neighbors(bank, queries, c["k"])
    with x64():
        got_d, got_i = patchcore_jax.nearest_neighbors(bank, queries, c["k"])
        np.testing.assert_array_equal(np.asarray(got_i), want_i)
        assert_close(np.asarray(got_d) / scale, want_d / scale, np.float64)


def test_results_beyond_float32_come_back_infinite_not_wrong():
    bank = gaussian(0, (20, 8)).astype(np.float32)
    far = np.full((2, 8), 3e38, np.float32)  # its difference from the bank overflows float32
    d, _ = patchcore_jax.nearest_neighbors(bank, far, 1)
    assert not np.isfinite(np.asarray(d)).any()
    with pytest.raises(ValueError, match="bank.*overflow"):
        patchcore_jax.build_index(np.array([[-3e38], [3e38], [3e38]], np.float32))  # -3e38 - mean overflows
