"""PatchCore's configuration."""

from patchcore_jax._src.model.config import (  # noqa: F401 -- the public face
    GEOMETRIES,
    MAX_SEED,
    MAX_SIZE,
    SEARCHES,
    PatchCoreConfig,
)

__all__ = ["GEOMETRIES", "MAX_SEED", "MAX_SIZE", "SEARCHES", "PatchCoreConfig"]
