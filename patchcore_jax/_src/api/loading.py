"""`patchcore_jax.load`: a model folder back as the object that wrote it."""

from __future__ import annotations

import os

from patchcore_jax._src.api.ensemble import PatchCoreEnsemble
from patchcore_jax._src.api.patchcore import PatchCore, place
from patchcore_jax._src.io import model_files
from patchcore_jax._src.model.fitted import Fitted


def load(path, *, progress=None, mesh=None) -> PatchCore | PatchCoreEnsemble:
    """Reads, verifies and places the model (a `PatchCore`) or ensemble (a `PatchCoreEnsemble`) of a
    folder written by `save`; `ModelFileError` (one line, naming the file) for anything wrong."""
    value = model_files.load_fitted(path)
    folder = os.fsdecode(path)
    if isinstance(value, Fitted):
        return place(value, os.path.join(folder, "backbone.safetensors"), progress=progress, mesh=mesh)
    return PatchCoreEnsemble.from_fitted(value, folder, progress=progress, mesh=mesh)
