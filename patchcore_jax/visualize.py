"""Heatmap overlays as PNG: image | anomaly map | ground truth, side by side (no plotting library)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchors of a perceptually ordered dark-blue -> red -> yellow colour map (inferno-like).
_ANCHORS = np.array([
    [0.00, 0.00, 0.02], [0.26, 0.04, 0.41], [0.58, 0.15, 0.40], [0.87, 0.32, 0.23], [0.99, 0.65, 0.04], [0.99, 1.00, 0.64],
])


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """`(H, W)` -> `(H, W, 3)` uint8 through the colour map, `vmin..vmax` spanning it."""
    t = np.clip((np.asarray(values, np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    pos = t * (len(_ANCHORS) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return np.round(rgb * 255).astype(np.uint8)


def overlay_panel(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, *, vmin: float, vmax: float) -> np.ndarray:
    """One row: the (cropped) image, the map blended over it, and the mask (if any)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    heat = colorize(amap, vmin, vmax)
    blend = np.round(0.45 * img + 0.55 * heat).astype(np.uint8)
    panels = [img, blend]
    if mask is not None:
        panels.append(np.repeat((np.asarray(mask, bool) * 255).astype(np.uint8)[..., None], 3, axis=-1))
    gap = np.full((img.shape[0], 4, 3), 255, np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return np.concatenate(row, axis=1)


def map_range(model) -> tuple[float, float]:
    """A colour scale fixed by the model (the same in every run): 0 up to twice the largest nominal
    patch score recorded at fit, or up to the threshold's double when that is larger."""
    top = 1.0
    if model.calibration:
        top = 2.0 * model.calibration["patch_score_quantiles"]["1.0"]
    if model.threshold is not None:
        top = max(top, 2.0 * model.threshold)
    return 0.0, max(top, 1e-6)


def save_overlay(path: str, image, amap, mask=None, *, vmin: float, vmax: float) -> None:
    """Writes the panel as PNG to `path` (whatever its extension)."""
    Image.fromarray(overlay_panel(image, amap, mask, vmin=vmin, vmax=vmax)).save(path, format="PNG")
