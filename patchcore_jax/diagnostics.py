"""Agreement of a fitted model's stages with the array-API reference (the one importer of `reference`)."""

from patchcore_jax._src.app.diagnostics import (  # noqa: F401 -- the public face
    reference_agreement,
)

__all__ = ["reference_agreement"]
