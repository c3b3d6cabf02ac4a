"""Model folders: sealed, portable, replaced atomically.

Layout of a model folder (format 2):
  manifest.json         the seal: the format, its version, every other file with its size and sha256,
                        and the sha256 of its own content; written canonically, so any changed byte shows
  config.json           the settings (every `PatchCoreConfig` field), the image and pixel thresholds
                        with the rules that set them, the calibration statistics, the bank's shape,
                        and where the backbone weights came from (path and sha256 at fit)
  bank.safetensors      "bank": `(M, target_dim)` float32, the coreset memory bank
  backbone.safetensors  the backbone's weights as used at fit (torchvision names and layouts), so the
                        folder alone predicts the same scores on another machine
  index.safetensors     the clustered search index built at fit (`clustered.ClusteredIndex.to_arrays`),
                        or no tensors when the model searched by brute force (rebuilt from the bank)
An ensemble (`patchcore_jax.ensemble`) is one folder too: `manifest.json`, `ensemble.json` (its
thresholds and calibration) and `member-0/`, `member-1/`, ... each holding a member's four files,
all sealed by the one manifest. A folder holding anything else, missing a file, or with any byte
changed is refused by `read_model_files` / `load` with a `ModelFileError` naming the file. Every
field of `config.json` and `ensemble.json` is type-checked.

Writing (`save_model`):
- Only into a path that does not exist, an empty folder, or an earlier model folder holding nothing
  but the model's own files (`check_target`); anything else is refused before any work.
- The new model is written in full into a sibling `.NAME.tmp-XXXX` (each file fsynced; the folder
  locked with `flock` while it is written), then swapped with the old one in one atomic
  `renameat2(RENAME_EXCHANGE)` (Linux), so the path holds a complete model at every instant; the old
  model, now at the sibling's name, is deleted. Where the exchange is not available the old folder is
  renamed aside first, and the next save or load moves a complete model back if that was interrupted.
- Leftover siblings of an interrupted save (not locked by a live writer) are deleted by the next save or
  load of the same path; an interrupted replace is recovered. Folders and files follow the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from typing import Any

import numpy as np

from patchcore_jax.data.images import display

FORMAT = "patchcore-jax-model"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
FILES = ("backbone.safetensors", "bank.safetensors", "config.json", "index.safetensors")
ENSEMBLE = "ensemble.json"
_MAX_JSON_BYTES = 1 << 20


def _layout(names) -> set[str]:
    """The files a folder must hold: one model's, or an ensemble's of as many members as `names` has
    `member-i/` prefixes (numbered from 0)."""
    names = set(names)
    if ENSEMBLE not in names:
        return set(FILES)
    count = len({n.split("/", 1)[0] for n in names if "/" in n})
    return {ENSEMBLE} | {f"member-{i}/{f}" for i in range(count) for f in FILES}


def _tree(folder: str) -> set[str] | None:
    """Relative paths of the files under `folder` (one level of sub-folders), or None if it holds
    anything else (a link, a FIFO, a deeper folder)."""
    out = set()
    try:
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                out.add(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                for sub in os.scandir(entry.path):
                    if not sub.is_file(follow_symlinks=False):
                        return None
                    out.add(f"{entry.name}/{sub.name}")
            else:
                return None
    except OSError:
        return None
    return out


class ModelFileError(ValueError):
    """A model folder that is missing, incomplete, tampered with, or of another format version."""


def _step(name: str) -> None:
    """Called between the steps of `save_model` (a fault-injection point for tests)."""


# -- canonical JSON -----------------------------------------------------------------------------------
def _canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def _strict_json(data: bytes, where: str) -> Any:
    def no_constants(name):
        raise ValueError(f"{name} is not allowed")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
        return dict(pairs)

    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as err:
        raise ModelFileError(f"{where}: not valid JSON ({err})") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(files: dict[str, bytes]) -> bytes:
    body = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in sorted(files.items())}}
    return _canonical({**body, "manifest_sha256": _sha256(_canonical(body))})


def _parse_manifest(raw: bytes, where: str) -> dict[str, dict]:
    manifest = _strict_json(raw, where)
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
    if manifest["manifest_sha256"] != _sha256(_canonical(body)) or raw != _canonical(manifest):
        raise ModelFileError(f"{where}: its content does not match its own checksum (modified or damaged)")
    files = manifest["files"]
    if not isinstance(files, dict) or set(files) != _layout(files) or set(files) == {ENSEMBLE}:
        raise ModelFileError(f"{where}: expected the entries of a model ({list(FILES)}) or of an ensemble, got "
                             f"{sorted(files) if isinstance(files, dict) else files!r}")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"} or not isinstance(entry["sha256"], str)
                or isinstance(entry["bytes"], bool) or not isinstance(entry["bytes"], int)):
            raise ModelFileError(f"{where}: malformed entry for {name}")
    return files


# -- reading ------------------------------------------------------------------------------------------
def _read_file(dir_fd: int, name: str, where: str, limit: int | None = None) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    except OSError as err:
        raise ModelFileError(f"{where}: cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{where}: not a regular file")
        if limit is not None and st.st_size > limit:
            raise ModelFileError(f"{where}: {st.st_size} bytes is far larger than a model's {name}")
        return f.read()


def _read_verified(path: str) -> dict[str, bytes]:
    """Every file of the model folder, each checked against the manifest (size, sha256)."""
    where = display(path)
    try:
        dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        raise ModelFileError(f"{where}: no such model folder") from None
    except OSError as err:
        raise ModelFileError(f"{where}: not a model folder ({err.strerror})") from None
    try:
        top = set(os.listdir(dir_fd))
        if MANIFEST not in top:
            old = "config.json" in top and "bank.safetensors" in top
            raise ModelFileError(f"{display(os.path.join(path, MANIFEST))}: missing; " + (
                f"{where} was written by an older patchcore-jax (format 1, no manifest); refit the model" if old else
                f"{where} is not a complete patchcore-jax model"))
        files = _parse_manifest(_read_file(dir_fd, MANIFEST, display(os.path.join(path, MANIFEST)), _MAX_JSON_BYTES),
                                display(os.path.join(path, MANIFEST)))
        folders = {n.split("/", 1)[0] for n in files if "/" in n}
        names = set()
        for name in sorted(top - {MANIFEST}):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and name in folders:
                names |= {f"{name}/{n}" for n in os.listdir(os.path.join(path, name))}
            else:
                names.add(name)
        for name in sorted(names - set(files)):
            raise ModelFileError(f"{display(os.path.join(path, name))}: not part of the model (the manifest does not "
                                 "list it); a model folder holds only its own files")
        for name in sorted(set(files) - names):
            raise ModelFileError(f"{display(os.path.join(path, name))}: missing; {where} is not a complete model")
        out = {}
        for name, entry in sorted(files.items(), key=lambda item: item[1]["bytes"]):  # cheap checks first
            file_where = display(os.path.join(path, name))
            data = _read_file(dir_fd, name, file_where)
            if len(data) != entry["bytes"] or _sha256(data) != entry["sha256"]:
                raise ModelFileError(f"{file_where}: checksum differs from the manifest (modified, damaged or truncated)")
            out[name] = data
        return out
    finally:
        os.close(dir_fd)


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ModelFileError(f"{where}: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_config(raw: bytes, where: str) -> dict:
    """config.json, every field type-checked."""
    from patchcore_jax.config import PatchCoreConfig

    meta = _strict_json(raw, where)
    keys = {"config", "thresholds", "num_patches_seen", "bank_shape", "calibration", "weights", "library_version"}
    _expect(isinstance(meta, dict) and set(meta) == keys, where,
            f"expected exactly the fields {sorted(keys)}, got {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    try:
        meta["config"] = PatchCoreConfig.from_dict(meta["config"], strict=True)
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{where}: {err}") from None
    _check_thresholds(meta["thresholds"], where)
    _expect(_is_int(meta["num_patches_seen"]) and meta["num_patches_seen"] >= 0, where,
            f"num_patches_seen: expected an integer >= 0, got {meta['num_patches_seen']!r}")
    shape = meta["bank_shape"]
    _expect(isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s >= 1 for s in shape)
            and shape[1] == meta["config"].target_dim, where,
            f"bank_shape: expected [M, {meta['config'].target_dim}] with M >= 1, got {shape!r}")
    weights = meta["weights"]
    _expect(isinstance(weights, dict) and set(weights) == {"source", "sha256"}
            and all(v is None or isinstance(v, str) for v in weights.values()), where,
            f"weights: expected {{'source': str|null, 'sha256': str|null}}, got {weights!r}")
    _expect(isinstance(meta["library_version"], str), where, "library_version: expected a string")
    _check_calibration(meta["calibration"], where)
    return meta


def _check_thresholds(thresholds, where: str) -> None:
    _expect(isinstance(thresholds, dict) and set(thresholds) == {"image", "pixel"}, where,
            f"thresholds: expected {{'image': ..., 'pixel': ...}}, got {thresholds!r}")
    for kind, t in thresholds.items():
        _expect(t is None or (isinstance(t, dict) and set(t) == {"value", "rule"} and _is_number(t["value"])
                              and isinstance(t["rule"], str)), where,
                f"thresholds.{kind}: expected null or {{'value': a finite number, 'rule': a string}}, got {t!r}")


def _quantiles(q, keys, where: str, what: str) -> None:
    _expect(isinstance(q, dict) and set(q) == keys and all(_is_number(v) for v in q.values()), where,
            f"{what}: expected finite numbers for the quantiles {sorted(keys)}")


def _check_calibration(cal, where: str) -> None:
    from patchcore_jax.model import CALIBRATION_QUANTILES

    quantiles = {str(q) for q in CALIBRATION_QUANTILES}
    _expect(isinstance(cal, dict) and "fit" in cal and set(cal) <= {"fit", "good_images"}, where,
            f"calibration: expected 'fit' (and 'good_images'), got {sorted(cal) if isinstance(cal, dict) else cal!r}")
    fit = cal["fit"]
    _expect(isinstance(fit, dict) and set(fit) == {"patch_score_quantiles", "patch_sample"}, where,
            "calibration.fit: expected 'patch_score_quantiles' and 'patch_sample'")
    _quantiles(fit["patch_score_quantiles"], quantiles, where, "calibration.fit.patch_score_quantiles")
    _expect(_is_int(fit["patch_sample"]) and fit["patch_sample"] >= 1, where, "calibration.fit.patch_sample: expected an integer >= 1")
    good = cal.get("good_images")
    if good is not None:
        _expect(isinstance(good, dict) and set(good) == {"count", "image_score_quantiles", "map_quantiles"}, where,
                "calibration.good_images: expected 'count', 'image_score_quantiles' and 'map_quantiles'")
        _expect(_is_int(good["count"]) and good["count"] >= 1, where, "calibration.good_images.count: expected an integer >= 1")
        for key in ("image_score_quantiles", "map_quantiles"):
            _quantiles(good[key], quantiles | {"0.0"}, where, f"calibration.good_images.{key}")


def _parse_tensors(raw: bytes, where: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(raw)
    except (SafetensorError, ValueError, OSError) as err:
        raise ModelFileError(f"{where}: not a readable safetensors file ({err})") from None


def read_model_files(path) -> dict:
    """Reads and verifies every file of a model folder without building the model. Returns, for one
    model, `{"kind": "model", "meta": config.json's fields (config as a PatchCoreConfig), "bank": (M, D)
    float32, "weights": the backbone's state dict, "where"}`, for an ensemble `{"kind": "ensemble",
    "meta": ensemble.json's fields, "members": [the same per member]}`; `ModelFileError` (one line,
    naming the file) otherwise."""
    path = os.path.abspath(os.fsdecode(path))
    with contextlib.suppress(OSError):  # a read-only location still loads
        _tidy(path)
    for attempt in range(2):
        before = _inode(path)
        try:
            contents = _read_verified(path)
            break
        except ModelFileError:
            if attempt == 0 and _inode(path) != before:
                continue  # replaced by a concurrent save while it was read: read the new one
            raise
    join = lambda name: display(os.path.join(path, name))  # noqa: E731
    if ENSEMBLE in contents:
        meta = _parse_ensemble(contents.pop(ENSEMBLE), join(ENSEMBLE))
        count = len({n.split("/", 1)[0] for n in contents})
        _expect(meta["members"] == count, join(ENSEMBLE), f"members: {meta['members']}, but the folder holds {count}")
        members = [_parse_member({f: contents.pop(f"member-{i}/{f}") for f in FILES}, lambda f, i=i: join(f"member-{i}/{f}"))
                   for i in range(count)]
        return {"kind": "ensemble", "meta": meta, "members": members}
    return {"kind": "model", **_parse_member(contents, join)}


def _parse_member(contents: dict[str, bytes], join) -> dict:
    meta = _parse_config(contents["config.json"], join("config.json"))
    bank = _parse_tensors(contents["bank.safetensors"], join("bank.safetensors"))
    _expect(set(bank) == {"bank"}, join("bank.safetensors"), f"expected one tensor 'bank', got {sorted(bank)}")
    bank = bank["bank"]
    _expect(bank.dtype == np.float32 and list(bank.shape) == meta["bank_shape"], join("bank.safetensors"),
            f"bank: expected float32 {meta['bank_shape']}, got {bank.dtype} {list(bank.shape)}")
    _expect(bool(np.isfinite(bank).all()), join("bank.safetensors"), "bank: holds NaN or infinite values")
    weights = _parse_tensors(contents["backbone.safetensors"], join("backbone.safetensors"))
    bad = sorted(k for k, v in weights.items() if v.dtype != np.float32)
    _expect(not bad, join("backbone.safetensors"), f"expected float32 tensors, got {bad[:4]}")
    index = _parse_tensors(contents["index.safetensors"], join("index.safetensors"))
    clustered_index = None
    if index:
        from patchcore_jax.clustered import ClusteredIndex

        try:
            clustered_index = ClusteredIndex.from_arrays(index)
        except ValueError as err:
            raise ModelFileError(f"{join('index.safetensors')}: {err}") from None
        _expect(clustered_index.size == bank.shape[0] and clustered_index.rows.shape[1] == bank.shape[1],
                join("index.safetensors"), f"an index of {clustered_index.size} rows for a bank of {bank.shape[0]}")
    return {"meta": meta, "bank": bank, "weights": weights, "clustered_index": clustered_index,
            "where": join("backbone.safetensors")}


def _parse_ensemble(raw: bytes, where: str) -> dict:
    meta = _strict_json(raw, where)
    keys = {"members", "thresholds", "calibration", "library_version"}
    _expect(isinstance(meta, dict) and set(meta) == keys, where,
            f"expected exactly the fields {sorted(keys)}, got {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    _expect(_is_int(meta["members"]) and meta["members"] >= 1, where, "members: expected an integer >= 1")
    _check_thresholds(meta["thresholds"], where)
    _check_calibration(meta["calibration"], where)
    _expect(isinstance(meta["library_version"], str), where, "library_version: expected a string")
    return meta


def load(path, *, progress: bool = True, mesh=None):
    """Reads, verifies and builds the model (a `PatchCore`) or ensemble (a `PatchCoreEnsemble`) of a
    folder written by `save_model`."""
    from patchcore_jax.ensemble import PatchCoreEnsemble

    files = read_model_files(path)
    if files["kind"] == "model":
        return _build_member(files, progress=progress, mesh=mesh)
    members = [_build_member(m, progress=progress, mesh=mesh) for m in files["members"]]
    ensemble = PatchCoreEnsemble(members=members, progress=progress)
    _apply_decisions(ensemble, files["meta"])
    return ensemble


def load_model(path, *, progress: bool = True, mesh=None):
    """Reads, verifies and builds the `PatchCore` of a folder written by `save_model`."""
    files = read_model_files(path)
    if files["kind"] != "model":
        raise ModelFileError(f"{display(os.path.abspath(os.fsdecode(path)))}: an ensemble of {len(files['members'])} "
                             "members; load it with patchcore_jax.load or PatchCoreEnsemble.load")
    return _build_member(files, progress=progress, mesh=mesh)


def _build_member(files: dict, *, progress: bool, mesh):
    from patchcore_jax.model import PatchCore

    meta = files["meta"]
    try:
        model = PatchCore(meta["config"], progress=progress, mesh=mesh, backbone_weights=files.pop("weights"))
    except ValueError as err:
        raise ModelFileError(f"{files['where']}: {err}") from None
    clustered_index = files.pop("clustered_index")
    model.set_bank(files.pop("bank"), clustered_index=clustered_index if model.search_kind() == "clustered" else None)
    _apply_decisions(model, meta)
    model.num_patches_seen = meta["num_patches_seen"]
    model.weights_sha256 = meta["weights"]["sha256"]
    return model


def _apply_decisions(detector, meta: dict) -> None:
    from patchcore_jax.detector import Threshold

    for kind, t in meta["thresholds"].items():
        setattr(detector, f"{kind}_threshold", None if t is None else Threshold(float(t["value"]), t["rule"]))
    detector.calibration = meta["calibration"]


def _inode(path: str):
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return None


# -- writing ------------------------------------------------------------------------------------------
def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_target(path) -> None:
    """Refuses (ValueError, one line naming it) a model destination that `save_model` must not touch:
    anything but a new path, an empty folder, or a folder holding only an earlier model's files."""
    path = os.path.abspath(os.fsdecode(path))
    where = display(path)
    if os.path.islink(path):
        raise ValueError(f"{where}: is a symbolic link; give the folder itself as the model path")
    if not os.path.lexists(path):
        ancestor = os.path.dirname(path)
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"{where}: cannot be created ({display(ancestor)} is not a writable folder)")
        return
    if not os.path.isdir(path):
        raise ValueError(f"{where}: exists and is not a folder; refusing to replace it with a model")
    parent = os.path.dirname(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: its folder {display(parent)} is not writable")
    names = sorted(os.listdir(path))
    if not names:
        return
    if MANIFEST not in names:
        raise ValueError(f"{where}: exists, is not empty and is not a patchcore-jax model (no {MANIFEST}); "
                         "refusing to write into it")
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read(_MAX_JSON_BYTES).decode("utf-8"))
        ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"{display(os.path.join(path, MANIFEST))}: not a patchcore-jax model manifest; "
                         f"refusing to replace {where}")
    tree = _tree(path)
    foreign = sorted(n for n in (tree or set(names)) if n != MANIFEST and n not in _layout(tree or ()))
    if tree is None or foreign:
        name = foreign[0] if foreign else next(n for n in names if n != MANIFEST)
        raise ValueError(f"{display(os.path.join(path, name))}: is not part of the model in {where}; "
                         "refusing to replace a folder that holds other files")


def _write(dir_fd: int, name: str, data: bytes) -> None:
    if "/" in name:  # a member's file: its folder first (mode 0777 less the umask)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name.split("/", 1)[0], 0o777, dir_fd=dir_fd)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), display(b))


def _lock(fd: int, *, block: bool) -> bool:
    """An exclusive `flock` on an open folder; False if another process holds it. Without flock
    (Windows) a non-blocking attempt always fails, so leftovers are never taken for stale."""
    try:
        import fcntl
    except ImportError:
        return block
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _leftovers(path: str) -> list[str]:
    parent, base = os.path.split(path)
    prefix = f".{base}.tmp-"
    try:
        return [os.path.join(parent, n) for n in sorted(os.listdir(parent)) if n.startswith(prefix)]
    except OSError:
        return []


def _only_model_files(folder: str) -> bool:
    tree = _tree(folder)
    return tree is not None and tree - {MANIFEST} <= _layout(tree)


def _tidy(path: str) -> None:
    """Deletes the siblings an interrupted save left (unless a live writer holds their lock), and
    puts the earlier model back in place if a replace without the atomic exchange was interrupted
    between its two renames (the only moment the path can be missing)."""
    restore = None
    for leftover in _leftovers(path):
        if os.path.islink(leftover) or not os.path.isdir(leftover) or not _only_model_files(leftover):
            continue  # never touch what does not look exactly like our own leftover
        fd = os.open(leftover, os.O_RDONLY)
        try:
            if not _lock(fd, block=False):
                continue  # a save in progress holds it
            if leftover.endswith("-old") and not os.path.lexists(path) and restore is None:
                with contextlib.suppress(ModelFileError):
                    _read_verified(leftover)
                    restore = leftover
                    continue
            shutil.rmtree(leftover, ignore_errors=True)
        finally:
            os.close(fd)
    if restore is not None:
        os.rename(restore, path)
        _fsync_dir(os.path.dirname(path))


def _thresholds(detector) -> dict:
    return {kind: None if t is None else {"value": t.value, "rule": t.rule}
            for kind, t in (("image", detector.image_threshold), ("pixel", detector.pixel_threshold))}


def _model_files(model) -> dict[str, bytes]:
    """The files of a `PatchCore`, or of a `PatchCoreEnsemble` (its members in `member-i/`)."""
    import patchcore_jax

    members = getattr(model, "members", None)
    if members is not None:
        files = {ENSEMBLE: _canonical({"members": len(members), "thresholds": _thresholds(model),
                                       "calibration": model.calibration, "library_version": patchcore_jax.__version__})}
        for i, member in enumerate(members):
            files.update({f"member-{i}/{name}": data for name, data in _model_files(member).items()})
        return files
    from safetensors.numpy import save

    config = {
        "config": model.config.to_dict(),
        "thresholds": _thresholds(model),
        "num_patches_seen": int(model.num_patches_seen),
        "bank_shape": [int(s) for s in model.bank.shape],
        "calibration": model.calibration,
        "weights": {"source": model.config.weights, "sha256": model.weights_sha256},
        "library_version": patchcore_jax.__version__,
    }
    from patchcore_jax.clustered import ClusteredIndex

    index = model.index.to_arrays() if isinstance(model.index, ClusteredIndex) else {}
    return {
        "config.json": _canonical(config),
        "bank.safetensors": save({"bank": np.ascontiguousarray(np.asarray(model.bank, np.float32))}),
        "backbone.safetensors": save(model._extract.state_dict()),
        "index.safetensors": save({k: np.asarray(v, order="C") for k, v in index.items()}),  # 0-d stays 0-d
    }


def save_model(model, path) -> None:
    """Writes `model` (a `PatchCore` or a `PatchCoreEnsemble`) to the folder `path` (see the module
    docstring)."""
    model._require_fitted()
    path = os.path.abspath(os.fsdecode(path))
    check_target(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _tidy(path)
    files = _model_files(model)
    files[MANIFEST] = _manifest(files)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock(fd, block=True)
        os.chmod(tmp, 0o777 & ~_umask())
        _step("created")
        for name in sorted(files, key=lambda n: n == MANIFEST):  # the manifest last
            _write(fd, name, files[name])
            _step(f"wrote {name}")
        _fsync_dir(tmp)
        if os.path.isdir(path) and not os.path.islink(path) and os.listdir(path):
            check_target(path)  # still only an earlier model's files
            if _exchange(tmp, path):
                _step("exchanged")
            else:
                os.rename(path, tmp + "-old")  # no exchange here: a short window, recovered by _tidy
                _step("moved aside")
                os.rename(tmp, path)
                _step("renamed")
                shutil.rmtree(tmp + "-old", ignore_errors=True)
        else:
            os.rename(tmp, path)  # onto a new path or an empty folder: atomic
            _step("renamed")
        _fsync_dir(parent)
    finally:
        os.close(fd)
        if os.path.isdir(tmp):
            # Before the swap: the unfinished new model; after an exchange: the old model.
            shutil.rmtree(tmp, ignore_errors=True)
