"""Constant matrices of the linear stages, built once in NumPy (float64) at trace time.

Bilinear resizing, the Gaussian blur and the patch aggregation's pooling are fixed linear maps; the
JAX stages apply them as small matrices, so XLA sees dense, fusable contractions and no gathers.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_len: int, out_len: int) -> np.ndarray:
    """`(out_len, in_len)` matrix of PyTorch's bilinear resize along one axis (`align_corners=False`,
    no antialias): source `max((dst + 0.5) * in / out - 0.5, 0)`, neighbours clamped to the edge."""
    src = np.maximum((np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
    hi = np.minimum(lo + 1, in_len - 1)
    lam = src - lo
    mat = np.zeros((out_len, in_len))
    np.add.at(mat, (np.arange(out_len), lo), 1.0 - lam)
    np.add.at(mat, (np.arange(out_len), hi), lam)
    mat.setflags(write=False)
    return mat


def _reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """SciPy's mode='reflect' (half-sample symmetric, `d c b a | a b c d | d c b a`) for any offset."""
    period = 2 * size
    index = np.mod(index, period)
    return np.where(index >= size, period - 1 - index, index)


@functools.lru_cache(maxsize=64)
def gaussian_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """`(size, size)` matrix of `scipy.ndimage.gaussian_filter1d(sigma, mode="reflect", truncate)`:
    `2r + 1` taps, `r = int(truncate * sigma + 0.5)`, weights `exp(-x^2 / 2 sigma^2)` normalised."""
    radius = int(truncate * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    mat = np.zeros((size, size))
    rows = np.repeat(np.arange(size), len(taps))
    cols = _reflect_index(rows + np.tile(taps, size), size)
    np.add.at(mat, (rows, cols), np.tile(weights, size))
    mat.setflags(write=False)
    return mat


def _pool_bins(length: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins `[floor(i L / O), ceil((i + 1) L / O))` of PyTorch's adaptive average pooling."""
    i = np.arange(out_len)
    return (i * length) // out_len, -((-(i + 1) * length) // out_len)


@functools.lru_cache(maxsize=32)
def aggregation_weights(
    channels: int, patch_size: int, pretrain_dim: int, target_dim: int, n_layers: int, layer: int
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """What layer `layer` contributes to each output dimension of the patch aggregation.

    The two adaptive poolings (per layer to `pretrain_dim`, then over the stacked layers to
    `target_dim`) compose to one linear map from the layer's unfolded `(C, p, p)` vector; every output
    row of it covers a contiguous run of that vector, hence a few consecutive channels.

    Returns:
      `(o_lo, o_hi, first_channel, weights)`: outputs `o_lo:o_hi` receive
      `sum_{t, k} weights[o, t, k] * unfolded[first_channel[o] + t, k]`; `first_channel` is
      `(O_j,)` int, `weights` `(O_j, n_channels, p * p)`, zero where a channel is out of the run.
    """
    area = patch_size * patch_size
    length = channels * area
    inner_start, inner_end = _pool_bins(length, pretrain_dim)
    outer_start, outer_end = _pool_bins(n_layers * pretrain_dim, target_dim)
    block_lo, block_hi = layer * pretrain_dim, (layer + 1) * pretrain_dim
    outputs = np.nonzero((outer_start < block_hi) & (outer_end > block_lo))[0]
    o_lo, o_hi = int(outputs[0]), int(outputs[-1]) + 1
    rows = []
    for o in range(o_lo, o_hi):
        inner = np.arange(max(outer_start[o], block_lo), min(outer_end[o], block_hi)) - block_lo
        lo, hi = int(inner_start[inner].min()), int(inner_end[inner].max())
        row = np.zeros(hi - lo)
        scale = 1.0 / (outer_end[o] - outer_start[o])
        for i in inner:
            row[inner_start[i] - lo : inner_end[i] - lo] += scale / (inner_end[i] - inner_start[i])
        rows.append((lo, row))
    first_channel = np.array([lo // area for lo, _ in rows])
    last_channel = np.array([(lo + len(row) - 1) // area for lo, row in rows])
    n_channels = int((last_channel - first_channel).max()) + 1
    weights = np.zeros((o_hi - o_lo, n_channels * area))
    for o, (lo, row) in enumerate(rows):
        offset = lo - first_channel[o] * area
        weights[o, offset : offset + len(row)] = row
    # Keep the gathered channel indices in range; the weights of any clipped channel are zero.
    first_channel = np.minimum(first_channel, channels - n_channels)
    shift = np.array([lo // area for lo, _ in rows]) - first_channel
    shifted = np.zeros_like(weights)
    for o in range(len(rows)):
        s = shift[o] * area
        shifted[o, s:] = weights[o, : weights.shape[1] - s]
    return o_lo, o_hi, first_channel, shifted.reshape(o_hi - o_lo, n_channels, area)
