"""Argument checks shared by both backends (NumPy only, so the reference stays free of JAX).

Every public function of `reference` and `patchcore_jax` validates its inputs with these helpers and
raises `ValueError` naming the argument and what was expected. The helpers accept anything with
`.shape` and `.dtype` (NumPy arrays, JAX arrays, JAX tracers); value checks (finiteness, ranges) run
only on concrete arrays, since a traced value has none to check.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np


def is_concrete(x: Any) -> bool:
    """True when `x` holds values (not an abstract tracer)."""
    try:
        np.asarray(x)
    except Exception:  # a JAX tracer refuses conversion
        return False
    return True


def shape_of(name: str, x: Any) -> tuple[int, ...]:
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    return tuple(int(s) for s in x.shape)


def check_array(
    name: str,
    x: Any,
    *,
    ndim: int | None = None,
    nonempty: bool = True,
    finite: bool = True,
    numeric: bool = True,
) -> tuple[int, ...]:
    """Checks rank, emptiness, dtype kind and finiteness of `x`; returns its shape."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    shape = tuple(int(s) for s in x.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {shape}")
    if nonempty and any(s == 0 for s in shape):
        raise ValueError(f"{name}: expected a non-empty array, got shape {shape}")
    kind = np.dtype(x.dtype).kind if _is_numpy_dtype(x.dtype) else "f"
    if numeric and kind not in "fiub":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
    if finite and kind == "f" and is_concrete(x):
        values = np.asarray(x)
        if not np.isfinite(values).all():
            bad = int(np.size(values) - np.isfinite(values).sum())
            raise ValueError(f"{name}: expected finite values, found {bad} NaN or infinite entries")
    return shape


def _is_numpy_dtype(dtype: Any) -> bool:
    try:
        np.dtype(dtype)
    except TypeError:
        return False
    return True


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Checks that `value` is an integer in `[low, high]`; returns it as `int`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected an integer <= {high}, got {value}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def check_indices(name: str, indices: Sequence[int], size: int) -> tuple[int, ...]:
    """Checks a non-empty sequence of integer indices into an axis of length `size`."""
    values = tuple(np.asarray(indices).reshape(-1).tolist())
    if not values:
        raise ValueError(f"{name}: expected at least one index, got none")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < size:
            raise ValueError(f"{name}: expected integers in [0, {size}), got {list(values)}")
    return tuple(int(v) for v in values)


def check_feature_maps(feature_maps: Any, *, patch_size: int, stride: int) -> list[tuple[int, ...]]:
    """Checks the `(B, H_j, W_j, C_j)` maps of `aggregate_patches`; returns their shapes."""
    if not isinstance(feature_maps, (list, tuple)) or not feature_maps:
        raise ValueError("feature_maps: expected a non-empty sequence of (B, H, W, C) arrays")
    shapes = [check_array(f"feature_maps[{j}]", f, ndim=4) for j, f in enumerate(feature_maps)]
    batch = shapes[0][0]
    for j, s in enumerate(shapes):
        if s[0] != batch:
            raise ValueError(f"feature_maps[{j}]: expected batch size {batch} like feature_maps[0], got shape {s}")
        pad = (patch_size - 1) // 2
        if s[1] + 2 * pad < patch_size or s[2] + 2 * pad < patch_size:
            raise ValueError(f"feature_maps[{j}]: spatial size {s[1:3]} is smaller than patch_size {patch_size}")
    return shapes


def unfolded_size(size: int, patch_size: int, stride: int) -> int:
    """Output length of a zero-padded unfold (padding `(patch_size - 1) // 2`), as torch.nn.Unfold."""
    pad = (patch_size - 1) // 2
    return (size + 2 * pad - patch_size) // stride + 1


def check_out_size(out_size: Any) -> tuple[int, int]:
    if isinstance(out_size, numbers.Integral):
        out_size = (out_size, out_size)
    try:
        h, w = out_size
    except (TypeError, ValueError):
        raise ValueError(f"out_size: expected an int or a pair (H, W), got {out_size!r}") from None
    return (check_int("out_size[0]", h, low=1), check_int("out_size[1]", w, low=1))


def check_coreset_args(bank: Any, num_samples: Any, projection: Any, start_indices: Any) -> tuple[int, int, tuple[int, ...]]:
    """The shared checks of `greedy_coreset`; returns `(N, num_samples, start_indices)`."""
    n, d = check_array("bank", bank, ndim=2)
    num_samples = check_int("num_samples", num_samples, low=0, high=n)
    starts = check_indices("start_indices", start_indices, n)
    if projection is not None:
        pd = check_array("projection", projection, ndim=2)
        if pd[0] != d:
            raise ValueError(f"projection: expected shape ({d}, P) to match bank (N, {d}), got {pd}")
    return n, num_samples, starts
