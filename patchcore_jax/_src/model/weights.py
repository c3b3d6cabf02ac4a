"""Reading torchvision/timm state dicts (ResNet, ResNeXt, DenseNet) and mapping them onto the Flax modules.

Formats: `.safetensors` through `safetensors.numpy` (no torch needed), or `.pth`/`.pt` through
`torch.load(weights_only=True)` when torch is installed (never a plain unpickle). Key names are the
modules' attribute paths, so the mapping is the same for every architecture: layouts OIHW -> HWIO for
convolutions (grouped ones included: torch's `(O, I/groups, H, W)` becomes Flax's `(H, W, I/groups, O)`);
BatchNorm `weight, bias, running_mean, running_var` -> `scale, bias, mean, var`. DenseNet checkpoints
of the old layout (`denselayer1.norm.1.weight`, that of torchvision's published .pth files) are renamed
to the modern keys (`denselayer1.norm1.weight`) as torchvision's and timm's loaders do. Keys of stages
the extractor does not compute (deeper stages, the classifier head; each model lists their prefixes in
`unused_prefixes`) are accepted and ignored; anything else that does not fit is reported at once:
missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np
from flax import nnx

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BN_TORCH_NAMES = {flax: torch for torch, flax in _BN_NAMES.items()}
# torchvision's densenet._load_state_dict: '.' is no longer allowed in module names, so the old
# `norm.1`, `relu.1`, `conv.1`, `norm.2`, ... of a dense layer became `norm1`, `conv1`, `norm2`, ...
_LEGACY_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state dict into NumPy arrays; raises ValueError naming the file on any problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such weights file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the weights file is empty")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    elif path.endswith((".pth", ".pt", ".bin")):
        state = _read_torch(path)
    else:
        raise ValueError(f"{path}: expected a .safetensors or .pth state dict")
    if not state or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {_strip_prefix(k): v for k, v in state.items()}


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path}: reading .pth needs torch (pip install torch); or convert it once on a machine with "
            "torch: patchcore-jax convert-weights IN.pth OUT.safetensors"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or unsafe files
        raise ValueError(f"{path}: not a loadable state dict (truncated, corrupt, or not weights-only): {err}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a mapping of names to tensors (a state dict)")
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def _strip_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def expected_keys(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """torchvision key -> torch-layout shape, for every parameter and statistic of `model`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = [str(p) for p in path]
        leaf, prefix = names[-1], ".".join(names[:-1])
        shape = tuple(var.get_value().shape)
        if leaf == "kernel":
            out[f"{prefix}.weight"] = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
        else:
            out[f"{prefix}.{_BN_TORCH_NAMES[leaf]}"] = shape
    return out


def _ignorable(key: str, model: nnx.Module) -> bool:
    """Keys of stages the truncated model does not compute, and BatchNorm's step counters."""
    return key.endswith("num_batches_tracked") or key.startswith(tuple(getattr(model, "unused_prefixes", ())))


def modernise_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames old-layout DenseNet keys (`denselayer1.norm.1.weight` -> `denselayer1.norm1.weight`);
    other keys pass unchanged. A legacy key whose modern name is also present is kept as it is, so it
    is reported as unexpected rather than silently overwriting."""
    out = dict(state)
    for key in state:
        match = _LEGACY_DENSE_KEY.match(key)
        if match and match.group(1) + match.group(2) not in state:
            out[match.group(1) + match.group(2)] = out.pop(key)
    return out


def load_into(model: nnx.Module, state: Mapping[str, np.ndarray], *, arch: str = "model") -> None:
    """Copies a torchvision-named state dict into `model` in place, or raises ValueError listing
    every missing, unexpected and mis-shaped key."""
    state = modernise_keys(state)
    want = expected_keys(model)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(k for k in set(state) - set(want) if not _ignorable(k, model))
    misshaped = sorted(f"{k}: {tuple(state[k].shape)} != {want[k]}" for k in set(want) & set(state)
                       if tuple(state[k].shape) != want[k])
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        raise ValueError(f"weights do not fit {arch}: " + "; ".join(parts))
    bad = sorted(k for k in want if np.asarray(state[k]).dtype.kind == "f" and not np.isfinite(state[k]).all())
    if bad:
        raise ValueError(f"weights for {arch} hold NaN or infinite values in {len(bad)} tensors: "
                         f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = [str(p) for p in path]
        leaf, prefix = names[-1], ".".join(names[:-1])
        if leaf == "kernel":
            value = np.transpose(state[f"{prefix}.weight"], (2, 3, 1, 0))  # OIHW -> HWIO
        else:
            value = state[f"{prefix}.{_BN_TORCH_NAMES[leaf]}"]
        var.set_value(np.asarray(value, dtype=np.float32).astype(var.get_value().dtype))


def state_dict_of(model: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse of `load_into`: `model`'s parameters and statistics as a torchvision-named float32
    state dict (torch layouts), which `load_into` reads back exactly."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = [str(p) for p in path]
        leaf, prefix = names[-1], ".".join(names[:-1])
        value = np.asarray(var.get_value(), np.float32)
        if leaf == "kernel":
            out[f"{prefix}.weight"] = np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))  # HWIO -> OIHW
        else:
            out[f"{prefix}.{_BN_TORCH_NAMES[leaf]}"] = value
    return out


def save_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes a state dict as `.safetensors` (contiguous arrays; the format the reader prefers)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.fspath(path))
