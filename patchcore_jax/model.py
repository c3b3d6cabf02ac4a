"""The PatchCore model, its configuration and its decisions (the public face)."""

from patchcore_jax._src.api.patchcore import PatchCore
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.model.detector import CALIBRATION_QUANTILES, Prediction, Threshold
from patchcore_jax._src.io.model_files import ModelFileError

__all__ = ["CALIBRATION_QUANTILES", "ModelFileError", "PatchCore", "PatchCoreConfig", "Prediction", "Threshold"]
