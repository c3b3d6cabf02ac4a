"""The one image reader: listing image files, decoding every common mode, refusing what it cannot read.

Every path into the library (`PatchCore.fit/predict`, the `fit`, `predict`, `evaluate` and `demo`
commands, the data set readers and the TFDS builders) decodes files here and nowhere else, so one
picture becomes one array whichever way it enters.

Decoding rules (`read_image` -> `(H, W, 3)` uint8 RGB):
- 8-bit modes (`1`, `L`, `LA`, `P`, `PA`, `RGB`, `RGBA`, `CMYK`, `YCbCr`, ...): PIL's `convert("RGB")`,
  exactly what torchvision's default loader (and the published PatchCore) does; alpha is dropped.
- 16-bit grayscale (`I;16`, `I;16B`, `I;16L`, and `I` images whose values lie in 0..65535): the full
  16-bit range maps onto 0..255, `round(v / 257)`, so a 16-bit copy of an 8-bit picture (v * 257) reads
  back exactly as the 8-bit one. `I` images with values outside 0..65535 are refused.
- 32-bit float (`F`): values in [0, 1] are intensities, `round(v * 255)`; any other range, NaN or
  infinity is refused with the file and its range named.
- Multi-frame files (GIF, TIFF stacks) give their first frame. EXIF orientation is not applied (as
  torchvision's loader does not).
- Limits: an image of more than `MAX_PIXELS` pixels is refused before it is decoded; PIL's
  decompression-bomb guard is an error too. Both name the file.

Listing rules (`list_images`):
- A folder is searched recursively; entries are taken in sorted order of their path components.
- Hidden entries (names starting with "."; this covers `.DS_Store` and AppleDouble `._x.png`) and
  files without an image suffix (`Thumbs.db`, `desktop.ini`, ...) are skipped; so are FIFOs, sockets
  and devices, which are never opened (opening a FIFO would block).
- Symbolic links are followed, to files and to folders alike; a folder reached a second time (a link
  cycle, or two links to one folder) is read once, and a broken link is skipped with a warning.
- Folders written by this program (holding `outputs.MARKER`) are never read as input.
- A file named directly is taken whatever its suffix (the reader then says if it is not an image);
  a path that is neither a folder nor a regular file is an error naming it.
- Paths are `str`; a name that is not valid UTF-8 is carried with surrogate escapes (`os.fsdecode`)
  and shown with backslash escapes (`display`).
"""

from __future__ import annotations

import os
import stat
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm")
# 2**26 pixels (e.g. 8192 x 8192): below PIL's own bomb threshold, so this check speaks first.
MAX_PIXELS = 1 << 26
OUTPUT_MARKER = ".patchcore-jax-output.json"  # written by patchcore_jax.outputs; kept here to avoid a cycle

_EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def display(path) -> str:
    """A path as text that can always be printed or written to a UTF-8 file (bad bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(paths, *, exclude: Sequence[str] = (), recursive: bool = True) -> list[str]:
    """Image files named directly or found under folders, by the listing rules of this module.

    Args:
      paths: one path (str, bytes, os.PathLike) or a sequence of them.
      exclude: folders never to enter (e.g. this run's own output folder).
      recursive: False takes only the files directly inside each folder.
    Returns:
      file paths as `str`, in a stable order: the arguments' order, and within a folder the sorted
      order of path components.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    skip = {os.path.realpath(os.fsdecode(p)) for p in exclude}
    found: list[str] = []
    for p in map(os.fsdecode, paths):
        st = _stat(p, "no such file or folder")
        if stat.S_ISDIR(st.st_mode):
            found += _walk(p, skip, recursive)
        elif stat.S_ISREG(st.st_mode):
            found.append(p)
        else:
            raise ValueError(f"{display(p)}: not a regular file or folder (a FIFO, socket or device)")
    return found


def _walk(top: str, skip: set[str], recursive: bool = True) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []

    def visit(folder: str) -> None:
        real = os.path.realpath(folder)
        if real in seen or real in skip:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise ValueError(f"{display(folder)}: cannot list the folder ({err.strerror})") from None
        if any(e.name == OUTPUT_MARKER for e in entries) and folder != top:
            return  # an output folder of this program: never read back as input
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            path = os.path.join(folder, entry.name)
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                if recursive:
                    visit(path)
            elif is_file:
                if entry.name.lower().endswith(IMAGE_SUFFIXES):
                    out.append(path)
            elif entry.is_symlink() and not os.path.exists(path):
                warnings.warn(f"{display(path)}: broken symbolic link, skipped", stacklevel=3)

    if os.path.exists(os.path.join(top, OUTPUT_MARKER)):
        raise ValueError(f"{display(top)}: an output folder of patchcore-jax, not an image folder")
    visit(top)
    return out


def _stat(path: str, missing: str) -> os.stat_result:
    """`os.stat` (symlinks followed) with errors that name the path."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{display(path)}: {missing}") from None
    except OSError as err:
        raise ValueError(f"{display(path)}: cannot be read ({err.strerror})") from None


def _check_regular(path: str) -> None:
    st = _stat(path, "no such file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{display(path)}: not a regular file (a folder, FIFO, socket or device)")
    if st.st_size == 0:
        raise ValueError(f"{display(path)}: empty file")


def _open(path: str, max_pixels: int | None) -> Image.Image:
    """Opens (header only) with both pixel limits as errors naming the file."""
    _check_regular(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{display(path)}: refused by PIL's decompression-bomb guard ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{display(path)}: not a readable image ({err})") from None
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise ValueError(f"{display(path)}: {w}x{h} pixels is more than the limit of {max_pixels}; "
                         "downscale or tile it first")
    bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    if bombs:
        im.close()
        raise ValueError(f"{display(path)}: refused by PIL's decompression-bomb guard ({bombs[0].message})")
    if w == 0 or h == 0:
        im.close()
        raise ValueError(f"{display(path)}: has no pixels ({w}x{h})")
    return im


def check_image(path, *, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """Reads the header: `(height, width)`, or ValueError naming the file (not an image, unsupported
    mode, too many pixels). Cheap; used to validate inputs before any work. 32-bit integer and float
    images are decoded too, since their value range decides whether they can be read."""
    path = os.fsdecode(path)
    with _open(path, max_pixels) as im:
        _check_mode(path, im.mode)
        size = im.size[1], im.size[0]
        value_checked = im.mode in ("I", "F")
    if value_checked:  # their values decide whether they can be read: decode them now
        read_image(path, max_pixels=max_pixels)
    return size


def _check_mode(path: str, mode: str) -> None:
    if mode not in _EIGHT_BIT_MODES + _SIXTEEN_BIT_MODES + ("I", "F"):
        raise ValueError(f"{display(path)}: unsupported image mode {mode!r}")


def read_image(path, *, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB by the decoding rules of this module; ValueError names the file."""
    path = os.fsdecode(path)
    with _open(path, max_pixels) as im:
        _check_mode(path, im.mode)
        try:
            im.seek(0)
            im.load()
            return pil_to_rgb8(im, name=display(path))
        except (OSError, SyntaxError, ValueError) as err:
            if isinstance(err, ValueError) and str(err).startswith(display(path)):
                raise
            raise ValueError(f"{display(path)}: not a readable image ({err})") from None


def pil_to_rgb8(im: Image.Image, *, name: str = "image") -> np.ndarray:
    """A decoded PIL image -> `(H, W, 3)` uint8 by the decoding rules of this module."""
    mode = im.mode
    if mode in _EIGHT_BIT_MODES:
        return np.asarray(im.convert("RGB"))
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return array_to_rgb8(np.asarray(im), name=name)
    if mode == "F":
        return array_to_rgb8(np.asarray(im, np.float32), name=name)
    raise ValueError(f"{name}: unsupported image mode {mode!r}")


def array_to_rgb8(array: np.ndarray, *, name: str = "image") -> np.ndarray:
    """One image as an array -> `(H, W, 3)` uint8 RGB.

    Shapes `(H, W)`, `(H, W, 1)` (grayscale), `(H, W, 3)` (RGB) or `(H, W, 4)` (RGBA, alpha dropped).
    dtypes: uint8 as is; uint16 (and integers within 0..65535) by `round(v / 257)`; floats in [0, 1] by
    `round(v * 255)` (the 8 bits a PNG of them would hold); anything else is refused.
    """
    x = np.asarray(array)
    if x.ndim == 3 and x.shape[-1] in (1, 3, 4):
        x = x[..., :3] if x.shape[-1] == 4 else x
    elif x.ndim != 2:
        raise ValueError(f"{name}: expected one image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                         f"got shape {x.shape}")
    if 0 in x.shape[:2]:
        raise ValueError(f"{name}: has no pixels (shape {x.shape})")
    if x.dtype == np.uint8:
        out = x
    elif x.dtype == np.bool_:
        raise ValueError(f"{name}: boolean arrays are masks, not images; pass uint8 or float images")
    elif x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{name}: integer pixel values must lie in 0..65535 (16-bit), got {lo}..{hi}")
        out = np.rint(x.astype(np.float64) / 257.0).astype(np.uint8)
    elif x.dtype.kind == "f":
        finite = np.isfinite(x)
        if not finite.all():
            raise ValueError(f"{name}: found {int(x.size - finite.sum())} NaN or infinite pixel values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: float pixel values must lie in [0, 1], got [{lo:.6g}, {hi:.6g}]")
        out = np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"{name}: expected uint8, uint16 or float pixels, got dtype {x.dtype}")
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)


def read_mask(path, *, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask file -> `(H, W)` uint8 in 0..255, not yet binarised.

    8-bit modes through PIL's `convert("L")` (MVTec's 0/255 masks are unchanged), 16-bit and float
    masks by the image rules above (then their first channel). Binarisation happens after the
    geometry (`patchcore_jax.preprocess.preprocess_mask`), as in the published code.
    """
    path = os.fsdecode(path)
    with _open(path, max_pixels) as im:
        _check_mode(path, im.mode)
        try:
            im.seek(0)
            im.load()
            if im.mode in _EIGHT_BIT_MODES:
                return np.asarray(im.convert("L"))
            return pil_to_rgb8(im, name=display(path))[..., 0].copy()
        except (OSError, SyntaxError) as err:
            raise ValueError(f"{display(path)}: not a readable mask image ({err})") from None

