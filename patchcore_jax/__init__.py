"""PatchCore anomaly detection in JAX: the numerics contract's functions, jit-compiled, and the model.

The public face: everything here is re-exported from `patchcore_jax._src`, whose layers point one way
(app -> api -> io -> run -> model -> stages).
"""

from patchcore_jax._src.version import __version__


# The face is loaded on first use (PEP 562), so `patchcore-jax --help` and `import patchcore_jax` do not
# import JAX; `patchcore_jax.PatchCore` (or `from patchcore_jax import PatchCore`) loads it all at once.
def _load_face() -> dict:
    import patchcore_jax.metrics as metrics
    from patchcore_jax._src.api.ensemble import PatchCoreEnsemble
    from patchcore_jax._src.api.loading import load
    from patchcore_jax._src.api.patchcore import PatchCore
    from patchcore_jax._src.app.sweep_run import sweep
    from patchcore_jax._src.io.model_files import ModelFileError
    from patchcore_jax._src.model.config import PatchCoreConfig
    from patchcore_jax._src.stages.aggregate import aggregate_patches
    from patchcore_jax._src.stages.coreset import greedy_coreset, random_projection
    from patchcore_jax._src.stages.scoring import image_scores, image_scores_from_index
    from patchcore_jax._src.stages.search.brute import BankIndex, approximate_nearest_neighbors, build_index, nearest_neighbors
    from patchcore_jax._src.stages.search.clustered import ClusteredIndex, build_clustered_index
    from patchcore_jax._src.stages.search.index import search
    from patchcore_jax._src.stages.segmentation import anomaly_maps
    return {name: value for name, value in locals().items() if name in __all__}


def __getattr__(name):
    if name in __all__:
        globals().update(_load_face())
        return globals()[name]
    raise AttributeError(f"module 'patchcore_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "BankIndex",
    "ClusteredIndex",
    "ModelFileError",
    "PatchCore",
    "PatchCoreConfig",
    "PatchCoreEnsemble",
    "__version__",
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
    "sweep",
]
