"""The contents of a model folder's files, each field type-checked (`model_files` reads and seals the
folder; this module says what its `config.json`, `ensemble.json` and tensors must hold)."""

from __future__ import annotations

import math

import numpy as np

from patchcore_jax._src.io import atomic
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.model.detector import CALIBRATION_QUANTILES, Threshold
from patchcore_jax._src.stages.search.clustered import ClusteredIndex


FORMAT = "patchcore-jax-model"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
FILES = ("backbone.safetensors", "bank.safetensors", "config.json", "index.safetensors")
ENSEMBLE = "ensemble.json"


class ModelFileError(ValueError):
    """A model folder that is missing, incomplete, tampered with, or of another format version."""


def strict_json(data: bytes, where: str):
    return atomic.strict_json(data, where, ModelFileError)


def expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ModelFileError(f"{where}: {what}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_config(raw: bytes, where: str) -> dict:
    """config.json, every field type-checked."""
    meta = strict_json(raw, where)
    keys = {"config", "thresholds", "num_patches_seen", "bank_shape", "calibration", "weights", "library_version"}
    expect(isinstance(meta, dict) and set(meta) == keys, where,
            f"expected exactly the fields {sorted(keys)}, got {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    try:
        meta["config"] = PatchCoreConfig.from_dict(meta["config"], strict=True)
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{where}: {err}") from None
    check_thresholds(meta["thresholds"], where)
    expect(is_int(meta["num_patches_seen"]) and meta["num_patches_seen"] >= 0, where,
            f"num_patches_seen: expected an integer >= 0, got {meta['num_patches_seen']!r}")
    shape = meta["bank_shape"]
    expect(isinstance(shape, list) and len(shape) == 2 and all(is_int(s) and s >= 1 for s in shape)
            and shape[1] == meta["config"].target_dim, where,
            f"bank_shape: expected [M, {meta['config'].target_dim}] with M >= 1, got {shape!r}")
    weights = meta["weights"]
    expect(isinstance(weights, dict) and set(weights) == {"source", "sha256"}
            and all(v is None or isinstance(v, str) for v in weights.values()), where,
            f"weights: expected {{'source': str|null, 'sha256': str|null}}, got {weights!r}")
    expect(isinstance(meta["library_version"], str), where, "library_version: expected a string")
    check_calibration(meta["calibration"], where)
    return meta


def check_thresholds(thresholds, where: str) -> None:
    expect(isinstance(thresholds, dict) and set(thresholds) == {"image", "pixel"}, where,
            f"thresholds: expected {{'image': ..., 'pixel': ...}}, got {thresholds!r}")
    for kind, t in thresholds.items():
        expect(t is None or (isinstance(t, dict) and set(t) == {"value", "rule"} and is_number(t["value"])
                              and isinstance(t["rule"], str)), where,
                f"thresholds.{kind}: expected null or {{'value': a finite number, 'rule': a string}}, got {t!r}")


def check_quantiles(q, keys, where: str, what: str) -> None:
    expect(isinstance(q, dict) and set(q) == keys and all(is_number(v) for v in q.values()), where,
            f"{what}: expected finite numbers for the quantiles {sorted(keys)}")


def check_calibration(cal, where: str) -> None:
    quantiles = {str(q) for q in CALIBRATION_QUANTILES}
    expect(isinstance(cal, dict) and "fit" in cal and set(cal) <= {"fit", "good_images"}, where,
            f"calibration: expected 'fit' (and 'good_images'), got {sorted(cal) if isinstance(cal, dict) else cal!r}")
    fit = cal["fit"]
    expect(isinstance(fit, dict) and set(fit) == {"patch_score_quantiles", "patch_sample"}, where,
            "calibration.fit: expected 'patch_score_quantiles' and 'patch_sample'")
    check_quantiles(fit["patch_score_quantiles"], quantiles, where, "calibration.fit.patch_score_quantiles")
    expect(is_int(fit["patch_sample"]) and fit["patch_sample"] >= 1, where, "calibration.fit.patch_sample: expected an integer >= 1")
    good = cal.get("good_images")
    if good is not None:
        expect(isinstance(good, dict) and set(good) == {"count", "image_score_quantiles", "map_quantiles"}, where,
                "calibration.good_images: expected 'count', 'image_score_quantiles' and 'map_quantiles'")
        expect(is_int(good["count"]) and good["count"] >= 1, where, "calibration.good_images.count: expected an integer >= 1")
        for key in ("image_score_quantiles", "map_quantiles"):
            check_quantiles(good[key], quantiles | {"0.0"}, where, f"calibration.good_images.{key}")


def parse_tensors(raw: bytes, where: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(raw)
    except (SafetensorError, ValueError, OSError) as err:
        raise ModelFileError(f"{where}: not a readable safetensors file ({err})") from None


def parse_member(contents: dict[str, bytes], join) -> dict:
    meta = parse_config(contents["config.json"], join("config.json"))
    bank = parse_tensors(contents["bank.safetensors"], join("bank.safetensors"))
    expect(set(bank) == {"bank"}, join("bank.safetensors"), f"expected one tensor 'bank', got {sorted(bank)}")
    bank = bank["bank"]
    expect(bank.dtype == np.float32 and list(bank.shape) == meta["bank_shape"], join("bank.safetensors"),
            f"bank: expected float32 {meta['bank_shape']}, got {bank.dtype} {list(bank.shape)}")
    expect(bool(np.isfinite(bank).all()), join("bank.safetensors"), "bank: holds NaN or infinite values")
    weights = parse_tensors(contents["backbone.safetensors"], join("backbone.safetensors"))
    bad = sorted(k for k, v in weights.items() if v.dtype != np.float32)
    expect(not bad, join("backbone.safetensors"), f"expected float32 tensors, got {bad[:4]}")
    index = parse_tensors(contents["index.safetensors"], join("index.safetensors"))
    clustered_index = None
    if index:
        try:
            clustered_index = ClusteredIndex.from_arrays(index, bank)
        except ValueError as err:
            raise ModelFileError(f"{join('index.safetensors')}: {err}") from None
    return {"meta": meta, "bank": bank, "weights": weights, "clustered_index": clustered_index,
            "where": join("backbone.safetensors")}


def parse_ensemble(raw: bytes, where: str) -> dict:
    meta = strict_json(raw, where)
    keys = {"members", "thresholds", "calibration", "library_version"}
    expect(isinstance(meta, dict) and set(meta) == keys, where,
            f"expected exactly the fields {sorted(keys)}, got {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    expect(is_int(meta["members"]) and meta["members"] >= 1, where, "members: expected an integer >= 1")
    check_thresholds(meta["thresholds"], where)
    check_calibration(meta["calibration"], where)
    expect(isinstance(meta["library_version"], str), where, "library_version: expected a string")
    return meta


def thresholds_json(image: Threshold | None, pixel: Threshold | None) -> dict:
    return {kind: None if t is None else {"value": t.value, "rule": t.rule}
            for kind, t in (("image", image), ("pixel", pixel))}


def thresholds_of(meta: dict) -> tuple[Threshold | None, Threshold | None]:
    """The (image, pixel) thresholds of a checked `config.json` or `ensemble.json`."""
    t = meta["thresholds"]
    return tuple(None if t[k] is None else Threshold(float(t[k]["value"]), t[k]["rule"]) for k in ("image", "pixel"))


# -- the manifest ---------------------------------------------------------------------------------
def layout(names) -> set[str]:
    """The files a folder must hold: one model's, or an ensemble's of as many members as `names` has
    `member-i/` prefixes (numbered from 0)."""
    names = set(names)
    if ENSEMBLE not in names:
        return set(FILES)
    count = len({n.split("/", 1)[0] for n in names if "/" in n})
    return {ENSEMBLE} | {f"member-{i}/{f}" for i in range(count) for f in FILES}


def manifest_bytes(files: dict[str, bytes]) -> bytes:
    body = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "files": {name: {"bytes": len(data), "sha256": atomic.sha256(data)} for name, data in sorted(files.items())}}
    return atomic.canonical_json({**body, "manifest_sha256": atomic.sha256(atomic.canonical_json(body))})


def parse_manifest(raw: bytes, where: str) -> dict[str, dict]:
    manifest = strict_json(raw, where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFileError(f"{where}: not a patchcore-jax model manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise ModelFileError(f"{where}: format version {version!r} " + (
            f"is newer than this library reads ({FORMAT_VERSION}); upgrade patchcore-jax" if newer else
            f"is not read by this library (it reads {FORMAT_VERSION}); refit the model"))
    if set(manifest) != {"format", "format_version", "files", "manifest_sha256"}:
        raise ModelFileError(f"{where}: unexpected fields {sorted(set(manifest) ^ {'format', 'format_version', 'files', 'manifest_sha256'})}")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest["manifest_sha256"] != atomic.sha256(atomic.canonical_json(body)) or raw != atomic.canonical_json(manifest):
        raise ModelFileError(f"{where}: its content does not match its own checksum (modified or damaged)")
    files = manifest["files"]
    if not isinstance(files, dict) or set(files) != layout(files) or set(files) == {ENSEMBLE}:
        raise ModelFileError(f"{where}: expected the entries of a model ({list(FILES)}) or of an ensemble, got "
                             f"{sorted(files) if isinstance(files, dict) else files!r}")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"} or not isinstance(entry["sha256"], str)
                or isinstance(entry["bytes"], bool) or not isinstance(entry["bytes"], int)):
            raise ModelFileError(f"{where}: malformed entry for {name}")
    return files
