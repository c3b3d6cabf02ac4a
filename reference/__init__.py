"""The readable NumPy/SciPy oracle of PatchCore's numerics (float64, never imports JAX).

Functions and meanings follow the shared numerics contract; `patchcore_jax` exposes the same names.
"""

from reference.aggregate import adaptive_avg_pool1d, aggregate_patches, bilinear_resize, unfold
from reference.coreset import covering_radius, greedy_coreset, random_projection
from reference.neighbors import approximate_nearest_neighbors, nearest_neighbors
from reference.scoring import image_scores
from reference.segmentation import anomaly_maps

__all__ = [
    "adaptive_avg_pool1d",
    "aggregate_patches",
    "anomaly_maps",
    "approximate_nearest_neighbors",
    "bilinear_resize",
    "covering_radius",
    "greedy_coreset",
    "image_scores",
    "nearest_neighbors",
    "random_projection",
    "unfold",
]
