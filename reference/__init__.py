"""The readable oracle of PatchCore's numerics, written against the Python array API standard.

Every function takes arrays of any standard namespace (NumPy, JAX, PyTorch, array_api_strict, ...)
and returns arrays of the caller's namespace, computing in float64 where the namespace has it. It never
imports JAX. Functions and meanings follow the shared numerics contract; `patchcore_jax` exposes the
same names.
"""

from reference.aggregate import adaptive_avg_pool1d, aggregate_patches, bilinear_resize, unfold
from reference.coreset import covering_radius, greedy_coreset, random_projection
from reference.neighbors import approximate_nearest_neighbors, nearest_neighbors
from reference.scoring import image_scores
from reference.segmentation import anomaly_maps, gaussian_blur_1d

__all__ = [
    "adaptive_avg_pool1d",
    "aggregate_patches",
    "anomaly_maps",
    "approximate_nearest_neighbors",
    "bilinear_resize",
    "covering_radius",
    "gaussian_blur_1d",
    "greedy_coreset",
    "image_scores",
    "nearest_neighbors",
    "random_projection",
    "unfold",
]
