"""Loading an export back: `load_exported(path)` checks a StableHLO or ONNX file written by `export`
and returns an `ExportedModel` that runs it."""

from __future__ import annotations

import os
import stat

import jax
import numpy as np

from patchcore_jax._src.io import atomic
from patchcore_jax._src.io.export_format import (
    FORMAT, FORMAT_VERSION, INPUT_NAME, MAGIC, MAX_HEADER, MAX_ONNX_BYTES, ONNX_METADATA_KEY, OUTPUT_NAMES, ExportFileError, canonical,
    onnx_session,
)
from patchcore_jax._src.model.images import display


# -- loading ------------------------------------------------------------------------------------------
class ExportedModel:
    """An export read back by `load_exported`: `scores, maps = exported(crops)`.

    Attributes: `path`; `program` ("stablehlo" or "onnx"); `metadata` (the dict written at export:
    input and output shapes, settings, threshold, agreement measured at export); `batch` (None when
    symbolic); `crop`; `exported` (the `jax.export.Exported`, StableHLO only).
    """

    def __init__(self, path: str, program: str, metadata: dict, *, exported=None, onnx_bytes: bytes | None = None):
        self.path, self.program, self.metadata = path, program, metadata
        self.exported = exported
        self._onnx_bytes = onnx_bytes
        self._session = None
        self._call = jax.jit(exported.call) if exported is not None else None
        shape = metadata["input"]["shape"]
        self.batch = None if shape[0] == "B" else shape[0]
        self.crop = shape[1]

    def __repr__(self) -> str:
        shape = self.metadata["input"]["shape"]
        return f"ExportedModel({display(self.path)!r}, program={self.program!r}, input={shape})"

    def __call__(self, crops) -> tuple[np.ndarray, np.ndarray]:
        """uint8 crops `(B, crop, crop, 3)` -> image scores `(B,)`, anomaly maps `(B, crop, crop)`, float32."""
        crops = np.asarray(crops)
        c = self.crop
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (c, c, 3) or crops.shape[0] < 1 \
                or (self.batch is not None and crops.shape[0] != self.batch):
            lead = "B" if self.batch is None else self.batch
            raise ValueError(f"crops: expected uint8 crops of shape ({lead}, {c}, {c}, 3) (see PatchCore.prepare), "
                             f"got {crops.dtype} {crops.shape}")
        if self.program == "stablehlo":
            scores, maps = jax.device_get(self._call(crops))
        else:
            if self._session is None:
                self._session = onnx_session(self._onnx_bytes)
            scores, maps = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: crops})
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)


def _fail(where: str, what: str):
    raise ExportFileError(f"{where}: {what}")


def _parse_metadata(raw, where: str, program: str) -> dict:
    meta = atomic.strict_json(bytes(raw), f"{where}: its metadata", ExportFileError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        _fail(where, "not a patchcore-jax export")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        _fail(where, f"export format version {version!r} is not read by this library (it reads {FORMAT_VERSION})")
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    if meta.get("metadata_sha256") != atomic.sha256(canonical(body)):
        _fail(where, "its metadata does not match its own checksum (modified or damaged)")
    if meta.get("program") != program:
        _fail(where, f"its metadata describes a {meta.get('program')!r} program, but the file holds {program}")
    shape = meta.get("input", {}).get("shape") if isinstance(meta.get("input"), dict) else None
    if not (isinstance(shape, list) and len(shape) == 4 and (shape[0] == "B" or _is_size(shape[0]))
            and _is_size(shape[1]) and shape[1] == shape[2] and shape[3] == 3):
        _fail(where, f"its metadata's input shape is not [B or batch, crop, crop, 3]: {meta.get('input')!r}")
    return meta


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 20


def read_metadata(path) -> dict:
    """The metadata of an export (input and output shapes, settings, threshold), checked as
    `load_exported` checks the whole file."""
    return load_exported(path).metadata


def load_exported(path) -> ExportedModel:
    """Reads an export written by `export_model`, StableHLO or ONNX (by its content, not its name).

    Refuses with `ExportFileError`, naming the file, anything else: a truncated or altered file
    (sizes and sha256 sums recorded at export), another kind of file, another format version. ONNX
    files need the `onnx` package to be read and `onnxruntime` to be run.
    """
    absolute = os.path.abspath(os.fsdecode(path))
    where = display(os.fsdecode(path))
    try:
        st = os.stat(absolute)
        if stat.S_ISDIR(st.st_mode):
            _fail(where, "is a folder, not an exported program")
        if not stat.S_ISREG(st.st_mode):
            _fail(where, "not a regular file")
        with open(absolute, "rb") as f:
            head = f.read(len(MAGIC) + MAX_HEADER)
            if head.startswith(MAGIC):
                return _load_stablehlo(absolute, f, head, os.fstat(f.fileno()).st_size, where)
            if not head or MAGIC.startswith(head):
                _fail(where, "empty or truncated (it ends inside the export's first line)")
            size = os.fstat(f.fileno()).st_size
            if size > MAX_ONNX_BYTES:  # checked before the rest is read: memory stays bounded
                _fail(where, f"{size} bytes: not a patchcore-jax export (an ONNX model is at most {MAX_ONNX_BYTES})")
            data = head + f.read(MAX_ONNX_BYTES + 1 - len(head))
    except FileNotFoundError:
        _fail(where, "no such file")
    except OSError as err:
        _fail(where, f"cannot be read ({err.strerror})")
    return _load_onnx(absolute, data, where)


def _load_stablehlo(path: str, f, head: bytes, size: int, where: str) -> ExportedModel:
    end = head.find(b"\n", len(MAGIC))
    if end < 0:
        _fail(where, "truncated or damaged: its metadata line is incomplete")
    meta = _parse_metadata(head[len(MAGIC):end], where, "stablehlo")
    expected = meta.get("payload_bytes")
    if not (isinstance(expected, int) and not isinstance(expected, bool) and expected > 0):
        _fail(where, f"its metadata's payload_bytes is not a size: {expected!r}")
    if size - end - 1 != expected:  # checked before the program is read: memory stays bounded
        _fail(where, f"truncated or damaged: the program holds {size - end - 1} bytes, the export wrote {expected}")
    f.seek(end + 1)
    payload = f.read(expected + 1)
    if len(payload) != expected:
        _fail(where, f"changed while it was read: the program holds {len(payload)} bytes, the export wrote {expected}")
    if atomic.sha256(payload) != meta.get("payload_sha256"):
        _fail(where, "its program's checksum differs from the one recorded at export (modified or damaged)")
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception as err:  # a format of another JAX version, for one
        _fail(where, f"jax.export cannot read its program ({type(err).__name__}: {err})")
    return ExportedModel(path, "stablehlo", meta, exported=exported)


def _load_onnx(path: str, data: bytes, where: str) -> ExportedModel:
    try:
        import onnx
    except ImportError:
        _fail(where, "not a patchcore-jax StableHLO export; to read it as an ONNX export, install the onnx "
                     "package (pip install 'patchcore-jax[export]')")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:
        _fail(where, "not a patchcore-jax export (neither a StableHLO export nor a readable ONNX model; "
                     "truncated, or another kind of file)")
    props = {p.key: p.value for p in proto.metadata_props}
    if ONNX_METADATA_KEY not in props:
        _fail(where, "not a patchcore-jax export (no patchcore-jax metadata; another file, or an ONNX export "
                     "truncated before its metadata)")
    meta = _parse_metadata(props[ONNX_METADATA_KEY].encode("utf-8"), where, "onnx")
    outside = _external_references(proto.graph)
    if outside:
        _fail(where, f"refers to data outside the file ({', '.join(sorted(outside)[:3])}); a patchcore-jax export "
                     "is self-contained and is never read with external data")
    if atomic.sha256(proto.graph.SerializeToString(deterministic=True)) != meta.get("graph_sha256"):
        _fail(where, "its graph's checksum differs from the one recorded at export (modified or damaged)")
    return ExportedModel(path, "onnx", meta, onnx_bytes=data)


def _external_references(graph) -> set[str]:
    """The external-data locations named anywhere in an ONNX graph: initializers, sparse initializers,
    tensor attributes of nodes, and subgraphs, recursively."""
    found = set()

    def tensor(t):
        if t.data_location == 1 or len(t.external_data):  # TensorProto.EXTERNAL
            found.update([e.value for e in t.external_data if e.key == "location"] or [t.name or "a tensor"])

    def walk(g):
        for t in g.initializer:
            tensor(t)
        for sp in g.sparse_initializer:
            tensor(sp.values)
            tensor(sp.indices)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(graph)
    return found
