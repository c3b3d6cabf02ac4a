"""PatchCore anomaly detection in JAX: the numerics contract's functions, jit-compiled."""

from patchcore_jax import metrics
from patchcore_jax.aggregate import aggregate_patches
from patchcore_jax.clustered import ClusteredIndex, build_clustered_index
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.coreset import greedy_coreset, random_projection
from patchcore_jax.ensemble import PatchCoreEnsemble
from patchcore_jax.model import PatchCore
from patchcore_jax.persistence import ModelFileError, load
from patchcore_jax.neighbors import BankIndex, approximate_nearest_neighbors, build_index, nearest_neighbors, search
from patchcore_jax.scoring import image_scores, image_scores_from_index
from patchcore_jax.segmentation import anomaly_maps

__version__ = "0.2.0"

__all__ = [
    "BankIndex",
    "ClusteredIndex",
    "ModelFileError",
    "PatchCore",
    "PatchCoreConfig",
    "PatchCoreEnsemble",
    "aggregate_patches",
    "anomaly_maps",
    "approximate_nearest_neighbors",
    "build_clustered_index",
    "build_index",
    "greedy_coreset",
    "image_scores",
    "image_scores_from_index",
    "load",
    "metrics",
    "nearest_neighbors",
    "random_projection",
    "search",
]
