"""Ensembles of PatchCore models, as the published best results use them (the public face)."""

from patchcore_jax._src.api.ensemble import PatchCoreEnsemble, combine_over_set

__all__ = ["PatchCoreEnsemble", "combine_over_set"]
