"""Locally aware patch features (paper Sec. 3.1, Eq. 1-2), as the published implementation computes them.

For each layer `j`: unfold every `p x p` neighbourhood (zero padding `(p-1)//2`, vector laid out
channel-major `(C_j, p, p)`); bilinearly resize each of the `C_j * p * p` unfolded planes of the coarser
layers to the grid of the first layer; pool each layer's vector to `pretrain_dim` with 1-D adaptive
average pooling; stack the layers and pool once more to `target_dim`. Written as loops over the
definitions in array-API calls, float64 where the namespace has it, to be read next to the paper;
`patchcore_jax.aggregate` computes the same linear map.
"""

from __future__ import annotations

from typing import Any, Sequence

import array_api_extra as xpx

from reference import _checks
from reference._array_api import device, index_dtype, namespace, real_float


def adaptive_avg_pool1d(x: Any, out_len: int) -> Any:
    """PyTorch's `adaptive_avg_pool1d` over the last axis.

    Bin `i` averages `x[..., floor(i*L/O) : ceil((i+1)*L/O)]` (bins overlap when `L/O` is fractional).
    """
    xp = namespace(x)
    x = xp.asarray(x)
    x = xp.astype(x, real_float(xp, device(x)), copy=False)
    length = x.shape[-1]
    csum = xp.cumulative_sum(x, axis=-1, include_initial=True)
    i = xp.arange(out_len, dtype=index_dtype(xp, device(x)), device=device(x))
    start = (i * length) // out_len
    end = -((-(i + 1) * length) // out_len)  # ceil((i + 1) * L / O)
    width = xp.astype(end - start, x.dtype)
    return (xp.take(csum, end, axis=-1) - xp.take(csum, start, axis=-1)) / width


def unfold(x: Any, patch_size: int, stride: int = 1) -> Any:
    """`(B, H, W, C)` -> `(B, H', W', C * p * p)`: each neighbourhood flattened as `(C, p, p)`.

    Zero padding `(p-1)//2` on each side, as `torch.nn.Unfold(p, stride=stride, padding=(p-1)//2)`.
    """
    xp = namespace(x)
    x = xp.asarray(x)
    b, h, w, c = x.shape
    pad = (patch_size - 1) // 2
    padded = xpx.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), xp=xp)
    ho = _checks.unfolded_size(h, patch_size, stride)
    wo = _checks.unfolded_size(w, patch_size, stride)
    # One (B, H', W', C) plane per offset (dy, dx), stacked last: each position's vector is (C, p, p).
    planes = [
        padded[:, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride, :]
        for dy in range(patch_size)
        for dx in range(patch_size)
    ]
    return xp.reshape(xp.stack(planes, axis=-1), (b, ho, wo, c * patch_size * patch_size))


def bilinear_resize(x: Any, out_h: int, out_w: int) -> Any:
    """Bilinear resize of axes 1 and 2 of `(B, h, w, ...)`, as `F.interpolate(mode="bilinear",
    align_corners=False)` without antialiasing: source coordinate `(dst + 0.5) * in / out - 0.5`,
    clamped at 0, neighbours clamped at the last pixel."""
    xp = namespace(x)
    x = xp.asarray(x)
    x = xp.astype(x, real_float(xp, device(x)), copy=False)
    x = _resize_axis(xp, x, 1, out_h)
    return _resize_axis(xp, x, 2, out_w)


def _resize_axis(xp: Any, x: Any, axis: int, out_len: int) -> Any:
    in_len, dev = x.shape[axis], device(x)
    # DECISION: PyTorch's half-pixel rule, including its clamp of negative source coordinates to 0.
    src = xp.clip((xp.arange(out_len, dtype=x.dtype, device=dev) + 0.5) * (in_len / out_len) - 0.5, min=0.0)
    lo = xp.clip(xp.astype(xp.floor(src), index_dtype(xp, dev)), max=in_len - 1)
    hi = xp.clip(lo + 1, max=in_len - 1)
    lam = src - xp.astype(lo, x.dtype)
    shape = [1] * x.ndim
    shape[axis] = out_len
    lam = xp.reshape(lam, tuple(shape))
    return xp.take(x, lo, axis=axis) * (1.0 - lam) + xp.take(x, hi, axis=axis) * lam


def aggregate_patches(
    feature_maps: Sequence[Any],
    *,
    patch_size: int = 3,
    stride: int = 1,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
) -> Any:
    """Patch features of the memory bank (Eq. 1-2).

    Args:
      feature_maps: sequence of `(B, H_j, W_j, C_j)` arrays of one namespace, finest first.
    Returns:
      `(B, H', W', target_dim)` in that namespace (float64 where it has it), on the unfolded grid of
      `feature_maps[0]`.
    """
    patch_size = _checks.check_int("patch_size", patch_size, low=1)
    stride = _checks.check_int("stride", stride, low=1)
    pretrain_dim = _checks.check_int("pretrain_dim", pretrain_dim, low=1)
    target_dim = _checks.check_int("target_dim", target_dim, low=1)
    _checks.check_feature_maps(feature_maps, patch_size=patch_size, stride=stride)
    xp = namespace(*feature_maps)

    per_layer = []
    ref_h = ref_w = None
    for feats in feature_maps:
        feats = xp.asarray(feats)
        feats = xp.astype(feats, real_float(xp, device(feats)), copy=False)
        patches = unfold(feats, patch_size, stride)  # P_{s,p}(phi_j(x))
        if ref_h is None:
            ref_h, ref_w = patches.shape[1:3]
        else:
            patches = bilinear_resize(patches, ref_h, ref_w)
        per_layer.append(adaptive_avg_pool1d(patches, pretrain_dim))
    stacked = xp.stack(per_layer, axis=-2)  # (B, H', W', n_layers, pretrain_dim)
    flat = xp.reshape(stacked, tuple(stacked.shape[:3]) + (-1,))
    return adaptive_avg_pool1d(flat, target_dim)
