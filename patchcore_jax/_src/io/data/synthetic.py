"""A deterministic synthetic defect data set with exact masks, for the demo and the tests.

Nominal images are a woven texture (oriented gratings with per-image phase, a little noise).
Defective ones carry one of four defect kinds, each painted through its own exact mask:
scratches (thin bright or dark strokes), spots (blotches of another colour), missing pieces (the
texture replaced by the flat backing) and colour changes (a hue shift of the texture).
"""

from __future__ import annotations

import numpy as np

DEFECT_KINDS = ("scratch", "spot", "missing", "colour")


def _texture(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    for angle, freq in ((0.0, 0.21), (np.pi / 2, 0.21), (np.pi / 4, 0.07)):
        phase = rng.uniform(0, 2 * np.pi)
        img += np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    img = img / 3.0 + rng.normal(0, 0.08, (size, size)).astype(np.float32)
    rgb = base[None, None, :] * (0.75 + 0.25 * img[..., None])
    return np.clip(rgb, 0.0, 1.0)


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(lo + 20, hi - 20, size=2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length, width = rng.uniform(30, 60), rng.uniform(1.5, 3.0)
        dy, dx = yy - cy, xx - cx
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= width)
        value = np.full(3, 0.95 if rng.random() < 0.5 else 0.05)
        img = np.where(mask[..., None], value, img)
    elif kind == "spot":
        ry, rx = rng.uniform(6, 14, size=2)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        colour = rng.uniform(0.0, 1.0, size=3)
        img = np.where(mask[..., None], 0.3 * img + 0.7 * colour, img)
    elif kind == "missing":
        h, w = rng.integers(12, 28, size=2)
        mask = (np.abs(yy - cy) <= h // 2) & (np.abs(xx - cx) <= w // 2)
        img = np.where(mask[..., None], np.array([0.08, 0.08, 0.1]), img)
    elif kind == "colour":
        r = rng.uniform(10, 18)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        img = np.where(mask[..., None], img[..., [2, 0, 1]], img)
    else:
        raise ValueError(f"kind: expected one of {DEFECT_KINDS}, got {kind!r}")
    return img, mask


def make_synthetic(
    *, seed: int = 0, n_train: int = 40, n_test_good: int = 15, n_test_defect: int = 20, size: int = 256, margin: int = 32
) -> dict[str, np.ndarray]:
    """The data set as arrays.

    Returns a dict: `train` `(n_train, size, size, 3)` uint8; `test` `(n_test, size, size, 3)` uint8,
    good images first; `labels` `(n_test,)` int (1 = defective); `masks` `(n_test, size, size)` bool;
    `kinds` `(n_test,)` str ("good" or a DEFECT_KINDS entry). Defects lie at least `margin` pixels
    inside the border, so a centre crop of `size - 2 * margin` keeps them whole.
    """
    rng = np.random.default_rng(seed)
    base = np.array([0.62, 0.5, 0.34], np.float32)

    def nominal():
        return _texture(rng, size, base)

    train = [nominal() for _ in range(n_train)]
    test, masks, kinds = [], [], []
    for _ in range(n_test_good):
        test.append(nominal())
        masks.append(np.zeros((size, size), bool))
        kinds.append("good")
    for i in range(n_test_defect):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        img, mask = _defect(rng, nominal(), kind, margin, size - margin)
        test.append(img)
        masks.append(mask)
        kinds.append(kind)

    def to_uint8(images):
        return np.round(np.stack(images) * 255.0).astype(np.uint8)

    return {
        "train": to_uint8(train),
        "test": to_uint8(test),
        "labels": np.array([0] * n_test_good + [1] * n_test_defect),
        "masks": np.stack(masks),
        "kinds": np.array(kinds),
    }
