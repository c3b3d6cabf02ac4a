"""The published code's knobs: the k-NN scorer (`anomaly_scorer_num_nn`), the samplers, and the
command-line options of every `PatchCoreConfig` field."""

import numpy as np
import pytest

import patchcore_jax
import reference
from patchcore_jax._src.app import cli
from patchcore_jax._src.app.console import OPTION_OF, config_from_args
from patchcore_jax._src.model.config import LATER_FIELDS, PatchCoreConfig
from patchcore_jax._src.stages import coreset
from tests.helpers import assert_close, gaussian, small_model


@pytest.mark.parametrize("k, b", [(1, 1), (3, 1), (5, 1), (3, 4)])
def test_knn_scores_match_the_reference(k, b):
    bank = gaussian(k, (60, 16))
    feats = gaussian(k + 1, (3, 25, 16), scale=2.0)
    want_s, want_p = reference.image_scores(bank, feats, num_neighbors=b, anomaly_scorer_num_nn=k)
    got_s, got_p = patchcore_jax.image_scores(bank.astype(np.float32), feats.astype(np.float32), num_neighbors=b,
                                              anomaly_scorer_num_nn=k)
    assert_close(got_p, want_p, np.float32)
    assert_close(got_s, want_s, np.float32)
    # By definition: the root mean square of the k nearest distances.
    d = np.sqrt(((feats.reshape(-1, 1, 16) - bank[None]) ** 2).sum(-1))
    rms = np.sqrt(np.mean(np.sort(d, axis=1)[:, :k] ** 2, axis=1)).reshape(3, 25)
    np.testing.assert_allclose(np.asarray(want_p), rms, rtol=1e-12)


def published_scores(bank, feats, k):
    """The published NearestNeighbourScorer on the same features: faiss IndexFlatL2 (squared
    distances), the mean of the k nearest per patch, the image score their maximum. Without faiss,
    its exact squared L2 distances are computed in float64 instead (IndexFlatL2 is exhaustive)."""
    b, p, d = feats.shape
    queries = np.ascontiguousarray(feats.reshape(b * p, d), np.float32)
    try:
        import faiss
    except ImportError:
        sq = ((queries.astype(np.float64)[:, None] - np.asarray(bank, np.float64)[None]) ** 2).sum(-1)
        dist = np.sort(sq, axis=1)[:, :k]
    else:
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank, np.float32))
        dist, _ = index.search(queries, k)
    patch = np.mean(dist, axis=-1).reshape(b, p)
    return patch.max(axis=1), patch


@pytest.mark.parametrize("k", [1, 3, 5])
def test_image_scores_rank_as_the_published_scorer_on_the_same_features(k):
    model = small_model(num_neighbors=1, anomaly_scorer_num_nn=k, coreset_fraction=0.25)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (4, 72, 72, 3), np.uint8)
    test = rng.integers(0, 256, (10, 72, 72, 3), np.uint8)
    test[5:, 20:40, 20:40] = 255  # some images with a bright square: a spread of scores
    model.fit(train)
    ours, _ = model.predict(test)
    feats = np.asarray(model.embed_crops(np.stack([model.prepare(t) for t in test])))
    bank = np.asarray(model.bank)
    want, patch = published_scores(bank, feats.reshape(len(test), -1, feats.shape[-1]), k)
    # Distances, not squared: ours squared is the published score (to faiss's float32 error), so the
    # ranking is the same.
    np.testing.assert_allclose(ours.astype(np.float64) ** 2, want, rtol=2e-3)
    assert np.min(np.diff(np.sort(want))) > 1e-2 * np.ptp(want) / len(want)  # no near-ties: ranks are defined
    np.testing.assert_array_equal(np.argsort(ours), np.argsort(want))


def test_eq7_reweights_the_knn_score():
    bank = gaussian(3, (40, 8))
    feats = gaussian(4, (2, 9, 8), scale=2.0)
    plain, patch = reference.image_scores(bank, feats, num_neighbors=1, anomaly_scorer_num_nn=3)
    weighted, patch2 = reference.image_scores(bank, feats, num_neighbors=5, anomaly_scorer_num_nn=3)
    np.testing.assert_array_equal(np.asarray(patch), np.asarray(patch2))
    assert np.all(np.asarray(weighted) < np.asarray(plain)) and np.all(np.asarray(weighted) > 0)


def row_set(a):
    """The rows of `a` in lexicographic order (the search index may store the bank in its own order)."""
    a = np.asarray(a)
    return a[np.lexsort(a.T[::-1])]


def test_samplers():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (3, 72, 72, 3), np.uint8)
    full = small_model(sampler="identity", coreset_fraction=0.1).fit(train)
    feats = np.asarray(full.embed_crops(np.stack([full.prepare(t) for t in train])))
    rows = feats.reshape(-1, feats.shape[-1])
    np.testing.assert_array_equal(row_set(full.bank), row_set(rows))  # identity: every patch, fraction ignored
    assert full.bank_size_for(3) == len(rows)
    rand = small_model(sampler="random", coreset_fraction=0.1, seed=7).fit(train)
    rows = np.asarray(rand.embed_crops(np.stack([rand.prepare(t) for t in train]))).reshape(len(rows), -1)  # seed 7's backbone
    idx = coreset.random_subset(7, len(rows), coreset.coreset_size(len(rows), 0.1))
    np.testing.assert_array_equal(row_set(rand.bank), row_set(rows[idx]))
    greedy = small_model(coreset_fraction=0.1, seed=7).fit(train)
    assert greedy.bank.shape == rand.bank.shape
    assert not np.array_equal(np.asarray(greedy.bank), np.asarray(rand.bank))


def test_config_fields_and_old_model_files():
    with pytest.raises(ValueError, match="sampler"):
        PatchCoreConfig(sampler="kmeans")
    with pytest.raises(ValueError, match="anomaly_scorer_num_nn"):
        PatchCoreConfig(anomaly_scorer_num_nn=0)
    data = PatchCoreConfig().to_dict()
    for name in LATER_FIELDS:
        del data[name]
    old = PatchCoreConfig.from_dict(data, strict=True)  # a config.json written before these fields
    assert old.anomaly_scorer_num_nn == 1 and old.sampler == "greedy"
    data = PatchCoreConfig().to_dict()
    del data["seed"]
    with pytest.raises(ValueError, match="missing fields"):
        PatchCoreConfig.from_dict(data, strict=True)


def test_every_config_field_has_a_fit_and_evaluate_option():
    import dataclasses

    assert set(OPTION_OF) == {f.name for f in dataclasses.fields(PatchCoreConfig)}
    parser = cli.build_parser()
    for command in (["fit", "--train", "x", "--out", "y"], ["evaluate", "--dataset", "mvtec", "--root", "r", "--out", "o"]):
        args = parser.parse_args(command + [
            "--patch-size", "5", "--stride", "1", "--num-starts", "3", "--sigma", "2", "--dtype", "float32",
            "--anomaly-scorer-num-nn", "3", "--sampler", "random", "--neighbors", "1"])
        cfg = config_from_args(args)
        assert (cfg.patch_size, cfg.num_starts, cfg.sigma, cfg.anomaly_scorer_num_nn, cfg.sampler) == (5, 3, 2.0, 3, "random")
