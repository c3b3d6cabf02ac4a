"""Deterministic, non-trivial backbone weights under torchvision's key names, drawn from NumPy.

Each tensor comes from its own generator seeded by `(seed, crc32(key))`, so any subset of keys (a
truncated model) gets the same values as the full set. BatchNorm statistics are deliberately far from
the identity (means, variances and affine terms all drawn), so agreement tests exercise them.
Used by the backbone tests and by `scripts/make_backbone_golden.py`, which also share the torchvision
side of the comparison here (`torchvision_model`, `torchvision_taps`; torch is imported only by them).
"""

from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np


def draw(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """`{key: array}` in torch layouts (convolutions OIHW) for every key of `shapes`."""
    out = {}
    for key, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        if key.endswith(".weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            value = rng.normal(size=shape) * np.sqrt(1.0 / fan_in)
        elif key.endswith(".weight") and len(shape) == 2:  # fc
            value = rng.normal(size=shape) * np.sqrt(1.0 / shape[1])
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, size=shape)
        elif key.endswith("running_mean"):
            value = rng.normal(size=shape) * 0.2
        elif key.endswith(".weight"):  # BatchNorm scale
            value = rng.uniform(0.5, 1.5, size=shape)
        elif key.endswith("num_batches_tracked"):
            out[key] = np.array(1000, dtype=np.int64)
            continue
        else:  # biases
            value = rng.normal(size=shape) * 0.1
        out[key] = value.astype(np.float32)
    return out


def golden_input(seed: int, shape=(2, 64, 64, 3)) -> np.ndarray:
    """The fixture's NHWC input images."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def torchvision_model(arch: str, seed: int):
    """torchvision's `arch` in eval mode, holding `draw(its state-dict shapes, seed)`. Needs torchvision."""
    import torch
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None).eval()
    state = draw({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    return model


def torchvision_taps(model, images: np.ndarray, taps) -> dict[str, np.ndarray]:
    """torchvision's own modules run in order up to the deepest of `taps`; NHWC in, `{tap: NHWC}` out.

    ResNets: the stem, then `layer1..4`. DenseNets: the children of `features` in order, a tap taken
    at the output of `features.denseblockN` (before `transitionN`), where the published PatchCore's
    forward hook sits."""
    import torch

    taps = set(taps)
    out = {}
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if hasattr(model, "features"):
            stages = list(model.features.named_children())
        else:
            stem = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
            stages = [("stem", stem)] + [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]
        for name, module in stages:
            x = module(x)
            if name in taps:
                out[name] = x.permute(0, 2, 3, 1).numpy()
                if len(out) == len(taps):
                    break
    if len(out) != len(taps):
        raise ValueError(f"taps: {sorted(taps - set(out))} are not stages of {type(model).__name__}")
    return out
