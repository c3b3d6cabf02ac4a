"""Export of a fitted model as one self-contained StableHLO or ONNX program, and loading it back."""

from patchcore_jax._src.io.export import export_model, missing_onnx_packages, serving_function
from patchcore_jax._src.io.export_format import FORMATS, ExportError, ExportFileError
from patchcore_jax._src.io.exported import ExportedModel, load_exported, read_metadata

__all__ = ["FORMATS", "ExportError", "ExportFileError", "ExportedModel", "export_model", "load_exported",
           "missing_onnx_packages", "read_metadata", "serving_function"]
