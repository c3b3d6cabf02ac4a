"""A fitted model as one self-contained program: StableHLO (`jax.export`) or ONNX.

The contract, the same for both formats:
- input `crops`: uint8 `(B, crop, crop, 3)`, RGB, channels last, each image already resized and
  centre-cropped (or squashed) exactly as `PatchCore.prepare` does it;
- outputs `scores`: float32 `(B,)`, the image scores (Eq. 7), and `maps`: float32 `(B, crop, crop)`,
  the anomaly maps; equal to `PatchCore.score_crops` on the same crops, to float32 rounding.
Backbone weights, the memory bank and every setting are constants inside the program. `B` is
symbolic (any batch) unless a fixed `batch` is asked for.

The exported computation is `PatchCore.score_crops`'s, written for export (`serving_function`):
- the backbone and the patch aggregation are the model's own jitted function;
- the nearest bank row of every patch (Eq. 6's inner min) is searched by brute force over fixed
  blocks of the bank, unrolled at trace time: the ranking of `neighbors.search` (the norm expansion on
  centred rows, argmin, ties to the lower index), then the exact distance `||q - b||` of the chosen
  row. No loop, no sort, no top-k: per block a matrix product, an ArgMin and a gather, which every
  runtime has (the model's tiled search is a `lax.map` of `lax.scan`s with `lax.top_k` merges);
- Eq. 7's neighbourhood `N_b(m)` of a bank row depends on the bank alone, so it is searched once at
  export time, with the library's exact search, into an `(M, b)` table; the program looks up
  `N_b(m*)` there and applies `scoring._reweighted`, the model's own Eq. 7 (its stable argsort over
  the b + 1 candidates becomes one small TopK in ONNX);
- the maps are `segmentation`'s own upsampling and blur.
For ONNX (`_for_onnx`) the function is first traced here, for one crop, to plain `lax` primitives,
and `jax.vmap`ped over the batch when the converter traces it, so its tracing-time replacements of
Flax layers do not apply (its BatchNorm replacement drops a layout transpose in the ResNet
bottleneck: ONNX Runtime refuses the graph). Two primitives are rewritten in standard operations:
`reduce_window` max pooling (the ResNet stem) as the maximum of its strided window slices, since the
converter emits a MaxPool over all four NHWC axes, which ONNX Runtime refuses; and `pad` as a
concatenation with constant blocks, since the converter's Pad cannot carry a symbolic batch.

Files:
- StableHLO: `MAGIC`, one line of JSON metadata (`read_metadata`), then the bytes of
  `jax.export.Exported.serialize()`; the metadata records their length and sha256, the calling
  convention version and the platforms. With JAX alone:
      with open(path, "rb") as f:
          f.readline(); meta = json.loads(f.readline())
          exported = jax.export.deserialize(bytearray(f.read()))
      scores, maps = exported.call(crops)
- ONNX: a plain `.onnx` model (input `crops`, outputs `scores`, `maps`); the metadata is in its
  `metadata_props` under `patchcore_jax`. `onnxruntime.InferenceSession(path).run(None, {"crops": crops})`.
`load_exported(path)` reads either, refuses (`ExportFileError`, naming the file) anything that is not
a complete export of this library, and returns an `ExportedModel` that runs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from patchcore_jax import neighbors, scoring, segmentation
from patchcore_jax.data.images import display

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
_HIGHEST = jax.lax.Precision.HIGHEST
_MAX_HEADER = 1 << 20


class ExportFileError(ValueError):
    """A file that is not a complete, unaltered export of this library (the message names it)."""


class ExportError(RuntimeError):
    """The export could not be made (the converter failed, or the program disagrees with the model)."""


# -- arguments ----------------------------------------------------------------------------------------
def check_format(format) -> str:
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    return format


def check_batch(batch) -> int | None:
    """None (a symbolic batch: any B >= 1) or a fixed batch size >= 1."""
    if batch is None:
        return None
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not 1 <= batch <= 1 << 20:
        raise ValueError(f"batch: expected None or an integer >= 1, got {batch!r}")
    return int(batch)


def check_destination(path) -> str:
    """The absolute path of a new file to be written; ValueError (naming it) for an existing path, a
    folder name, or a location that cannot be written. An export never replaces anything."""
    path = os.fsdecode(path)
    where = display(path)
    if not path or path.endswith(("/", os.sep)):
        raise ValueError(f"{where or repr(path)}: expected a file name for the export")
    absolute = os.path.abspath(path)
    if os.path.lexists(absolute):
        raise ValueError(f"{where}: exists; refusing to overwrite it (give a new file name)")
    parent = os.path.dirname(absolute)
    if not os.path.isdir(parent):
        raise ValueError(f"{where}: its folder {display(parent)} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: its folder {display(parent)} is not writable")
    if _is_model_folder(parent):
        raise ValueError(f"{where}: is inside the model folder {display(parent)}, which holds only the model's own "
                         "files; write the export elsewhere")
    return absolute


def _is_model_folder(folder: str) -> bool:
    from patchcore_jax import persistence

    try:
        with open(os.path.join(folder, persistence.MANIFEST), "rb") as f:
            return json.loads(f.read(1 << 20)).get("format") == persistence.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def missing_onnx_packages() -> list[str]:
    """What the ONNX export lacks here of the `export` extra (jax2onnx, onnx, onnxruntime)."""
    import importlib.util

    return [name for name in ("jax2onnx", "onnx", "onnxruntime") if importlib.util.find_spec(name) is None]


# -- the exported computation -------------------------------------------------------------------------
def serving_function(model, *, block_rows: int = BLOCK_ROWS) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """The exported computation as a JAX function: uint8 crops `(B, crop, crop, 3)` -> image scores
    `(B,)` and anomaly maps `(B, crop, crop)`, float32, with every array of the model a constant.

    It traces for any `B` (also a symbolic one) and agrees with `model.score_crops` to float32
    rounding; see the module docstring for how its search differs in form, not in result.
    """
    if model.bank is None:
        raise ValueError("model: not fitted; call fit(images) or PatchCore.load(path) first")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows: expected a positive integer, got {block_rows!r}")
    cfg = model.config
    bank = np.asarray(jax.device_get(model.bank), np.float32)
    size, _ = bank.shape
    nb = cfg.num_neighbors
    # N_b(m) for every bank row m, by the library's exact search (m itself comes first or ties at 0;
    # `scoring._neighbourhood` puts m* first either way). A constant, like the bank.
    hoods = None
    if nb > 1:
        hoods = np.asarray(jax.device_get(neighbors.search(neighbors.build_index(bank), bank, nb)[1]), np.int32)
    centre = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    rows_np = bank - centre
    norms_np = np.einsum("nd,nd->n", rows_np, rows_np, dtype=np.float64).astype(np.float32)
    state = model._extract.state
    embed = model._embed_fn
    out_size = (cfg.crop, cfg.crop)

    def serve(crops):
        rows, norms = jnp.asarray(rows_np), jnp.asarray(norms_np)
        feats = embed(state, crops)
        b, h, w, d = feats.shape
        queries = feats.reshape(b * h * w, d) - jnp.asarray(centre)
        q_sq = jnp.sum(jnp.square(queries), axis=1)
        best_sq = best_idx = None
        # DECISION: the bank is walked in fixed blocks unrolled at trace time (no loop op); within a
        # block argmin keeps the lowest index, across blocks a strict `<` keeps the earlier block, so
        # ties go to the lowest index, as in `neighbors.search`.
        for start in range(0, size, block_rows):
            stop = min(start + block_rows, size)
            sq = q_sq[:, None] + norms[None, start:stop] - 2.0 * jnp.einsum(
                "qd,nd->qn", queries, rows[start:stop], precision=_HIGHEST)
            j = jnp.argmin(sq, axis=1).astype(jnp.int32)
            v = jnp.min(sq, axis=1)
            if best_sq is None:
                best_sq, best_idx = v, j
            else:
                take = v < best_sq
                best_sq, best_idx = jnp.where(take, v, best_sq), jnp.where(take, j + start, best_idx)
        # Exact distances of the chosen rows, so float32 cancellation does not reach the scores.
        patch_scores = jnp.sqrt(jnp.sum(jnp.square(rows[best_idx] - queries), axis=1)).reshape(b, h * w)
        nearest = best_idx.reshape(b, h * w)
        worst = jnp.argmax(patch_scores, axis=1)  # Eq. 6; ties to the lowest patch index
        s_star = jnp.take_along_axis(patch_scores, worst[:, None], 1)[:, 0]
        if nb == 1:
            scores = s_star  # DECISION: b = 1 is the published image score, as in `scoring`
        else:
            m_star = jnp.take_along_axis(nearest, worst[:, None], 1)[:, 0]
            m_test = jnp.take_along_axis(queries.reshape(b, h * w, d), worst[:, None, None], 1)[:, 0]
            hood = jax.vmap(scoring._neighbourhood, in_axes=(0, 0, None))(m_star, jnp.asarray(hoods)[m_star], nb)
            dists = jnp.sqrt(jnp.sum(jnp.square(rows[hood] - m_test[:, None, :]), axis=2))
            scores = jax.vmap(scoring._reweighted)(dists, s_star)
        maps = segmentation._anomaly_maps(patch_scores.reshape(b, h, w), out_size=out_size, sigma=cfg.sigma)
        return scores.astype(jnp.float32), maps.astype(jnp.float32)

    return serve


def _input_spec(model, batch: int | None) -> jax.ShapeDtypeStruct:
    c = model.config.crop
    lead = jax.export.symbolic_shape("B") if batch is None else (batch,)
    return jax.ShapeDtypeStruct((*lead, c, c, 3), jnp.uint8)


# -- ONNX: what the converter cannot take, in standard operations ----------------------------------------
def _pad_by_concat(x, value, *, padding_config):
    """`lax.pad` (no interior padding, no cropping) as a concatenation with constant blocks: the
    converter's Pad cannot carry a symbolic batch dimension through (its output shape must be constant)."""
    if any(lo < 0 or hi < 0 or interior for lo, hi, interior in padding_config):
        return jax.lax.pad(x, value, padding_config)
    for axis, (lo, hi, _) in enumerate(padding_config):
        def block(n, axis=axis, x=x):
            return jnp.broadcast_to(value.astype(x.dtype), (*x.shape[:axis], n, *x.shape[axis + 1:]))

        if lo or hi:
            x = jnp.concatenate(([block(lo)] if lo else []) + [x] + ([block(hi)] if hi else []), axis=axis)
    return x


def _max_pool_by_slices(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
    """`reduce_window(max)` as the maximum of its `prod(window)` strided slices of the -inf padded
    input: the converter emits a MaxPool over all four NHWC axes, which ONNX Runtime refuses."""
    if any(d != 1 for d in base_dilation):
        raise NotImplementedError("reduce_window_max with base dilation is not exported")
    padded = _pad_by_concat(x, jnp.array(-jnp.inf, x.dtype), padding_config=[(lo, hi, 0) for lo, hi in padding])
    out_shape = [(n - (k - 1) * dil - 1) // s + 1
                 for n, k, s, dil in zip(padded.shape, window_dimensions, window_strides, window_dilation)]
    out = None
    for offset in np.ndindex(*window_dimensions):
        start = [o * dil for o, dil in zip(offset, window_dilation)]
        limit = [st + (n - 1) * s + 1 for st, n, s in zip(start, out_shape, window_strides)]
        part = jax.lax.slice(padded, start, limit, window_strides)
        out = part if out is None else jnp.maximum(out, part)
    return out


_REWRITES = {"reduce_window_max": _max_pool_by_slices, "pad": _pad_by_concat}


def _eval_rewritten(jaxpr, consts, *args):
    """Evaluates a jaxpr with the primitives of `_REWRITES` replaced, inlining nested `jit` calls
    (where the backbone's pooling sits); every other equation is bound unchanged."""
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _REWRITES:
            outvals = [_REWRITES[name](*invals, **eqn.params)]
        elif name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outvals = _eval_rewritten(inner.jaxpr, inner.consts, *invals)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)  # jax < 0.7: (subfuns, params)
            outvals = eqn.primitive.bind(*subfuns, *invals, **params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for var, val in zip(eqn.outvars, outvals):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _for_onnx(fn, crop: int):
    """`fn` made convertible: traced here, for one crop, to plain `lax` primitives (outside the
    converter, whose tracing-time replacements of Flax layers mis-convert the ResNet bottleneck's
    BatchNorm), evaluated with `_REWRITES` applied, and mapped over the batch with `jax.vmap`, so the
    batch dimension stays symbolic."""
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.uint8))

    def one(image):
        return tuple(out[0] for out in _eval_rewritten(closed.jaxpr, closed.consts, image[None]))

    return jax.vmap(one)


# -- metadata -----------------------------------------------------------------------------------------
def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _seal(meta: dict) -> dict:
    return {**meta, "metadata_sha256": _sha256(_canonical(meta))}


def _metadata(model, program: str, batch: int | None) -> dict:
    import patchcore_jax

    cfg = model.config
    lead = "B" if batch is None else batch
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "program": program,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [lead, cfg.crop, cfg.crop, 3],
                  "layout": "NHWC, RGB, as PatchCore.prepare gives it"},
        "outputs": [{"name": OUTPUT_NAMES[0], "dtype": "float32", "shape": [lead]},
                    {"name": OUTPUT_NAMES[1], "dtype": "float32", "shape": [lead, cfg.crop, cfg.crop]}],
        "preprocessing": {"geometry": cfg.geometry, "resize": cfg.resize, "crop": cfg.crop,
                          "resample": "PIL bilinear"},
        "config": cfg.to_dict(),
        "bank_shape": [int(s) for s in model.bank.shape],
        "threshold": model.threshold,
        "calibration": model.calibration,
        "library_version": patchcore_jax.__version__,
        "jax_version": jax.__version__,
    }


# -- building -----------------------------------------------------------------------------------------
def _stablehlo_program(model, batch, block_rows) -> tuple[bytes, dict]:
    exported = jax.export.export(jax.jit(serving_function(model, block_rows=block_rows)), platforms=PLATFORMS)(
        _input_spec(model, batch))
    payload = bytes(exported.serialize())
    return payload, {"calling_convention_version": int(exported.calling_convention_version),
                     "platforms": list(exported.platforms)}


@contextlib.contextmanager
def _quiet_converter():
    """The converter logs internal notes at WARNING and its own deprecations; not the user's concern."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _onnx_program(model, batch, block_rows):
    """The ONNX model (a ModelProto, without metadata yet) and the converter's name and version."""
    import jax2onnx

    crop = model.config.crop
    fn = _for_onnx(serving_function(model, block_rows=block_rows), crop)
    spec = jax.ShapeDtypeStruct(("B" if batch is None else batch, crop, crop, 3), jnp.uint8)
    try:
        with _quiet_converter():
            proto = jax2onnx.to_onnx(fn, [spec], model_name="patchcore", opset=ONNX_OPSET,
                                     input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
    except Exception as err:
        raise ExportError(f"jax2onnx {_version('jax2onnx')} could not convert the model: "
                          f"{type(err).__name__}: {err}") from err
    _drop_unused_initializers(proto)
    return proto, {"opset": ONNX_OPSET, "converter": f"jax2onnx {_version('jax2onnx')}"}


def _drop_unused_initializers(proto) -> None:
    """Initializers no node reads (the converter leaves a few), which ONNX Runtime warns about."""
    def inputs(graph):
        for node in graph.node:
            yield from node.input
            for attr in node.attribute:  # subgraphs may read the outer graph's initializers
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from inputs(sub)

    used = set(inputs(proto.graph)) | {o.name for o in proto.graph.output}
    keep = [init for init in proto.graph.initializer if init.name in used]
    if len(keep) != len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _onnx_session(data: bytes, providers=None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(data, options, providers=providers or onnxruntime.get_available_providers())


# The float32 row of the project's agreement table (tests/helpers.py): |a - e| <= ATOL * max(1, max|e|)
# + RTOL * |e|, for the exported program against `score_crops` on the same crops.
RTOL = ATOL = 2e-5


def _agreement(model, run: Callable, batch: int | None) -> dict:
    """Runs the exported program and `model.score_crops` on the same seeded crops; ExportError if
    they differ beyond the float32 tolerance. Returns the measured differences."""
    crop = model.config.crop
    crops = np.random.default_rng(0).integers(0, 256, (batch or 2, crop, crop, 3), dtype=np.uint8)
    want = model.score_crops(crops)
    got = run(crops)
    out = {"crops": int(len(crops))}
    for name, g, e in zip(OUTPUT_NAMES, got, want):
        g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
        if g.shape != e.shape:
            raise ExportError(f"the exported program gives {name} of shape {g.shape}, the model {e.shape}")
        diff = np.abs(g - e)
        out[f"{name}_max_abs_diff"] = float(diff.max())
        out[f"{name}_max_rel_diff"] = float((diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny)).max())
        bound = ATOL * max(1.0, float(np.abs(e).max())) + RTOL * np.abs(e)
        if not np.all(diff <= bound):
            raise ExportError(f"the exported program's {name} differ from the model's by up to {diff.max():.3g} "
                              f"(allowed {bound.max():.3g}); nothing was written")
    return out


def export_model(model, path, *, format: str, batch: int | None = None, block_rows: int = BLOCK_ROWS,
                 verify: bool = True) -> dict:
    """Writes `model` as one program to the new file `path` and returns the metadata written with it.

    Args:
      format: "stablehlo" (`jax.export`, runs with JAX alone on CPU, GPU or TPU) or "onnx" (needs the
        `export` extra: jax2onnx to convert, onnxruntime to check).
      batch: None for a symbolic batch (any B >= 1), or a fixed batch size.
      block_rows: bank rows per block of the exported search (memory `B * P * block_rows` floats).
      verify: run the exported program and `score_crops` on the same seeded crops first and refuse
        (`ExportError`, nothing written) if they differ beyond float32 rounding.
    The file is written to a temporary sibling, then linked into place: `path` must not exist, and an
    existing file is never replaced. See the module docstring for the contract and the file layouts.
    """
    if hasattr(model, "members"):
        raise ValueError("model: an ensemble; export writes one model's program (ensembles are not exported)")
    format = check_format(format)
    batch = check_batch(batch)
    destination = check_destination(path)
    missing = missing_onnx_packages() if format == "onnx" else []
    if missing:
        raise ValueError(f"format onnx: needs {', '.join(missing)}; pip install 'patchcore-jax[export]'")
    if model.bank is None:
        raise ValueError("model: not fitted; call fit(images) or PatchCore.load(path) first")
    meta = _metadata(model, format, batch)
    if format == "stablehlo":
        payload, extra = _stablehlo_program(model, batch, block_rows)
        meta.update(extra, payload_bytes=len(payload), payload_sha256=_sha256(payload))
        if verify:
            exported = jax.export.deserialize(bytearray(payload))
            meta["verification"] = _agreement(model, lambda x: jax.device_get(exported.call(x)), batch)
        meta = _seal(meta)
        data = MAGIC + _canonical(meta) + b"\n" + payload
    else:
        proto, extra = _onnx_program(model, batch, block_rows)
        graph = proto.graph.SerializeToString(deterministic=True)
        meta.update(extra, graph_sha256=_sha256(graph))
        if verify:
            # On the CPU: a GPU provider may compute in TF32, which says nothing about the program.
            session = _onnx_session(proto.SerializeToString(), ["CPUExecutionProvider"])
            meta["verification"] = _agreement(model, lambda x: session.run(list(OUTPUT_NAMES), {INPUT_NAME: x}), batch)
        meta = _seal(meta)
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, _canonical(meta).decode("ascii")
        data = proto.SerializeToString()
    _write_new(destination, data)
    return meta


def _write_new(path: str, data: bytes) -> None:
    """Creates `path` with `data`, atomically and never over an existing file: a temporary sibling,
    fsynced, then hard-linked to the name (which fails if the name appeared meanwhile)."""
    from patchcore_jax.persistence import _fsync_dir, _umask

    parent, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, to what a new file would have
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ValueError(f"{display(path)}: exists; refusing to overwrite it (give a new file name)") from None
        except OSError:  # a file system without hard links: a rename, checked just before
            if os.path.lexists(path):
                raise ValueError(f"{display(path)}: exists; refusing to overwrite it (give a new file name)") from None
            os.rename(tmp, path)
        _fsync_dir(parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


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
                self._session = _onnx_session(self._onnx_bytes)
            scores, maps = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: crops})
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)


def _fail(where: str, what: str):
    raise ExportFileError(f"{where}: {what}")


def _parse_metadata(raw, where: str, program: str) -> dict:
    def no_constants(name):
        raise ValueError(f"{name} is not allowed")

    try:
        meta = json.loads(raw, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError):
        _fail(where, "its metadata is not valid JSON (damaged or truncated)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        _fail(where, "not a patchcore-jax export")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        _fail(where, f"export format version {version!r} is not read by this library (it reads {FORMAT_VERSION})")
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    if meta.get("metadata_sha256") != _sha256(_canonical(body)):
        _fail(where, "its metadata does not match its own checksum (modified or damaged)")
    if meta.get("program") != program:
        _fail(where, f"its metadata describes a {meta.get('program')!r} program, but the file holds {program}")
    return meta


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
            data = f.read()
    except FileNotFoundError:
        _fail(where, "no such file")
    except OSError as err:
        _fail(where, f"cannot be read ({err.strerror})")
    if data.startswith(MAGIC):
        return _load_stablehlo(absolute, data, where)
    if not data or MAGIC.startswith(data):
        _fail(where, "empty or truncated (it ends inside the export's first line)")
    return _load_onnx(absolute, data, where)


def _load_stablehlo(path: str, data: bytes, where: str) -> ExportedModel:
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        _fail(where, "truncated or damaged: its metadata line is incomplete")
    meta = _parse_metadata(data[len(MAGIC):end], where, "stablehlo")
    payload = memoryview(data)[end + 1:]
    expected = meta.get("payload_bytes")
    if len(payload) != expected:
        _fail(where, f"truncated or damaged: the program holds {len(payload)} bytes, the export wrote {expected}")
    if _sha256(payload) != meta.get("payload_sha256"):
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
    meta = _parse_metadata(props[ONNX_METADATA_KEY], where, "onnx")
    if _sha256(proto.graph.SerializeToString(deterministic=True)) != meta.get("graph_sha256"):
        _fail(where, "its graph's checksum differs from the one recorded at export (modified or damaged)")
    return ExportedModel(path, "onnx", meta, onnx_bytes=data)
