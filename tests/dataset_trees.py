"""Small data-set folders in the layouts of MVTec AD, MTD and mSTC, made from the synthetic set."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from patchcore_jax._src.io.data.synthetic import _defect, _texture


def _rgb(rng, h, w, kind=None):
    size = max(h, w)
    img = _texture(rng, size, np.array([0.55, 0.5, 0.4], np.float32))
    mask = np.zeros((size, size), bool)
    if kind:
        img, mask = _defect(rng, img, kind, 8, size - 8)
    return (np.round(img[:h, :w] * 255)).astype(np.uint8), mask[:h, :w]


def _save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(path)


def make_mvtec(root, *, seed=0):
    """Two categories: `bottle` (RGB 80x80) and `grid` (grayscale 72x72, like MVTec's grid)."""
    rng = np.random.default_rng(seed)
    for cat, size, mode in (("bottle", 80, None), ("grid", 72, "L")):
        for i in range(4):
            _save(f"{root}/{cat}/train/good/{i:03d}.png", _rgb(rng, size, size)[0], mode)
        for i in range(2):
            _save(f"{root}/{cat}/test/good/{i:03d}.png", _rgb(rng, size, size)[0], mode)
        for defect, n in (("scratch", 2), ("spot", 1)):
            for i in range(n):
                img, mask = _rgb(rng, size, size, "missing" if defect == "spot" else "scratch")
                _save(f"{root}/{cat}/test/{defect}/{i:03d}.png", img, mode)
                _save(f"{root}/{cat}/ground_truth/{defect}/{i:03d}_mask.png", (mask * 255).astype(np.uint8))
    return root


def make_mtd(root, *, seed=0):
    """Five defect-free tiles and three defective ones of odd, differing sizes, .jpg with .png masks."""
    rng = np.random.default_rng(seed)
    sizes = [(70, 90), (81, 65), (77, 77), (64, 96), (90, 70)]
    for i, (h, w) in enumerate(sizes):
        img, mask = _rgb(rng, h, w)
        _save(f"{root}/MT_Free/Imgs/exp{i}.jpg", img)
        _save(f"{root}/MT_Free/Imgs/exp{i}.png", (mask * 255).astype(np.uint8))
    for kind, n in (("MT_Blowhole", 2), ("MT_Crack", 1)):
        for i in range(n):
            img, mask = _rgb(rng, 72 + 3 * i, 84, "spot")
            _save(f"{root}/{kind}/Imgs/exp{i}.jpg", img)
            _save(f"{root}/{kind}/Imgs/exp{i}.png", (mask * 255).astype(np.uint8))
    return root


def make_mstc(root, *, seed=0, frames=15):
    """Scene 01: one training clip and one test clip of `frames` 96x128 frames (every 5th is used);
    test frames 5 and 10 hold an anomaly with its pixel mask."""
    rng = np.random.default_rng(seed)
    for n in range(frames):
        _save(f"{root}/training/frames/01_001/{n:03d}.jpg", _rgb(rng, 96, 128)[0])
    labels = np.zeros(frames, np.int64)
    pixels = np.zeros((frames, 96, 128), np.uint8)
    for n in range(frames):
        kind = "missing" if n in (5, 10) else None
        img, mask = _rgb(rng, 96, 128, kind)
        _save(f"{root}/testing/frames/01_0014/{n:03d}.jpg", img)
        labels[n], pixels[n] = int(mask.any()), mask
    os.makedirs(f"{root}/testing/test_frame_mask", exist_ok=True)
    os.makedirs(f"{root}/testing/test_pixel_mask", exist_ok=True)
    np.save(f"{root}/testing/test_frame_mask/01_0014.npy", labels)
    np.save(f"{root}/testing/test_pixel_mask/01_0014.npy", pixels)
    return root
