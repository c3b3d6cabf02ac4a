"""Segmentation maps from patch scores (paper Sec. 3.3): bilinear upsampling, then a Gaussian blur."""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from reference import _checks
from reference.aggregate import bilinear_resize


def anomaly_maps(patch_scores: np.ndarray, out_size, *, sigma: float = 4.0) -> np.ndarray:
    """`(B, h, w)` patch scores -> `(B, H, W)` anomaly maps.

    Bilinear upsampling (half-pixel centres, `align_corners=False`, no antialias), then
    `scipy.ndimage.gaussian_filter(sigma, mode="reflect", truncate=4.0)` over each map.
    """
    _checks.check_array("patch_scores", patch_scores, ndim=3)
    out_h, out_w = _checks.check_out_size(out_size)
    sigma = _checks.check_positive_float("sigma", sigma)
    up = bilinear_resize(np.asarray(patch_scores, dtype=np.float64), out_h, out_w)
    return np.stack([scipy.ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in up])
