"""Segmentation maps from patch scores (paper Sec. 3.3): bilinear upsampling, then a Gaussian blur.

Both written in array-API calls; `scipy.ndimage.gaussian_filter` (the published implementation's blur)
is the tests' oracle for the blur.
"""

from __future__ import annotations

from typing import Any

from reference import _checks
from reference._array_api import device, index_dtype, namespace, real_float
from reference.aggregate import bilinear_resize


def gaussian_blur_1d(x: Any, sigma: float, axis: int, *, truncate: float = 4.0) -> Any:
    """`scipy.ndimage.gaussian_filter1d(x, sigma, axis, mode="reflect", truncate=truncate)`.

    `2r + 1` taps, `r = int(truncate * sigma + 0.5)`, weights `exp(-t^2 / 2 sigma^2)` normalised to
    sum 1; the edges reflect half-sample symmetrically (`d c b a | a b c d | d c b a`), repeatedly
    when the radius exceeds the axis.
    """
    xp = namespace(x)
    n, dev = x.shape[axis], device(x)
    radius = int(truncate * sigma + 0.5)
    taps = xp.arange(-radius, radius + 1, dtype=x.dtype, device=dev)
    weights = xp.exp(-0.5 * (taps / sigma) ** 2)
    weights = weights / xp.sum(weights)
    positions = xp.arange(n, dtype=index_dtype(xp, dev), device=dev)
    out = xp.zeros_like(x)
    for t in range(-radius, radius + 1):
        # out[i] += w_t x[i + t], with SciPy's mode="reflect" for any offset: the reflected axis is
        # periodic with period 2n.
        source = (positions + t) % (2 * n)
        source = xp.where(source >= n, 2 * n - 1 - source, source)
        out = out + weights[t + radius] * xp.take(x, source, axis=axis)
    return out


def anomaly_maps(patch_scores: Any, out_size, *, sigma: float = 4.0) -> Any:
    """`(B, h, w)` patch scores -> `(B, H, W)` anomaly maps, in the namespace of `patch_scores`.

    Bilinear upsampling (half-pixel centres, `align_corners=False`, no antialias), then the Gaussian
    blur of `scipy.ndimage.gaussian_filter(sigma, mode="reflect", truncate=4.0)` over each map: the
    1-D blur along the rows, then along the columns.
    """
    _checks.check_array("patch_scores", patch_scores, ndim=3)
    out_h, out_w = _checks.check_out_size(out_size)
    sigma = _checks.check_positive_float("sigma", sigma)
    xp = namespace(patch_scores)
    patch_scores = xp.asarray(patch_scores)
    up = bilinear_resize(xp.astype(patch_scores, real_float(xp, device(patch_scores))), out_h, out_w)
    return gaussian_blur_1d(gaussian_blur_1d(up, sigma, axis=1), sigma, axis=2)
