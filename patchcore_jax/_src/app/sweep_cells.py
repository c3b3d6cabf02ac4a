"""The work of a sweep's cells on one category, sharing what cells share.

- Taps: the backbone runs once per feature key (backbone, weights, geometry, dtype, and the seed of a
  random backbone) over the category's images, for the union of the layers the cells need; the taps are
  kept in the feature store (`io.feature_store`) and reused by every cell and by later sweeps.
- Patch features: aggregated from the taps once per aggregation setting (layers, patch size, stride,
  widths), in the batches `PatchCore` uses, so they equal the features `evaluate` computes.
- Banks: cells that differ only in `coreset_fraction` share one greedy run at their largest fraction;
  a smaller fraction's coreset is the prefix of that selection (the greedy order makes this exact with
  the same projection and start points: tests/test_sweep.py checks it against direct runs).
- Scores: cells that differ only in k (`anomaly_scorer_num_nn`), b (`num_neighbors`) or sigma share
  their bank's index and one search for their largest k (the first k columns of a search with a larger
  one are the search with k); Eq. 6/7 and the maps are `scoring.scores_from_neighbours` and
  `fitted.anomaly_maps`, the functions `predict` runs; the result is reported by
  `evaluate.category_result`.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.app import evaluate as evaluate_lib
from patchcore_jax._src.io import feature_store, hub
from patchcore_jax._src.io.atomic import file_sha256
from patchcore_jax._src.io.data import datasets
from patchcore_jax._src.model import backbone, preprocess
from patchcore_jax._src.model import fitted as fitted_lib
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.run import jaxprs
from patchcore_jax._src.run.executor import Executor, pad_host
from patchcore_jax._src.stages import aggregate, coreset, scoring
from patchcore_jax._src.stages import bank as bank_lib


@functools.lru_cache(maxsize=None)
def _weights_digest(weights: str) -> tuple[str, str | None]:
    source = hub.resolve(weights)
    return source, (file_sha256(source) if os.path.isfile(source) else None)


def feature_key(cfg: PatchCoreConfig) -> dict:
    """What a backbone tap depends on (the store's key)."""
    sha = None if cfg.weights is None else _weights_digest(cfg.weights)[1]
    return {"backbone": cfg.backbone, "weights": cfg.weights, "weights_sha256": sha, "resize": cfg.resize,
            "crop": cfg.crop, "geometry": cfg.geometry, "dtype": cfg.dtype,
            "random_backbone_seed": cfg.seed if cfg.weights is None else None}


def aggregate_key(cfg: PatchCoreConfig) -> tuple:
    return (cfg.layers, cfg.patch_size, cfg.stride, cfg.pretrain_dim, cfg.target_dim, cfg.batch_size)


def bank_group(cfg: PatchCoreConfig, shots) -> tuple:
    """Cells with the same group share a greedy coreset: all but `coreset_fraction` (and scoring)."""
    return (aggregate_key(cfg), shots, cfg.sampler, cfg.projection_dim, cfg.num_starts, cfg.seed,
            cfg.coreset_dtype, cfg.coreset_fraction if not shares_prefix(cfg) else None)


def score_group(cfg: PatchCoreConfig, shots) -> tuple:
    """Cells with the same score group score against the same bank with the same index: one search
    for their largest k serves them all (they differ in k, b or sigma only)."""
    return (bank_group(cfg, shots), cfg.coreset_fraction, cfg.search)


def shares_prefix(cfg: PatchCoreConfig) -> bool:
    """Whether this config's bank comes from the streaming greedy coreset (whose prefixes are shared)."""
    return cfg.sampler == "greedy" and cfg.projection_dim > 0 and cfg.coreset_fraction < 1.0


def shot_indices(num_train: int, shots: int | None, seed: int) -> np.ndarray:
    """The training images a cell uses: all of them (`shots` None), or `shots` of them drawn without
    replacement by `np.random.default_rng(seed)`, in their sorted order."""
    if shots is None:
        return np.arange(num_train)
    if shots > num_train:
        raise ValueError(f"shots={shots}: the category has only {num_train} training images")
    return np.sort(np.random.default_rng(seed).choice(num_train, size=shots, replace=False))


class CategoryWork:
    """A category's records, taps, features and coreset selections, computed on first need."""

    def __init__(self, dataset: str, category: datasets.Category, *, store_for, mask_rule: str):
        self.dataset, self.cat, self.store_for, self.mask_rule = dataset, category, store_for, mask_rule
        self.records: dict = {}
        self.taps: dict = {}
        self.features: dict = {}
        self.selections: dict = {}
        self.searches: dict = {}
        self.seconds = {"extract": 0.0}
        self.inputs = evaluate_lib.input_fingerprint(category, {"taps": 1})

    def recs(self, cfg: PatchCoreConfig):
        key = (cfg.resize, cfg.geometry)
        if key not in self.records:
            geo = self.cat.geometry(cfg.resize)
            self.records[key] = tuple([datasets.load_sample(s, geometry=geo) for s in split]
                                      for split in (self.cat.train, self.cat.test))
        return self.records[key]

    def crops(self, cfg: PatchCoreConfig) -> np.ndarray:
        train, test = self.recs(cfg)
        return np.stack([cfg.image_geometry.image(preprocess.load_image(r["image"], name=r["name"]), name=r["name"])
                         for r in train + test])

    def tap_arrays(self, cfg: PatchCoreConfig, layers) -> dict:
        """`{layer: (N, h, w, C)}` for the category's train + test images, from the store or computed."""
        key = feature_key(cfg)
        store = self.store_for(key)
        got = self.taps.setdefault(store.name, {})
        for layer in layers:
            if layer not in got:
                found = store.load(self.cat.name, layer, self.inputs)
                if found is not None:
                    got[layer] = found
        missing = tuple(l for l in backbone.layer_names(cfg.backbone) if l in layers and l not in got)
        if missing:
            start = time.perf_counter()
            computed = compute_taps(cfg, missing, self.crops(cfg))
            for layer, array in computed.items():
                store.save(self.cat.name, layer, self.inputs, array)
                got[layer] = array
            self.seconds["extract"] += time.perf_counter() - start
        return got

    def patch_features(self, cfg: PatchCoreConfig, needed_layers) -> tuple[np.ndarray, np.ndarray]:
        """`(train (N_train, h, w, D), test (N_test, h, w, D))` float32 host arrays for `cfg`."""
        key = (feature_store.key_name(feature_key(cfg)), aggregate_key(cfg))
        if key not in self.features:
            taps = self.tap_arrays(cfg, needed_layers)
            feats = aggregate_taps(cfg, [taps[l] for l in cfg.layers])
            n_train = len(self.cat.train)
            self.features[key] = (feats[:n_train], feats[n_train:])
        return self.features[key]

    def bank(self, cfg: PatchCoreConfig, shots, train_feats: np.ndarray, largest_fraction: float) -> tuple:
        """`(bank (M, D), patches seen, coreset seconds)` for `cfg` on its training images."""
        idx = shot_indices(len(train_feats), shots, cfg.seed)
        chosen_feats = train_feats[idx]
        rows = chosen_feats.reshape(-1, chosen_feats.shape[-1])
        n = len(rows)
        if cfg.bank_size(n) < cfg.bank_rows_needed:
            raise ValueError(f"{self.cat.name}: {n} training patches give a bank of {cfg.bank_size(n)} rows, fewer "
                             f"than num_neighbors / anomaly_scorer_num_nn ({cfg.bank_rows_needed})")
        start = time.perf_counter()
        if not shares_prefix(cfg):
            bank = Executor(cfg, None, None).subsample(rows)
            return bank, n, time.perf_counter() - start
        group = bank_group(cfg, shots)
        if group not in self.selections:
            fraction = max(largest_fraction, cfg.coreset_fraction)
            projection = coreset.random_projection(cfg.seed, cfg.target_dim, cfg.projection_dim)
            size = cfg.batch_size
            batches = (chosen_feats[i : i + size].reshape(-1, rows.shape[1]) for i in range(0, len(chosen_feats), size))
            _, selected = bank_lib.build_memory_bank(batches, coreset_fraction=fraction, projection=projection,
                                                     seed=cfg.seed, num_starts=cfg.num_starts,
                                                     store_dtype=cfg.coreset_dtype)
            self.selections[group] = np.asarray(selected)
        selected = self.selections[group]
        num = coreset.coreset_size(n, cfg.coreset_fraction)
        return rows[np.sort(selected[:num])], n, time.perf_counter() - start

    def search(self, cfg: PatchCoreConfig, shots, bank: np.ndarray, test_feats: np.ndarray, largest_k: int):
        """The index of `cfg`'s bank and its `largest_k` nearest rows of every test patch, per batch
        (computed once per score group)."""
        group = score_group(cfg, shots)
        if group not in self.searches:
            self.searches.clear()  # one bank's search at a time: groups come one after another
            executor = Executor(cfg, None, None)
            _, index = executor.build_index(fitted_lib.check_bank(bank, cfg))
            k = min(max(largest_k, cfg.anomaly_scorer_num_nn), len(bank))
            parts = []
            for i in range(0, len(test_feats), cfg.batch_size):
                chunk = test_feats[i : i + cfg.batch_size]
                feats = jax.device_put(pad_host(chunk, cfg.batch_size))
                b, h, w, d = feats.shape
                dist, idx = scoring.search_patches(index, feats.reshape(b, h * w, d), k=k, query_block=256)
                parts.append((len(chunk), feats, dist, idx))
            self.searches[group] = (index, parts)
        return self.searches[group]

    def run(self, cfg: PatchCoreConfig, shots, *, needed_layers, largest_fraction: float,
            largest_k: int = 1) -> tuple[dict, dict]:
        """One cell on this category: `(result as evaluate reports it, seconds per stage)`."""
        start = time.perf_counter()
        extract_before = self.seconds["extract"]
        train_feats, test_feats = self.patch_features(cfg, needed_layers)
        t_features = time.perf_counter() - start - (self.seconds["extract"] - extract_before)
        bank, seen, t_coreset = self.bank(cfg, shots, train_feats, largest_fraction)
        t0 = time.perf_counter()
        scores, maps = score_searched(cfg, *self.search(cfg, shots, bank, test_feats, largest_k))
        t_score = time.perf_counter() - t0
        _, test = self.recs(cfg)
        meta = [dict(r) for r in test]
        masks = evaluate_lib.test_masks(cfg, meta, self.mask_rule)
        n_train = len(shot_indices(len(train_feats), shots, cfg.seed))
        result = evaluate_lib.category_result(meta, scores, maps, masks, n_train=n_train, bank_size=len(bank),
                                              seconds=time.perf_counter() - start)
        stages = {"extract_s": round(self.seconds["extract"] - extract_before, 3), "features_s": round(t_features, 3),
                  "coreset_s": round(t_coreset, 3), "score_s": round(t_score, 3), "patches": int(seen)}
        return result, stages


@functools.lru_cache(maxsize=8)
def _tap_function(arch: str, weights, layers: tuple, seed: int, dtype: str):
    source = None if weights is None else _weights_digest(weights)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        extractor = backbone.feature_extractor(arch, weights=source, layers=layers, seed=seed, dtype=jnp.dtype(dtype))

    @jax.jit
    def taps(state, crops):
        out = extractor.apply(state, fitted_lib.normalise(crops).astype(jnp.dtype(dtype)))
        return {name: out[name].astype(jnp.float32) for name in layers}

    return taps, extractor.state


def compute_taps(cfg: PatchCoreConfig, layers, crops: np.ndarray) -> dict:
    """The backbone taps `{layer: (N, h, w, C)}` float32 of uint8 crops `(N, crop, crop, 3)`, in
    batches of `batch_size` (the last padded, as `PatchCore` does)."""
    fn, state = _tap_function(cfg.backbone, cfg.weights, tuple(layers), cfg.seed, cfg.dtype)
    size = cfg.batch_size
    parts = {name: [] for name in layers}
    for i in range(0, len(crops), size):
        chunk = crops[i : i + size]
        out = jax.device_get(fn(state, jax.device_put(pad_host(chunk, size))))
        for name in layers:
            parts[name].append(np.asarray(out[name])[: len(chunk)])
    return {name: np.concatenate(p) for name, p in parts.items()}


def tap_shapes(cfg: PatchCoreConfig, layers) -> tuple[dict, tuple[int, int], int]:
    """What `compute_taps` and `aggregate_taps` hold, from shapes alone (nothing compiled or run):
    `({layer: (h, w, C)} of one crop's taps, (h, w) of its patch grid, activations)`, the last the
    backbone's working memory on one batch (3 times the largest array of a trace of one image, times
    `batch_size`, as `Executor.memory_estimate` counts it)."""
    layers = tuple(l for l in backbone.layer_names(cfg.backbone) if l in layers)
    fn, state = _tap_function(cfg.backbone, cfg.weights, layers, cfg.seed, cfg.dtype)
    crops = jax.ShapeDtypeStruct((1, cfg.crop, cfg.crop, 3), jnp.uint8)
    taps = jax.eval_shape(fn, state, crops)
    largest = jaxprs.largest_value(jax.make_jaxpr(fn)(state, crops).jaxpr)
    feats = jax.eval_shape(lambda maps: _aggregate(maps, patch_size=cfg.patch_size, stride=cfg.stride,
                                                    pretrain_dim=cfg.pretrain_dim, target_dim=cfg.target_dim,
                                                    dtype=jnp.dtype(cfg.dtype)),
                           tuple(taps[l] for l in cfg.layers if l in taps))
    return ({l: tuple(int(v) for v in taps[l].shape[1:]) for l in layers}, (int(feats.shape[1]), int(feats.shape[2])),
            3 * max(largest, 1) * cfg.batch_size)


@functools.partial(jax.jit, static_argnames=("patch_size", "stride", "pretrain_dim", "target_dim", "dtype"))
def _aggregate(maps, *, patch_size, stride, pretrain_dim, target_dim, dtype):
    return aggregate.aggregate_linear(tuple(m.astype(dtype) for m in maps), patch_size=patch_size, stride=stride,
                                      pretrain_dim=pretrain_dim, target_dim=target_dim).astype(jnp.float32)


def aggregate_taps(cfg: PatchCoreConfig, maps) -> np.ndarray:
    """Patch features `(N, h, w, target_dim)` float32 of taps `[(N, h_j, w_j, C_j)]`, in padded batches."""
    size, n = cfg.batch_size, len(maps[0])
    out = []
    for i in range(0, n, size):
        chunk = [pad_host(np.asarray(m[i : i + size]), size) for m in maps]
        feats = _aggregate(tuple(jax.device_put(c) for c in chunk), patch_size=cfg.patch_size, stride=cfg.stride,
                           pretrain_dim=cfg.pretrain_dim, target_dim=cfg.target_dim, dtype=jnp.dtype(cfg.dtype))
        out.append(np.asarray(jax.device_get(feats))[: min(size, n - i)])
    return np.concatenate(out)


def score_searched(cfg: PatchCoreConfig, index, parts) -> tuple[np.ndarray, np.ndarray]:
    """Image scores `(N,)` and maps `(N, crop, crop)` from `CategoryWork.search`'s batches, with
    `cfg`'s k, b and sigma: Eq. 6/7 as the executor computes them (`scoring.scores_from_neighbours`)."""
    scores, maps = [], []
    for n, feats, dist, idx in parts:
        b, h, w, d = feats.shape
        s, patch = scoring.image_scores_from_neighbours(index, feats.reshape(b, h * w, d), dist, idx,
                                                        num_neighbors=cfg.num_neighbors,
                                                        num_nn=cfg.anomaly_scorer_num_nn, query_block=256)
        m = fitted_lib.anomaly_maps(patch, (h, w), cfg)
        s, m = jax.device_get((s, m))
        if not (np.isfinite(s).all() and np.isfinite(m).all()):
            raise ValueError("scores: NaN or infinite scores; the features overflow float32 or are NaN")
        scores.append(np.asarray(s, np.float32)[:n])
        maps.append(np.asarray(m, np.float32)[:n])
    return np.concatenate(scores), np.concatenate(maps)
