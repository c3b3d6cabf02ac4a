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
  `N_b(m*)` there and applies `scoring.reweighted`, the model's own Eq. 7 (its stable argsort over
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
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax._src.io import atomic, model_files, onnx_rewrites
from patchcore_jax._src.io.export_format import (
    BLOCK_ROWS, FORMAT, FORMAT_VERSION, FORMATS, INPUT_NAME, MAGIC, ONNX_METADATA_KEY, ONNX_OPSET, OUTPUT_NAMES, PLATFORMS,
    ExportError, canonical, onnx_session, seal,
)
from patchcore_jax._src.model.images import display
from patchcore_jax._src.stages import scoring, segmentation
from patchcore_jax._src.stages.search import brute as neighbors

_HIGHEST = jax.lax.Precision.HIGHEST

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
    try:
        with open(os.path.join(folder, model_files.MANIFEST), "rb") as f:
            return atomic.strict_json(f.read(1 << 20), "manifest").get("format") == model_files.FORMAT
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
    if cfg.anomaly_scorer_num_nn != 1:
        raise ValueError(f"anomaly_scorer_num_nn {cfg.anomaly_scorer_num_nn}: export supports the nearest-distance "
                         "scorer only (k = 1)")
    bank = np.asarray(jax.device_get(model.bank), np.float32)
    size, _ = bank.shape
    nb = cfg.num_neighbors
    # N_b(m) for every bank row m, by the library's exact search (m itself comes first or ties at 0;
    # `scoring.neighbourhood` puts m* first either way). A constant, like the bank.
    hoods = None
    if nb > 1:
        hoods = np.asarray(jax.device_get(neighbors.search(neighbors.build_index(bank), bank, nb)[1]), np.int32)
    centre = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    rows_np = bank - centre
    norms_np = np.einsum("nd,nd->n", rows_np, rows_np, dtype=np.float64).astype(np.float32)
    state = model.extractor.state
    embed = model.embed_fn
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
        # Eq. 6/7 are scoring's own; this program plugs in its search: N_b(m) is a constant table.
        scores = scoring.scores_from_nearest(
            patch_scores, best_idx.reshape(b, h * w), queries.reshape(b, h * w, d), num_neighbors=nb,
            neighbours_of=lambda m: jnp.asarray(hoods)[m],
            distances_to=lambda q, hood: jnp.sqrt(jnp.sum(jnp.square(rows[hood] - q[:, None, :]), axis=2)))
        maps = segmentation.anomaly_maps_unchecked(patch_scores.reshape(b, h, w), out_size=out_size, sigma=cfg.sigma)
        return scores.astype(jnp.float32), maps.astype(jnp.float32)

    return serve


def _input_spec(model, batch: int | None) -> jax.ShapeDtypeStruct:
    c = model.config.crop
    lead = jax.export.symbolic_shape("B") if batch is None else (batch,)
    return jax.ShapeDtypeStruct((*lead, c, c, 3), jnp.uint8)



def _metadata(model, program: str, batch: int | None) -> dict:
    from patchcore_jax._src.version import __version__

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
        "library_version": __version__,
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
    fn = onnx_rewrites.for_onnx(serving_function(model, block_rows=block_rows), crop)
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
        meta.update(extra, payload_bytes=len(payload), payload_sha256=atomic.sha256(payload))
        if verify:
            exported = jax.export.deserialize(bytearray(payload))
            meta["verification"] = _agreement(model, lambda x: jax.device_get(exported.call(x)), batch)
        meta = seal(meta)
        data = MAGIC + canonical(meta) + b"\n" + payload
    else:
        proto, extra = _onnx_program(model, batch, block_rows)
        graph = proto.graph.SerializeToString(deterministic=True)
        meta.update(extra, graph_sha256=atomic.sha256(graph))
        if verify:
            # On the CPU: a GPU provider may compute in TF32, which says nothing about the program.
            session = onnx_session(proto.SerializeToString(), ["CPUExecutionProvider"])
            meta["verification"] = _agreement(model, lambda x: session.run(list(OUTPUT_NAMES), {INPUT_NAME: x}), batch)
        meta = seal(meta)
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, canonical(meta).decode("ascii")
        data = proto.SerializeToString()
    atomic.write_new(destination, data)
    return meta



