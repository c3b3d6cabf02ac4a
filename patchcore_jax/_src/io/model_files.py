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
- Across processes, a load yields the old or the new model: its files are read through one descriptor
  of one folder, and a folder replaced meanwhile is read anew; a writer holds its folders locked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time

import numpy as np

from patchcore_jax._src.io import atomic
from patchcore_jax._src.io import model_schema as schema
from patchcore_jax._src.io.atomic import exchange  # a module name, so tests can replace it
from patchcore_jax._src.io.model_schema import (  # noqa: F401 (FORMAT, FORMAT_VERSION: this module's names too)
    ENSEMBLE, FILES, FORMAT, FORMAT_VERSION, MANIFEST, ModelFileError, layout, manifest_bytes, parse_ensemble,
    parse_manifest, parse_member, thresholds_json, thresholds_of,
)
from patchcore_jax._src.model.fitted import Fitted, FittedEnsemble
from patchcore_jax._src.version import __version__
from patchcore_jax._src.model.images import display

MAX_JSON_BYTES = 1 << 20
READ_ATTEMPTS = 20  # reads of a folder replaced meanwhile by another process's save, each time anew


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


def _step(name: str) -> None:
    """Called between the steps of `save_model` (a fault-injection point for tests)."""


# -- reading ------------------------------------------------------------------------------------------
def _read_file(dir_fd: int, name: str, where: str, limit: int | None = None, *, size: int | None = None) -> bytes:
    """A regular file's bytes, its size checked before it is read: at most `limit` bytes, or exactly
    `size` (the manifest's record), so memory stays bounded whatever the file claims or has become."""
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
        if size is not None and st.st_size != size:
            raise ModelFileError(f"{where}: {st.st_size} bytes where the manifest records {size} "
                                 "(modified, damaged or truncated)")
        bound = size if size is not None else limit
        data = f.read() if bound is None else f.read(bound + 1)
        if bound is not None and len(data) > bound:
            raise ModelFileError(f"{where}: grew while it was read")
        return data


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
        return _read_listed(path, where, dir_fd)
    except (FileNotFoundError, NotADirectoryError) as err:  # replaced by a concurrent save meanwhile
        raise ModelFileError(f"{where}: changed while it was read ({err.strerror}); try again") from None
    finally:
        os.close(dir_fd)


def _read_listed(path: str, where: str, dir_fd: int) -> dict[str, bytes]:
    top = set(os.listdir(dir_fd))
    if MANIFEST not in top:
        old = "config.json" in top and "bank.safetensors" in top
        raise ModelFileError(f"{display(os.path.join(path, MANIFEST))}: missing; " + (
            f"{where} was written by an older patchcore-jax (format 1, no manifest); refit the model" if old else
            f"{where} is not a complete patchcore-jax model"))
    files = parse_manifest(_read_file(dir_fd, MANIFEST, display(os.path.join(path, MANIFEST)), MAX_JSON_BYTES),
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
        data = _read_file(dir_fd, name, file_where, size=entry["bytes"])
        if len(data) != entry["bytes"] or atomic.sha256(data) != entry["sha256"]:
            raise ModelFileError(f"{file_where}: checksum differs from the manifest (modified, damaged or truncated)")
        out[name] = data
    return out



def read_model_files(path) -> dict:
    """Reads and verifies every file of a model folder without building the model. Returns, for one
    model, `{"kind": "model", "meta": config.json's fields (config as a PatchCoreConfig), "bank": (M, D)
    float32, "weights": the backbone's state dict, "where"}`, for an ensemble `{"kind": "ensemble",
    "meta": ensemble.json's fields, "members": [the same per member]}`; `ModelFileError` (one line,
    naming the file) otherwise."""
    path = os.path.abspath(os.fsdecode(path))
    with contextlib.suppress(OSError):  # a read-only location still loads
        _tidy(path)
    for attempt in range(READ_ATTEMPTS):
        before = _inode(path)
        try:
            contents = _read_verified(path)
            break
        except ModelFileError:
            if attempt + 1 < READ_ATTEMPTS and (_inode(path) != before or before is None and _leftovers(path)):
                time.sleep(0.005 * attempt)  # replaced, or between a save's two renames: read the new one
                continue
            raise
    join = lambda name: display(os.path.join(path, name))  # noqa: E731
    if ENSEMBLE in contents:
        meta = parse_ensemble(contents.pop(ENSEMBLE), join(ENSEMBLE))
        count = len({n.split("/", 1)[0] for n in contents})
        schema.expect(meta["members"] == count, join(ENSEMBLE), f"members: {meta['members']}, but the folder holds {count}")
        members = [parse_member({f: contents.pop(f"member-{i}/{f}") for f in FILES}, lambda f, i=i: join(f"member-{i}/{f}"))
                   for i in range(count)]
        return {"kind": "ensemble", "meta": meta, "members": members}
    return {"kind": "model", **parse_member(contents, join)}



def where(path) -> str:
    """A model path as error messages show it (absolute, control characters escaped)."""
    return display(os.path.abspath(os.fsdecode(path)))


def load_fitted(path) -> Fitted | FittedEnsemble:
    """Reads and verifies a folder written by `save_model`: the fitted value of a model, or of an
    ensemble. `ModelFileError` (one line, naming the file) for anything wrong."""
    files = read_model_files(path)
    if files["kind"] == "model":
        return _fitted(files)
    image, pixel = thresholds_of(files["meta"])
    return FittedEnsemble(members=tuple(_fitted(m) for m in files["members"]), calibration=files["meta"]["calibration"],
                          image_threshold=image, pixel_threshold=pixel)


def _fitted(files: dict) -> Fitted:
    meta = files["meta"]
    image, pixel = thresholds_of(meta)
    return Fitted(config=meta["config"], weights=files["weights"], bank=files["bank"],
                  clustered_index=files["clustered_index"], calibration=meta["calibration"], image_threshold=image,
                  pixel_threshold=pixel, num_patches_seen=meta["num_patches_seen"],
                  weights_sha256=meta["weights"]["sha256"])


def _inode(path: str):
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return None


# -- writing ------------------------------------------------------------------------------------------
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
            manifest = atomic.strict_json(f.read(MAX_JSON_BYTES), "manifest")
        ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"{display(os.path.join(path, MANIFEST))}: not a patchcore-jax model manifest; "
                         f"refusing to replace {where}")
    tree = _tree(path)
    foreign = sorted(n for n in (tree or set(names)) if n != MANIFEST and n not in layout(tree or ()))
    if tree is None or foreign:
        name = foreign[0] if foreign else next(n for n in names if n != MANIFEST)
        raise ValueError(f"{display(os.path.join(path, name))}: is not part of the model in {where}; "
                         "refusing to replace a folder that holds other files")


def _leftovers(path: str) -> list[str]:
    parent, base = os.path.split(path)
    prefix = f".{base}.tmp-"
    try:
        return [os.path.join(parent, n) for n in sorted(os.listdir(parent)) if n.startswith(prefix)]
    except OSError:
        return []


def _only_model_files(folder: str) -> bool:
    tree = _tree(folder)
    return tree is not None and tree - {MANIFEST} <= layout(tree)


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
            if not atomic.lock(fd, block=False):
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
        atomic.fsync_dir(os.path.dirname(path))


def _model_files(value: Fitted | FittedEnsemble) -> dict[str, bytes]:
    """The files of a fitted model, or of an ensemble (its members in `member-i/`)."""
    if isinstance(value, FittedEnsemble):
        files = {ENSEMBLE: atomic.canonical_json({"members": len(value.members), "calibration": value.calibration,
                                       "thresholds": thresholds_json(value.image_threshold, value.pixel_threshold),
                                       "library_version": __version__})}
        for i, member in enumerate(value.members):
            files.update({f"member-{i}/{name}": data for name, data in _model_files(member).items()})
        return files
    from safetensors.numpy import save

    config = {
        "config": value.config.to_dict(),
        "thresholds": thresholds_json(value.image_threshold, value.pixel_threshold),
        "num_patches_seen": int(value.num_patches_seen),
        "bank_shape": [int(s) for s in value.bank.shape],
        "calibration": value.calibration,
        "weights": {"source": value.config.weights, "sha256": value.weights_sha256},
        "library_version": __version__,
    }
    index = value.clustered_index.to_arrays() if value.clustered_index is not None else {}
    return {
        "config.json": atomic.canonical_json(config),
        "bank.safetensors": save({"bank": np.ascontiguousarray(np.asarray(value.bank, np.float32))}),
        "backbone.safetensors": save(dict(value.weights)),
        "index.safetensors": save({k: np.asarray(v, order="C") for k, v in index.items()}),  # 0-d stays 0-d
    }


def _locked_folder(path: str) -> tuple[str, int]:
    """A new empty sibling `.NAME.tmp-XXXX` of `path`, locked by this process: `(folder, descriptor)`.
    A reader's `_tidy` may remove such a folder in the instant after it is created and before it is
    locked (it is then empty and unlocked, like a crashed save's); the lock is therefore checked to
    hold the folder that is still there, and another is made if not."""
    parent, base = os.path.split(path)
    for _ in range(100):
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        atomic.lock(fd, block=True)
        held = os.fstat(fd)
        with contextlib.suppress(OSError):
            now = os.stat(tmp, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return tmp, fd
        os.close(fd)
    raise OSError(f"{display(path)}: could not create a temporary folder beside it")


def save_model(value: Fitted | FittedEnsemble, path) -> None:
    """Writes a fitted model or ensemble to the folder `path` (see the module docstring)."""
    path = os.path.abspath(os.fsdecode(path))
    check_target(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _tidy(path)
    files = _model_files(value)
    files[MANIFEST] = manifest_bytes(files)
    tmp, fd = _locked_folder(path)
    try:
        os.chmod(tmp, 0o777 & ~atomic.umask())
        _step("created")
        for name in sorted(files, key=lambda n: n == MANIFEST):  # the manifest last
            with atomic.naming(os.path.join(path, name)):  # a full disk names the file
                atomic.write_in(fd, name, files[name])
            _step(f"wrote {name}")
        atomic.fsync_dir(tmp)
        if os.path.isdir(path) and not os.path.islink(path) and os.listdir(path):
            check_target(path)  # still only an earlier model's files
            if exchange(tmp, path):
                _step("exchanged")
            else:
                # No exchange here: a short window without the path, recovered by _tidy if the save
                # dies in it. The old folder stays locked by this save while it is aside, so that no
                # reader's _tidy moves it back meanwhile.
                old_fd = os.open(path, os.O_RDONLY)
                try:
                    atomic.lock(old_fd, block=True)
                    os.rename(path, tmp + "-old")
                    _step("moved aside")
                    os.rename(tmp, path)
                    _step("renamed")
                    shutil.rmtree(tmp + "-old", ignore_errors=True)
                finally:
                    os.close(old_fd)
        else:
            os.rename(tmp, path)  # onto a new path or an empty folder: atomic
            _step("renamed")
        atomic.fsync_dir(parent)
    finally:
        os.close(fd)
        if os.path.isdir(tmp):
            # Before the swap: the unfinished new model; after an exchange: the old model.
            shutil.rmtree(tmp, ignore_errors=True)
