"""The sweep's feature store: backbone taps computed once, kept on disk, sealed like model files.

Layout, under a sweep's output folder `S/features/`:
  <key>/key.json                    the settings the taps depend on (backbone, weights and their
                                    sha256, resize, crop, geometry, dtype, and the seed of a random
                                    backbone); <key> is the first 16 hex digits of its sha256
  <key>/<category>/<layer>.npy      float32 `(N, h, w, C)`: the tap `layer` of the category's N images
                                    (training images first, then test images, in the data set's order)
  <key>/<category>/<layer>.seal.json  {"sha256": the .npy file's, "inputs": the digest of the images it
                                    came from, "shape": [...]}
Every file is written atomically (a temporary sibling, then a rename) and the seal after its array, so a
run killed at any point leaves either a sealed array or one that is recomputed. An array is used only
when its seal names the same inputs and its bytes hash to the sealed sha256 (as model files are
verified against their manifest). `remove` deletes the store's own files and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from patchcore_jax._src.io import atomic
from patchcore_jax._src.model.images import display

FOLDER = "features"
_SEAL = ".seal.json"


def key_name(key: dict) -> str:
    """The folder name of a feature key: the first 16 hex digits of its canonical JSON's sha256."""
    return atomic.sha256(atomic.canonical_json(key, compact=True))[:16]


def _safe(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{what} {name!r}: not usable as a file name in the feature store")
    return name


class FeatureStore:
    """The taps of one feature key under `root` (`S/features`); see the module docstring.

    `write(rel, writer)`: how files are created (an `OutputDir.write`, so the sweep's output folder
    records them); `rel` is relative to the sweep's folder, which holds `root`. `keep=False`: a store
    that reads but never writes (`save` keeps nothing: a sweep's process other than process 0).
    """

    def __init__(self, root: str, key: dict, *, write=None, prefix: str = FOLDER, keep: bool = True):
        self.key, self.keep = key, keep
        self.name = key_name(key)
        self.folder = os.path.join(root, self.name)
        self.prefix = os.path.join(prefix, self.name)
        self._write = write or (lambda rel, writer: atomic.replace_file(os.path.join(os.path.dirname(root), rel), writer))

    def _rel(self, category: str, layer: str, suffix: str) -> str:
        return os.path.join(self.prefix, _safe(category, "category"), _safe(layer, "layer") + suffix)

    def _abs(self, category: str, layer: str, suffix: str) -> str:
        return os.path.join(self.folder, _safe(category, "category"), _safe(layer, "layer") + suffix)

    def load(self, category: str, layer: str, inputs: str) -> np.ndarray | None:
        """The sealed tap `(N, h, w, C)` float32 (memory-mapped), or None when it is absent, its seal
        names other inputs, or its bytes do not match the seal (then it is recomputed)."""
        seal_path, path = self._abs(category, layer, _SEAL), self._abs(category, layer, ".npy")
        try:
            with open(seal_path, "rb") as f:
                seal = atomic.strict_json(f.read(), display(seal_path))
            if not isinstance(seal, dict) or seal.get("inputs") != inputs:
                return None
            if atomic.file_sha256(path) != seal.get("sha256"):
                return None
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if array.dtype != np.float32 or list(array.shape) != seal.get("shape"):
            return None
        return array

    def save(self, category: str, layer: str, inputs: str, array: np.ndarray) -> None:
        """Writes the tap and then its seal, each atomically (nothing in a store made with `keep=False`)."""
        if not self.keep:
            return
        array = np.ascontiguousarray(array, np.float32)
        if not os.path.exists(os.path.join(self.folder, "key.json")):
            self._write(os.path.join(self.prefix, "key.json"),
                        lambda tmp: _write_bytes(tmp, atomic.canonical_json(self.key)))

        def write_array(tmp):
            with open(tmp, "wb") as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())

        written = self._write(self._rel(category, layer, ".npy"), write_array)
        seal = {"sha256": atomic.file_sha256(written), "inputs": inputs, "shape": list(array.shape)}
        self._write(self._rel(category, layer, _SEAL), lambda tmp: _write_bytes(tmp, atomic.canonical_json(seal)))


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def size_on_disk(root: str) -> int:
    """Bytes held by the store's arrays under `root` (0 when there is none)."""
    total = 0
    for folder, _, files in os.walk(root):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files if f.endswith(".npy"))
    return total


def remove(root: str) -> int:
    """Deletes the feature store under `root` (`S/features`): its key folders' `key.json`, `.npy` and
    seal files and the folders they leave empty; anything else found there is left alone. Returns the
    number of files removed."""
    removed = 0
    if not os.path.isdir(root):
        return 0
    for key in os.listdir(root):
        folder = os.path.join(root, key)
        if not os.path.isfile(os.path.join(folder, "key.json")):
            continue
        for sub, dirs, files in os.walk(folder, topdown=False):
            for f in files:
                if f == "key.json" or f.endswith((".npy", _SEAL)) or f.endswith(atomic.TMP_SUFFIX):
                    os.remove(os.path.join(sub, f))
                    removed += 1
            with contextlib.suppress(OSError):
                os.rmdir(sub)
    with contextlib.suppress(OSError):
        os.rmdir(root)
    return removed


def describe(key: dict) -> str:
    """One line naming a feature key, for logs and `--dry-run`."""
    return json.dumps({k: key[k] for k in sorted(key) if k != "weights_sha256"}, sort_keys=True)
