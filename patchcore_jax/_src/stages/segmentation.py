"""Segmentation maps (paper Sec. 3.3): bilinear upsampling, then a Gaussian blur with SciPy's edges.

Both steps are separable linear maps along each axis, so they are composed into one `(H, h)` and one
`(W, w)` matrix (blur after upsampling) and applied as two small contractions. The blur matrix is the
33-tap (sigma 4, truncate 4) Gaussian with SciPy's 'reflect' edges (NumPy's 'symmetric' padding),
built exactly; the composed map costs `h` multiply-adds per output pixel and axis instead of 33.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from patchcore_jax._src.stages import checks, linear_maps


@functools.partial(jax.jit, static_argnames=("out_size", "sigma"))
def anomaly_maps_unchecked(patch_scores, *, out_size, sigma):
    """`anomaly_maps` without the checks (trusted inner callers, traceable)."""
    h, w = patch_scores.shape[1:]
    dtype = patch_scores.dtype if jnp.issubdtype(patch_scores.dtype, jnp.floating) else jnp.float32
    rows = linear_maps.gaussian_matrix(out_size[0], sigma) @ linear_maps.bilinear_matrix(h, out_size[0])
    cols = linear_maps.gaussian_matrix(out_size[1], sigma) @ linear_maps.bilinear_matrix(w, out_size[1])
    return jnp.einsum(
        "Hh,bhw,Ww->bHW", jnp.asarray(rows, dtype), patch_scores.astype(dtype), jnp.asarray(cols, dtype),
        precision=jax.lax.Precision.HIGHEST,
    )


def anomaly_maps(patch_scores: jax.Array, out_size, *, sigma: float = 4.0) -> jax.Array:
    """`(B, h, w)` patch scores -> `(B, H, W)` anomaly maps.

    Bilinear upsampling to `out_size` (half-pixel centres, `align_corners=False`, no antialias), then
    a Gaussian blur as `scipy.ndimage.gaussian_filter(sigma, mode="reflect", truncate=4.0)`.
    """
    checks.check_array("patch_scores", patch_scores, ndim=3)
    out_size = checks.check_out_size(out_size)
    sigma = checks.check_positive_float("sigma", sigma)
    return anomaly_maps_unchecked(jnp.asarray(patch_scores), out_size=out_size, sigma=sigma)
