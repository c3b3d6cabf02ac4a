"""Diagnostics: the JAX stages held against the float64 reference on real backbone features.

The only module of the product that imports the oracle (`reference`), and only to compare.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.stages import aggregate
from patchcore_jax._src.stages import coreset
from patchcore_jax._src.stages import scoring
from patchcore_jax._src.stages import segmentation
from patchcore_jax._src.model.fitted import normalise


def reference_agreement(model, train_images, test_images, *, max_train: int = 6, max_test: int = 4) -> dict:
    """Runs the JAX stages and the float64 NumPy reference on the *same* backbone features of a few
    images (aggregation -> coreset with the same projection and start points -> Eq. 7 scores -> maps)
    and reports how far apart they land. The backbone is shared: this checks the PatchCore numerics.

    `train_images`, `test_images`: sequences of single images or batches (as `PatchCore.fit` takes).
    """
    import reference

    cfg = model.config

    def backbone_features(images, limit):
        crops = np.stack([model.prepare(images[i], name=f"images[{i}]") for i in range(min(limit, len(images)))])
        feats = model.extractor(normalise(jnp.asarray(crops)).astype(jnp.dtype(cfg.dtype)))
        return [np.asarray(feats[name], np.float32) for name in cfg.layers]

    opts = dict(patch_size=cfg.patch_size, stride=cfg.stride, pretrain_dim=cfg.pretrain_dim, target_dim=cfg.target_dim)
    train_maps, test_maps = backbone_features(train_images, max_train), backbone_features(test_images, max_test)
    bank_j = np.asarray(aggregate.aggregate_patches(train_maps, **opts)).reshape(-1, cfg.target_dim)
    bank_r = reference.aggregate_patches(train_maps, **opts).reshape(-1, cfg.target_dim)
    feats_j = np.asarray(aggregate.aggregate_patches(test_maps, **opts))
    feats_r = reference.aggregate_patches(test_maps, **opts)
    b, h, w, d = feats_r.shape

    n = len(bank_r)
    num = coreset.coreset_size(n, cfg.coreset_fraction)
    starts = coreset.start_points(cfg.seed, n, cfg.num_starts)
    proj = None
    if cfg.projection_dim:
        proj = np.asarray(coreset.random_projection(jax.random.key(cfg.seed), d, cfg.projection_dim))
    idx_j = np.asarray(coreset.greedy_coreset(jnp.asarray(bank_j), num, projection=proj, start_indices=starts))
    idx_r = reference.greedy_coreset(bank_r, num, projection=proj, start_indices=starts)
    radius_j = reference.covering_radius(bank_r, idx_j, projection=proj)
    radius_r = reference.covering_radius(bank_r, idx_r, projection=proj)

    nb, knn = min(cfg.num_neighbors, num), min(cfg.anomaly_scorer_num_nn, num)  # a few images: a small bank
    s_j, p_j = scoring.image_scores(jnp.asarray(bank_j[idx_j]), feats_j.reshape(b, h * w, d), num_neighbors=nb,
                                    anomaly_scorer_num_nn=knn)
    s_r, p_r = reference.image_scores(bank_r[idx_r], feats_r.reshape(b, h * w, d), num_neighbors=nb,
                                      anomaly_scorer_num_nn=knn)
    m_j = np.asarray(segmentation.anomaly_maps(p_j.reshape(b, h, w), (cfg.crop, cfg.crop), sigma=cfg.sigma))
    m_r = reference.anomaly_maps(p_r.reshape(b, h, w), (cfg.crop, cfg.crop), sigma=cfg.sigma)

    def rel(a, r):
        return float(np.max(np.abs(np.asarray(a, np.float64) - r)) / max(np.max(np.abs(r)), 1e-30))

    return {
        "images": {"train": len(train_maps[0]), "test": b},
        "features_max_rel_diff": rel(feats_j, feats_r),
        "coreset_same_indices": float(np.mean(idx_j == idx_r)),
        "coreset_radius_rel_diff": abs(radius_j - radius_r) / max(radius_r, 1e-30),
        "image_scores_max_rel_diff": rel(s_j, s_r),
        "anomaly_maps_max_rel_diff": rel(m_j, m_r),
    }
