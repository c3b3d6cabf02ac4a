"""Nearest-neighbour search and image scores: bank 20k and 50k x 1024 against 8 x 784 queries.
JAX exact (prepared index) vs faiss-cpu IndexFlatL2 (the published code's search) vs pynndescent
(approximate; its recall is recorded), plus the float64 reference on a smaller case it can finish."""

import jax.numpy as jnp
import numpy as np
import pytest

import patchcore_jax as pj
import reference
from bench.conftest import HAS_FAISS, gaussian, timed_jax, timed_once
from patchcore_jax._src.stages.search import brute as neighbors
from patchcore_jax._src.stages import scoring

SIZES = [20_000, 50_000]
QUERIES = (8 * 784, 1024)


def data(n):
    return gaussian(n, (n, 1024)), gaussian(7, QUERIES)


@pytest.mark.parametrize("n", SIZES, ids=[f"{n // 1000}k" for n in SIZES])
def test_jax_search_k1(benchmark, n):
    benchmark.group = f"search k=1 bank {n // 1000}k x 6272 queries"
    bank, queries = data(n)
    index, q = pj.build_index(jnp.asarray(bank)), jnp.asarray(queries)
    timed_jax(benchmark, pj.search, index, q, 1, compiled=(neighbors.search_jit,))


@pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu is not installed")
@pytest.mark.parametrize("n", SIZES, ids=[f"{n // 1000}k" for n in SIZES])
def test_faiss_flat_l2(benchmark, n):
    import faiss

    benchmark.group = f"search k=1 bank {n // 1000}k x 6272 queries"
    bank, queries = data(n)
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    benchmark.pedantic(lambda: index.search(queries, 1), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("n", [20_000], ids=["20k"])
def test_pynndescent(benchmark, n):
    import pynndescent

    benchmark.group = f"search k=1 bank {n // 1000}k x 6272 queries"
    bank, queries = data(n)
    index = pynndescent.NNDescent(bank, metric="euclidean", n_neighbors=30, random_state=0)
    index.prepare()
    index.query(queries[:10], k=10)  # compile the query path
    got, _ = benchmark.pedantic(lambda: index.query(queries, k=10, epsilon=0.3), rounds=1, iterations=1)
    _, want = pj.search(pj.build_index(jnp.asarray(bank)), jnp.asarray(queries), 1)
    benchmark.extra_info["recall_at_1"] = float(np.mean(got[:, 0] == np.asarray(want)[:, 0]))
    benchmark.extra_info["note"] = "query time only; graph construction not timed"


@pytest.mark.parametrize("n", SIZES, ids=[f"{n // 1000}k" for n in SIZES])
def test_jax_image_scores(benchmark, n):
    benchmark.group = f"image scores (Eq. 7, b=9) bank {n // 1000}k x 8 images"
    bank, queries = data(n)
    index, feats = pj.build_index(jnp.asarray(bank)), jnp.asarray(queries.reshape(8, 784, 1024))
    timed_jax(benchmark, lambda: pj.image_scores_from_index(index, feats, num_neighbors=9), compiled=(scoring.image_scores_unchecked,))


SMALL = (5_000, 784)  # bank rows, queries: one image, a size the float64 reference finishes


def test_jax_search_small(benchmark):
    benchmark.group = "search k=1 bank 5k x 784 queries"
    bank, queries = gaussian(1, (SMALL[0], 1024)), gaussian(2, (SMALL[1], 1024))
    index, q = pj.build_index(jnp.asarray(bank)), jnp.asarray(queries)
    timed_jax(benchmark, pj.search, index, q, 1, compiled=(neighbors.search_jit,))


def test_reference_search_small(benchmark):
    benchmark.group = "search k=1 bank 5k x 784 queries"
    bank, queries = gaussian(1, (SMALL[0], 1024)), gaussian(2, (SMALL[1], 1024))
    timed_once(benchmark, reference.nearest_neighbors, bank, queries, 1)


# -- real PatchCore features: the clustered index (prunes) vs brute force vs faiss flat ------------------
# Bank: the 10% greedy coreset of 250 synthetic-texture images' WRN50-2 features (random-init backbone,
# see bench/real_features.py); queries: the 6272 patches of 8 test images. Built once and cached.
REAL = "search k=1 real WRN50 features, 10% coreset of 250 images, 6272 queries"


def test_jax_clustered_real(benchmark):
    from bench.real_features import load
    from patchcore_jax._src.stages.search import clustered

    benchmark.group = REAL
    bank, queries = load()
    index, q = pj.build_clustered_index(bank), jnp.asarray(queries)
    timed_jax(benchmark, pj.search, index, q, 1, compiled=(clustered._search,))
    benchmark.extra_info.update({"bank_rows": int(bank.shape[0]), "leaves": int(index.num_leaves),
                                 "leaf_size": int(index.leaf_size),
                                 "rows_read_per_query_vs_brute_force": round(clustered.visited_fraction(index, q), 4)})


def test_jax_brute_real(benchmark):
    from bench.real_features import load

    benchmark.group = REAL
    bank, queries = load()
    index, q = pj.build_index(jnp.asarray(bank)), jnp.asarray(queries)
    timed_jax(benchmark, pj.search, index, q, 1, compiled=(neighbors.search_jit,))


@pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu is not installed")
def test_faiss_flat_l2_real(benchmark):
    import faiss

    from bench.real_features import load

    benchmark.group = REAL
    bank, queries = load()
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    benchmark.pedantic(lambda: index.search(queries, 1), rounds=3, iterations=1, warmup_rounds=1)
