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

from patchcore_jax._src.stages import linear_maps as _linear_maps
from patchcore_jax._src.stages import checks as _checks

_HIGHEST = jax.lax.Precision.HIGHEST


def _layer_contribution(x: jax.Array, first_channel: np.ndarray, weights: np.ndarray, patch_size: int, stride: int) -> jax.Array:
    """`(B, H, W, C)` -> `(B, H', W', O_j)`: each output's weighted patch sum over its channel run."""
    b, h, w, _ = x.shape
    pad = (patch_size - 1) // 2
    n_out, n_channels = weights.shape[:2]
    channel_idx = (first_channel[:, None] + np.arange(n_channels)[None, :]).ravel()  # (O_j * n_channels,)
    if channel_idx.size == x.shape[-1] and np.array_equal(channel_idx, np.arange(channel_idx.size)):
        # Each output owns its own run of channels (WRN50-2's layer2 and layer3 at pretrain_dim 1024):
        # no gather (XLA's CPU gather took two thirds of the aggregation's time).
        runs = x
    else:
        runs = x[..., channel_idx]  # (B, H, W, O_j * n_channels): a few channels per output
    runs = jnp.pad(runs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = _checks.unfolded_size(h, patch_size, stride)
    wo = _checks.unfolded_size(w, patch_size, stride)
    w_j = jnp.asarray(weights.reshape(n_out * n_channels, patch_size * patch_size), dtype=x.dtype)
    # Products and sums along the contiguous channel axis, which XLA fuses into one loop (as an einsum
    # over (output, run) it became a batched matrix product with a contraction of 1 or 2, slow on a CPU);
    # the sum over each output's run comes last.
    acc = None
    for dy in range(patch_size):
        for dx in range(patch_size):
            window = runs[:, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride]
            term = window * w_j[:, dy * patch_size + dx]
            acc = term if acc is None else acc + term
    return jnp.sum(acc.reshape(b, ho, wo, n_out, n_channels), axis=-1)


@functools.partial(jax.jit, static_argnames=("patch_size", "stride", "pretrain_dim", "target_dim"))
def aggregate_linear(feature_maps, *, patch_size, stride, pretrain_dim, target_dim):
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
    return aggregate_linear(
        tuple(jnp.asarray(f) for f in feature_maps),
        patch_size=patch_size,
        stride=stride,
        pretrain_dim=pretrain_dim,
        target_dim=target_dim,
    )
