"""Locally aware patch features (paper Sec. 3.1, Eq. 1-2), as the published implementation computes them.

For each layer `j`: unfold every `p x p` neighbourhood (zero padding `(p-1)//2`, vector laid out
channel-major `(C_j, p, p)`); bilinearly resize each of the `C_j * p * p` unfolded planes of the coarser
layers to the grid of the first layer; pool each layer's vector to `pretrain_dim` with 1-D adaptive
average pooling; stack the layers and pool once more to `target_dim`. Written as loops over the
definitions, float64, to be read next to the paper; `patchcore_jax.aggregate` computes the same linear map.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from reference import _checks


def adaptive_avg_pool1d(x: np.ndarray, out_len: int) -> np.ndarray:
    """PyTorch's `adaptive_avg_pool1d` over the last axis.

    Bin `i` averages `x[..., floor(i*L/O) : ceil((i+1)*L/O)]` (bins overlap when `L/O` is fractional).
    """
    length = x.shape[-1]
    csum = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(x, axis=-1)], axis=-1)
    i = np.arange(out_len)
    start = (i * length) // out_len
    end = -((-(i + 1) * length) // out_len)  # ceil((i + 1) * L / O)
    return (csum[..., end] - csum[..., start]) / (end - start)


def unfold(x: np.ndarray, patch_size: int, stride: int = 1) -> np.ndarray:
    """`(B, H, W, C)` -> `(B, H', W', C * p * p)`: each neighbourhood flattened as `(C, p, p)`.

    Zero padding `(p-1)//2` on each side, as `torch.nn.Unfold(p, stride=stride, padding=(p-1)//2)`.
    """
    b, h, w, c = x.shape
    pad = (patch_size - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = _checks.unfolded_size(h, patch_size, stride)
    wo = _checks.unfolded_size(w, patch_size, stride)
    out = np.zeros((b, ho, wo, c, patch_size, patch_size), dtype=x.dtype)
    for dy in range(patch_size):
        for dx in range(patch_size):
            out[..., dy, dx] = xp[:, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride]
    return out.reshape(b, ho, wo, c * patch_size * patch_size)


def bilinear_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of axes 1 and 2 of `(B, h, w, ...)`, as `F.interpolate(mode="bilinear",
    align_corners=False)` without antialiasing: source coordinate `(dst + 0.5) * in / out - 0.5`,
    clamped at 0, neighbours clamped at the last pixel."""
    x = _resize_axis(x, 1, out_h)
    return _resize_axis(x, 2, out_w)


def _resize_axis(x: np.ndarray, axis: int, out_len: int) -> np.ndarray:
    in_len = x.shape[axis]
    # DECISION: PyTorch's half-pixel rule, including its clamp of negative source coordinates to 0.
    src = np.maximum((np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    lo = np.minimum(lo, in_len - 1)
    hi = np.minimum(lo + 1, in_len - 1)
    lam = src - lo
    shape = [1] * x.ndim
    shape[axis] = out_len
    lam = lam.reshape(shape)
    return np.take(x, lo, axis=axis) * (1.0 - lam) + np.take(x, hi, axis=axis) * lam


def aggregate_patches(
    feature_maps: Sequence[np.ndarray],
    *,
    patch_size: int = 3,
    stride: int = 1,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
) -> np.ndarray:
    """Patch features of the memory bank (Eq. 1-2).

    Args:
      feature_maps: sequence of `(B, H_j, W_j, C_j)` arrays, finest first.
    Returns:
      `(B, H', W', target_dim)` float64, on the unfolded grid of `feature_maps[0]`.
    """
    patch_size = _checks.check_int("patch_size", patch_size, low=1)
    stride = _checks.check_int("stride", stride, low=1)
    pretrain_dim = _checks.check_int("pretrain_dim", pretrain_dim, low=1)
    target_dim = _checks.check_int("target_dim", target_dim, low=1)
    _checks.check_feature_maps(feature_maps, patch_size=patch_size, stride=stride)

    per_layer = []
    ref_h = ref_w = None
    for feats in feature_maps:
        patches = unfold(np.asarray(feats, dtype=np.float64), patch_size, stride)  # P_{s,p}(phi_j(x))
        if ref_h is None:
            ref_h, ref_w = patches.shape[1:3]
        else:
            patches = bilinear_resize(patches, ref_h, ref_w)
        per_layer.append(adaptive_avg_pool1d(patches, pretrain_dim))
    stacked = np.stack(per_layer, axis=-2)  # (B, H', W', n_layers, pretrain_dim)
    flat = stacked.reshape(stacked.shape[:3] + (-1,))
    return adaptive_avg_pool1d(flat, target_dim)
