"""Locally aware patch features (paper Eq. 1-2) as one compiled, batched linear map.

The published chain (unfold -> bilinear resize of the unfolded planes -> adaptive average pooling per
layer -> pooling over the stacked layers) is linear in the features and acts on channels and space
separately, so it is computed in the cheaper order: for each output dimension, a weighted `p x p`
zero-padded sum over the few consecutive channels its pooling bins cover, then the bilinear resize of
the (already reduced) maps to the first layer's grid. No `C * p * p` unfold is ever materialised.
The weights come from `_linear_maps.aggregation_weights` and are exact for any widths.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax import _linear_maps
from patchcore_jax import _checks

_HIGHEST = jax.lax.Precision.HIGHEST


def _layer_contribution(x: jax.Array, first_channel: np.ndarray, weights: np.ndarray, patch_size: int, stride: int) -> jax.Array:
    """`(B, H, W, C)` -> `(B, H', W', O_j)`: each output's weighted patch sum over its channel run."""
    b, h, w, _ = x.shape
    pad = (patch_size - 1) // 2
    n_channels = weights.shape[1]
    channel_idx = first_channel[:, None] + np.arange(n_channels)[None, :]  # (O_j, n_channels)
    gathered = x[..., channel_idx]  # (B, H, W, O_j, n_channels): a few channels per output
    gathered = jnp.pad(gathered, ((0, 0), (pad, pad), (pad, pad), (0, 0), (0, 0)))
    ho = _checks.unfolded_size(h, patch_size, stride)
    wo = _checks.unfolded_size(w, patch_size, stride)
    w_j = jnp.asarray(weights, dtype=x.dtype)
    out = None
    for dy in range(patch_size):
        for dx in range(patch_size):
            window = gathered[:, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride]
            term = jnp.einsum("bhwot,ot->bhwo", window, w_j[:, :, dy * patch_size + dx], precision=_HIGHEST)
            out = term if out is None else out + term
    return out


@functools.partial(jax.jit, static_argnames=("patch_size", "stride", "pretrain_dim", "target_dim"))
def _aggregate(feature_maps, *, patch_size, stride, pretrain_dim, target_dim):
    n_layers = len(feature_maps)
    dtype = jnp.result_type(*[f.dtype for f in feature_maps])
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    ref_h = _checks.unfolded_size(feature_maps[0].shape[1], patch_size, stride)
    ref_w = _checks.unfolded_size(feature_maps[0].shape[2], patch_size, stride)
    out = jnp.zeros((feature_maps[0].shape[0], ref_h, ref_w, target_dim), dtype)
    for j, feats in enumerate(feature_maps):
        o_lo, o_hi, first_channel, weights = _linear_maps.aggregation_weights(
            feats.shape[-1], patch_size, pretrain_dim, target_dim, n_layers, j
        )
        part = _layer_contribution(feats.astype(dtype), first_channel, weights, patch_size, stride)
        if part.shape[1:3] != (ref_h, ref_w):
            r_h = jnp.asarray(_linear_maps.bilinear_matrix(part.shape[1], ref_h), dtype)
            r_w = jnp.asarray(_linear_maps.bilinear_matrix(part.shape[2], ref_w), dtype)
            part = jnp.einsum("Hh,bhwo,Ww->bHWo", r_h, part, r_w, precision=_HIGHEST)
        out = out.at[..., o_lo:o_hi].add(part)
    return out


def aggregate_patches(
    feature_maps: Sequence[jax.Array],
    *,
    patch_size: int = 3,
    stride: int = 1,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
) -> jax.Array:
    """Patch features of the memory bank (Eq. 1-2), as the published implementation computes them.

    Args:
      feature_maps: sequence of `(B, H_j, W_j, C_j)` arrays, finest first (WRN50-2: layer2, layer3).
      patch_size, stride: the neighbourhood `P_{s,p}`; zero padding `(patch_size - 1) // 2`.
      pretrain_dim: per-layer adaptive-pooling width; target_dim: final width.
    Returns:
      `(B, H', W', target_dim)` on the unfolded grid of `feature_maps[0]` (`H' = H_0` for stride 1).
    """
    patch_size = _checks.check_int("patch_size", patch_size, low=1)
    stride = _checks.check_int("stride", stride, low=1)
    pretrain_dim = _checks.check_int("pretrain_dim", pretrain_dim, low=1)
    target_dim = _checks.check_int("target_dim", target_dim, low=1)
    _checks.check_feature_maps(feature_maps, patch_size=patch_size, stride=stride)
    return _aggregate(
        tuple(jnp.asarray(f) for f in feature_maps),
        patch_size=patch_size,
        stride=stride,
        pretrain_dim=pretrain_dim,
        target_dim=target_dim,
    )
