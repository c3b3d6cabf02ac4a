"""Export of a fitted model as one self-contained StableHLO or ONNX program, and loading it back."""

from patchcore_jax._src.io.export import (RTOL, ATOL, check_batch, check_destination, check_format, export_model,
                                          missing_onnx_packages, serving_function)
from patchcore_jax._src.io.export_format import (BLOCK_ROWS, FORMAT, FORMAT_VERSION, FORMATS, INPUT_NAME, MAGIC,
                                                 ONNX_METADATA_KEY, ONNX_OPSET, OUTPUT_NAMES, PLATFORMS, ExportError,
                                                 ExportFileError)
from patchcore_jax._src.io.exported import ExportedModel, load_exported, read_metadata

__all__ = ["ATOL", "BLOCK_ROWS", "FORMAT", "FORMAT_VERSION", "FORMATS", "INPUT_NAME", "MAGIC", "ONNX_METADATA_KEY",
           "ONNX_OPSET", "OUTPUT_NAMES", "PLATFORMS", "RTOL", "ExportError", "ExportFileError", "ExportedModel",
           "check_batch", "check_destination", "check_format", "export_model", "load_exported",
           "missing_onnx_packages", "read_metadata", "serving_function"]
