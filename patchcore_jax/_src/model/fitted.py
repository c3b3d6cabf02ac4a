"""The fitted model as a value, and the pure functions that embed and score with it.

`Fitted` holds everything a fit produces and a model file stores: the configuration, the backbone's
weights as used, the memory bank, the clustered search index (when the model searches with one), the
calibration statistics, the thresholds, and how many patches the bank was chosen from. It knows
nothing of devices or meshes: `patchcore_jax._src.run.executor` places and runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.model.detector import CALIBRATION_QUANTILES, Threshold
from patchcore_jax._src.stages import aggregate, segmentation

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Nominal patch scores recorded at fit (a seeded sample of training patches against the bank).
CALIBRATION_SAMPLE = 4096


@dataclasses.dataclass(frozen=True, eq=False)
class Fitted:
    """A fitted PatchCore model.

    Attributes:
      config: the settings it was fitted with.
      weights: the backbone's state dict as used at fit (torchvision names and layouts, float32).
      bank: `(M, target_dim)` float32, the coreset memory bank (host).
      clustered_index: the `ClusteredIndex` built for `bank` at fit, or None (searched by brute force).
      calibration: the statistics that fix the score scale (`"fit"`, and `"good_images"` after
        calibration), quantiles keyed by `str(q)`.
      image_threshold, pixel_threshold: the decision thresholds with their rules, or None.
      num_patches_seen: training patches the bank was chosen from.
      weights_sha256: the sha256 of the weights file read at fit, or None.
    """

    config: PatchCoreConfig
    weights: Mapping[str, np.ndarray]
    bank: np.ndarray
    clustered_index: Any
    calibration: dict
    image_threshold: Threshold | None
    pixel_threshold: Threshold | None
    num_patches_seen: int
    weights_sha256: str | None = None

    def replace(self, **changes) -> "Fitted":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, eq=False)
class FittedEnsemble:
    """A fitted ensemble: its members' values and the combined scale's calibration and thresholds."""

    members: tuple[Fitted, ...]
    calibration: dict
    image_threshold: Threshold | None
    pixel_threshold: Threshold | None


def normalise(crops: jax.Array) -> jax.Array:
    """uint8 crops `(B, H, W, 3)` -> float32, ImageNet-normalised (torchvision's ToTensor + Normalize)."""
    return (crops.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def make_embed(apply, config: PatchCoreConfig):
    """The device stage of embedding, a pure jitted function `embed(state, crops)`: uint8 crops
    `(B, crop, crop, 3)` -> patch features `(B, h, w, target_dim)` float32, through the backbone's
    `apply(state, images)` and the patch aggregation."""
    dtype = jnp.dtype(config.dtype)

    @jax.jit
    def embed(state, crops):
        feats = apply(state, normalise(crops).astype(dtype))
        return aggregate.aggregate_linear(
            tuple(feats[name] for name in config.layers), patch_size=config.patch_size, stride=config.stride,
            pretrain_dim=config.pretrain_dim, target_dim=config.target_dim,
        ).astype(jnp.float32)

    return embed


def anomaly_maps(patch_scores: jax.Array, grid: tuple[int, int], config: PatchCoreConfig) -> jax.Array:
    """Patch scores `(B, h * w)` -> anomaly maps `(B, crop, crop)` at the crop's size."""
    b = patch_scores.shape[0]
    return segmentation.anomaly_maps(patch_scores.reshape(b, *grid), (config.crop, config.crop), sigma=config.sigma)


def nominal_calibration(distances: np.ndarray) -> dict:
    """The `"fit"` calibration from the nearest-bank distances of a sample of training patches."""
    dist = np.asarray(distances, np.float64).ravel()
    return {"patch_score_quantiles": {str(q): float(np.quantile(dist, q)) for q in CALIBRATION_QUANTILES},
            "patch_sample": int(len(dist))}


def fit_pixel_threshold(calibration: dict) -> Threshold:
    """The pixel threshold a fit starts with: the largest nominal patch score of the sample."""
    return Threshold(calibration["patch_score_quantiles"]["1.0"],
                     f"fit: the largest nominal patch score of {calibration['patch_sample']} sampled training patches")


def check_bank(bank, config: PatchCoreConfig) -> np.ndarray:
    """A memory bank `(M, target_dim)` as float32, refused (ValueError) when it cannot be searched."""
    bank = np.asarray(bank, np.float32)
    if bank.ndim != 2 or bank.shape[1] != config.target_dim or len(bank) == 0:
        raise ValueError(f"bank: expected shape (M, {config.target_dim}) with M >= 1, got {bank.shape}")
    if not np.isfinite(bank).all():
        raise ValueError("bank: holds NaN or infinite values")
    if len(bank) < config.bank_rows_needed:
        raise ValueError(f"bank: {len(bank)} rows are fewer than num_neighbors / anomaly_scorer_num_nn "
                         f"({config.bank_rows_needed}); fit on more images, raise coreset_fraction or lower them")
    return bank


class Reservoir:
    """A uniform sample of up to `size` rows of a stream (Algorithm R, seeded): the same rows for the
    same stream, whatever its batching, with memory bounded by `size` rows."""

    def __init__(self, size: int, *, seed: int):
        self.size, self.rng, self.seen, self.buffer = size, np.random.default_rng(seed), 0, None

    def feed(self, rows: np.ndarray) -> None:
        if self.buffer is None:
            self.buffer = np.empty((self.size, rows.shape[1]), rows.dtype)
        positions = np.arange(self.seen, self.seen + len(rows))
        fill = positions < self.size
        self.buffer[positions[fill]] = rows[fill]
        if not fill.all():
            # Row t (0-based) replaces slot j ~ U{0..t} when j < size; in stream order, the later wins.
            j = self.rng.integers(0, positions[~fill] + 1)
            late = rows[~fill][j < self.size]
            j = j[j < self.size]
            # NumPy does not promise which of repeated indices wins an assignment: keep the last each.
            _, last_reversed = np.unique(j[::-1], return_index=True)
            last = len(j) - 1 - last_reversed
            self.buffer[j[last]] = late[last]
        self.seen += len(rows)

    def rows(self) -> np.ndarray:
        return self.buffer[: min(self.seen, self.size)]
