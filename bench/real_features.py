"""Banks of real PatchCore features for the search benchmarks, built once and cached as .npy files.

The features are the model's own: WRN50-2 layer2 + layer3 aggregated to 1024 dims on 224 crops of the
synthetic woven textures (`patchcore_jax.data.make_synthetic`). The backbone is RANDOMLY initialised
(seed 0): no pretrained weights can be had on these machines, so the geometry is that of random
convolutional features of real-looking textures, not of ImageNet features. The bank is the greedy
coreset (projection 128, 10 start points, seed 0) of all training patches; the queries are the patches
of the test images (good and defective).

    python -m bench.real_features --train 250 --fraction 0.1     # writes the cache, prints its path

The cache directory is `$PATCHCORE_BENCH_CACHE` or `.benchmarks/real-features` (ignored by git).
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np

CACHE = os.environ.get("PATCHCORE_BENCH_CACHE", os.path.join(".benchmarks", "real-features"))


def paths(n_train: int, fraction: float) -> tuple[str, str]:
    stem = os.path.join(CACHE, f"wrn50-synthetic-{n_train}-{int(round(fraction * 1000))}pm")
    return stem + "-bank.npy", stem + "-queries.npy"


def build(n_train: int = 250, fraction: float = 0.1, n_test: int = 8, seed: int = 0) -> tuple[str, str]:
    """Embeds `n_train` training and `n_test` test images, runs the coreset, writes both arrays."""
    import jax.numpy as jnp

    from patchcore_jax._src.stages import coreset
    from patchcore_jax._src.model.config import PatchCoreConfig
    from patchcore_jax.data import make_synthetic
    from patchcore_jax._src.api.patchcore import PatchCore

    bank_path, query_path = paths(n_train, fraction)
    if os.path.exists(bank_path) and os.path.exists(query_path):
        return bank_path, query_path
    os.makedirs(CACHE, exist_ok=True)
    data = make_synthetic(seed=seed, n_train=n_train, n_test_good=n_test // 2, n_test_defect=n_test - n_test // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PatchCore(PatchCoreConfig(seed=seed), progress=False)
    def embed(images):
        return np.asarray(model.embed_crops(np.stack([model.prepare(x) for x in images]))).reshape(-1, 1024)

    feats = np.concatenate([embed(data["train"][i : i + 8]) for i in range(0, n_train, 8)])
    queries = embed(data["test"])
    n = len(feats)
    starts = tuple(np.random.default_rng(seed).choice(n, size=10, replace=False).tolist())
    proj = coreset.random_projection(seed, 1024, 128)
    idx = np.sort(np.asarray(coreset.greedy_coreset(jnp.asarray(feats), int(n * fraction), projection=proj,
                                                    start_indices=starts)))
    np.save(bank_path, feats[idx])
    np.save(query_path, queries)
    return bank_path, query_path


def load(n_train: int = 250, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    bank_path, query_path = build(n_train, fraction)
    return np.load(bank_path), np.load(query_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=250)
    parser.add_argument("--fraction", type=float, default=0.1)
    args = parser.parse_args()
    for p in build(args.train, args.fraction):
        print(p, np.load(p, mmap_mode="r").shape)
