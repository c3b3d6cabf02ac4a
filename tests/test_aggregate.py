import importlib.util

import numpy as np
import pytest
from hypothesis import given, strategies as st

import patchcore_jax
import reference
from tests.helpers import assert_close, both_ways, gaussian, oracle, x64

GRIDS = [(4, 4), (5, 3), (6, 6)]


@st.composite
def aggregate_cases(draw):
    n_layers = draw(st.integers(1, 3))
    h, w = draw(st.sampled_from(GRIDS))
    shapes = []
    for j in range(n_layers):
        shapes.append((draw(st.sampled_from([1, 2])) if j == 0 else shapes[0][0], max(2, h >> j), max(2, w >> j), draw(st.sampled_from([1, 3, 8]))))
    options = dict(
        patch_size=draw(st.sampled_from([1, 2, 3])),
        stride=draw(st.sampled_from([1, 2])),
        pretrain_dim=draw(st.sampled_from([4, 10, 32])),
        target_dim=draw(st.sampled_from([3, 16, 40])),
    )
    return shapes, options, draw(st.integers(0, 2**16))


@given(aggregate_cases())
def test_matches_reference_float32(case):
    shapes, options, seed = case
    feats = [gaussian(seed + j, s) for j, s in enumerate(shapes)]
    expected = oracle.aggregate_patches(feats, **options)
    feats32 = [f.astype(np.float32) for f in feats]
    for how, got in both_ways(lambda *f: patchcore_jax.aggregate_patches(list(f), **options), *feats32):
        assert_close(got, expected, np.float32, err_msg=how)


@given(aggregate_cases())
def test_matches_reference_float64(case):
    shapes, options, seed = case
    feats = [gaussian(seed + j, s) for j, s in enumerate(shapes)]
    with x64():
        got = patchcore_jax.aggregate_patches(feats, **options)
        assert got.dtype == np.float64
        assert_close(got, oracle.aggregate_patches(feats, **options), np.float64)


def _box3(x, centre_weight):
    """Zero-padded 3x3 weighted sum per channel of (B, H, W, C): ones, centre = centre_weight."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = (centre_weight - 1.0) * x
    for dy in range(3):
        for dx in range(3):
            out = out + xp[:, dy : dy + x.shape[1], dx : dx + x.shape[2]]
    return out


def test_wide_resnet_widths_fixed_example():
    # The published WRN50-2 configuration (512 + 1024 channels, p=3, 1024 -> 1024) worked out by hand:
    # layer2's 4608 values pool in overlapping 5-wide bins, then pairs of them average, so output o is
    # channel o's 3x3 sum with the centre counted twice, over 10. Layer3's 9216 values pool in 9-wide
    # bins (one channel's 3x3 mean each), pairs average, so output 512 + o is the mean over channels
    # 2o, 2o+1 of the 3x3 mean, bilinearly upsampled 2x.
    layer2, layer3 = gaussian(0, (1, 4, 4, 512)), gaussian(1, (1, 2, 2, 1024))
    got = reference.aggregate_patches([layer2, layer3])
    np.testing.assert_allclose(got[..., :512], _box3(layer2, 2.0) / 10.0, atol=1e-12)
    mean3 = _box3(layer3, 1.0) / 9.0
    pairs = 0.5 * (mean3[..., 0::2] + mean3[..., 1::2])
    np.testing.assert_allclose(got[..., 512:], reference.bilinear_resize(pairs, 4, 4), atol=1e-12)
    assert_close(patchcore_jax.aggregate_patches([layer2.astype(np.float32), layer3.astype(np.float32)]), got)


def test_adaptive_pool_bins_fixed_example():
    # L = 5 -> O = 3: bins [0, 2), [1, 4), [3, 5) (floor(i*5/3), ceil((i+1)*5/3)).
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(reference.adaptive_avg_pool1d(x, 3), [1.5, 3.0, 4.5])
    # Upsampling L = 2 -> O = 3: bins [0, 1), [0, 2), [1, 2).
    np.testing.assert_allclose(reference.adaptive_avg_pool1d(np.array([2.0, 4.0]), 3), [2.0, 3.0, 4.0])


def test_bilinear_fixed_example():
    # 2 -> 4 with half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper clamped).
    x = np.array([0.0, 8.0]).reshape(1, 2, 1, 1)
    got = reference.bilinear_resize(x, 4, 1).ravel()
    np.testing.assert_allclose(got, [0.0, 2.0, 6.0, 8.0])


def test_shape_of_published_configuration():
    feats = [np.zeros((2, 28, 28, 512), np.float32), np.zeros((2, 14, 14, 1024), np.float32)]
    assert patchcore_jax.aggregate_patches(feats).shape == (2, 28, 28, 1024)


def test_repeated_calls_do_not_recompile():
    feats = [gaussian(0, (1, 6, 6, 8)).astype(np.float32), gaussian(1, (1, 3, 3, 8)).astype(np.float32)]
    from patchcore_jax._src.stages import aggregate

    patchcore_jax.aggregate_patches(feats, pretrain_dim=16, target_dim=16)
    size = aggregate.aggregate_linear._cache_size()
    patchcore_jax.aggregate_patches([f + 1 for f in feats], pretrain_dim=16, target_dim=16)
    assert aggregate.aggregate_linear._cache_size() == size


@pytest.mark.parametrize("backend", [reference, patchcore_jax])
def test_bad_input(backend):
    good = np.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="feature_maps"):
        backend.aggregate_patches([])
    with pytest.raises(ValueError, match=r"feature_maps\[0\].*4-D"):
        backend.aggregate_patches([np.zeros((4, 4, 2))])
    with pytest.raises(ValueError, match=r"feature_maps\[1\].*batch"):
        backend.aggregate_patches([good, np.zeros((2, 2, 2, 2))])
    with pytest.raises(ValueError, match="finite"):
        backend.aggregate_patches([np.full((1, 4, 4, 2), np.nan)])
    with pytest.raises(ValueError, match="non-empty"):
        backend.aggregate_patches([np.zeros((1, 0, 4, 2))])
    with pytest.raises(ValueError, match="patch_size"):
        backend.aggregate_patches([good], patch_size=0)
    with pytest.raises(ValueError, match="target_dim"):
        backend.aggregate_patches([good], target_dim=-3)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_reference_matches_published_torch_chain():
    import torch
    import torch.nn.functional as F

    layer2, layer3 = gaussian(3, (2, 6, 6, 16)), gaussian(4, (2, 3, 3, 24))
    feats = [torch.from_numpy(x).permute(0, 3, 1, 2) for x in (layer2, layer3)]
    unfolder = torch.nn.Unfold(kernel_size=3, stride=1, padding=1)
    per_layer = []
    for f in feats:
        u = unfolder(f).reshape(f.shape[0], f.shape[1], 3, 3, f.shape[2], f.shape[3]).permute(0, 4, 5, 1, 2, 3)
        if per_layer:
            b, h, w = u.shape[:3]
            planes = u.permute(0, 3, 4, 5, 1, 2).reshape(-1, 1, h, w)
            planes = F.interpolate(planes, size=(6, 6), mode="bilinear", align_corners=False)
            u = planes.reshape(b, f.shape[1], 3, 3, 6, 6).permute(0, 4, 5, 1, 2, 3)
        flat = u.reshape(-1, 1, u.shape[3] * 9)
        per_layer.append(F.adaptive_avg_pool1d(flat, 20).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(len(per_layer[0]), 1, -1)
    expected = F.adaptive_avg_pool1d(stacked, 12).reshape(2, 6, 6, 12).numpy()
    got = reference.aggregate_patches([layer2, layer3], pretrain_dim=20, target_dim=12)
    np.testing.assert_allclose(got, expected, atol=1e-12)
