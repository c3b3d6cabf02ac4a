"""Reading images and masks from files, and bringing masks through the images' geometry."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_images(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Image files named directly or found (recursively, sorted) under directories."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            for root, _, files in sorted(os.walk(p)):
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory")
    return found


def read_image(path: str) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB; grayscale and palette images are expanded; ValueError names the file."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None


def read_mask(path: str) -> np.ndarray:
    """`(H, W)` bool ground truth: a pixel is anomalous where the mask is above half its range."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file")
    try:
        with Image.open(path) as im:
            m = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable mask image ({err})") from None
    return m > 127


def preprocess_masks(masks: np.ndarray, *, resize: int, crop: int) -> np.ndarray:
    """Masks `(B, H, W)` through the images' geometry: bilinear resize of the shorter side to
    `resize` (as the published code resizes its masks), centre crop, then binarised at 0.5."""
    from patchcore_jax.model import resized_shape

    masks = np.asarray(masks)
    out = []
    for m in masks:
        h, w = m.shape
        rh, rw = resized_shape(h, w, resize)
        im = Image.fromarray(m.astype(np.float32))
        if (rh, rw) != (h, w):
            im = im.resize((rw, rh), Image.BILINEAR)
        arr = np.asarray(im)
        top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
        out.append(arr[top : top + crop, left : left + crop] >= 0.5)
    return np.stack(out) if out else np.zeros((0, crop, crop), bool)


def group_by_size(paths: Iterable[str], batch_size: int):
    """Yields `(paths, uint8 batch)` with images of one size per batch, in the given order."""
    pending: dict[tuple[int, int], list] = {}
    for p in paths:
        img = read_image(p)
        group = pending.setdefault(img.shape[:2], [])
        group.append((p, img))
        if len(group) == batch_size:
            yield [q for q, _ in group], np.stack([i for _, i in group])
            group.clear()
    for group in pending.values():
        if group:
            yield [q for q, _ in group], np.stack([i for _, i in group])
