"""The export files' format: names, versions, the sealed metadata and the errors (`export` writes
these files, `exported` reads them back)."""

from __future__ import annotations

from patchcore_jax._src.io import atomic

FORMATS = ("stablehlo", "onnx")
FORMAT = "patchcore-jax-export"
FORMAT_VERSION = 1
MAGIC = b"patchcore-jax stablehlo export\n"
INPUT_NAME = "crops"
OUTPUT_NAMES = ("scores", "maps")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
ONNX_OPSET = 17
ONNX_METADATA_KEY = "patchcore_jax"
# Rows of the bank per block of the brute-force search: the distance block is B * P * BLOCK_ROWS
# floats (12.8 MB per 224 px image), whatever the bank's size.
BLOCK_ROWS = 4096
MAX_HEADER = 1 << 20
MAX_ONNX_BYTES = (1 << 31) - 1  # protobuf's limit for one message: no ONNX model file is larger


class ExportFileError(ValueError):
    """A file that is not a complete, unaltered export of this library (the message names it)."""


class ExportError(RuntimeError):
    """The export could not be made (the converter failed, or the program disagrees with the model)."""


# -- metadata -----------------------------------------------------------------------------------------
def canonical(obj) -> bytes:
    return atomic.canonical_json(obj, compact=True)




def seal(meta: dict) -> dict:
    return {**meta, "metadata_sha256": atomic.sha256(canonical(meta))}


def onnx_session(data: bytes, providers=None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(data, options, providers=providers or onnxruntime.get_available_providers())
