"""Argument checks of the reference, for arrays of any array-API namespace.

Every public function of `reference` validates its inputs here and raises `ValueError` naming the
argument and what was expected; `patchcore_jax` owns its own checks with the same messages (a test
holds the two to that). Shapes and dtypes are read from any array; values (finiteness) are checked
only where they can be read eagerly (SciPy's `check_finite = not is_lazy_array(obs)`), so a JAX array
is checked for shape and dtype only.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from array_api_compat import is_array_api_obj, is_lazy_array

from reference import _array_api


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
    (x,) = _array_api.as_arrays(x)
    shape = tuple(int(s) for s in x.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {shape}")
    if nonempty and any(s == 0 for s in shape):
        raise ValueError(f"{name}: expected a non-empty array, got shape {shape}")
    xp = _array_api.namespace(x)
    if numeric and not _isdtype(xp, x.dtype, ("real floating", "integral", "bool")):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
    if finite and _isdtype(xp, x.dtype, "real floating") and not is_lazy_array(x):
        ok = xp.isfinite(x)
        if not bool(xp.all(ok)):
            bad = int(xp.sum(xp.astype(xp.logical_not(ok), _array_api.index_dtype(xp, _array_api.device(x)))))
            raise ValueError(f"{name}: expected finite values, found {bad} NaN or infinite entries")
    return shape


def _isdtype(xp: Any, dtype: Any, kind: Any) -> bool:
    try:
        return bool(xp.isdtype(dtype, kind))
    except (TypeError, ValueError):  # strings, objects, dates: no kind of the standard
        return False


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
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def check_indices(name: str, indices: Any, size: int) -> tuple[int, ...]:
    """Checks a non-empty sequence (or array) of integer indices into an axis of length `size`."""
    if is_array_api_obj(indices):
        indices = _array_api.to_numpy(indices)
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


def check_search_args(bank: Any, queries: Any, k: Any) -> tuple[int, int]:
    """The checks of `nearest_neighbors`; returns `(N, k)`."""
    n, d = check_array("bank", bank, ndim=2)
    q, dq = check_array("queries", queries, ndim=2)
    if dq != d:
        raise ValueError(f"queries: expected shape (Q, {d}) to match bank (N, {d}), got {(q, dq)}")
    return n, check_int("k", k, low=1, high=n)


def check_scores_args(bank: Any, patch_features: Any, num_neighbors: Any) -> tuple[int, int, int, int]:
    """The checks of `image_scores`; returns `(B, P, D, num_neighbors)`."""
    n, d = check_array("bank", bank, ndim=2)
    b, p, dp = check_array("patch_features", patch_features, ndim=3)
    if dp != d:
        raise ValueError(f"patch_features: expected shape (B, P, {d}) to match bank (N, {d}), got {(b, p, dp)}")
    return b, p, d, check_int("num_neighbors", num_neighbors, low=1, high=n)


def check_coreset_args(bank: Any, num_samples: Any, projection: Any, start_indices: Any) -> tuple[int, int, tuple[int, ...]]:
    """The checks of `greedy_coreset`; returns `(N, num_samples, start_indices)`."""
    n, d = check_array("bank", bank, ndim=2)
    num_samples = check_int("num_samples", num_samples, low=0, high=n)
    starts = check_indices("start_indices", start_indices, n)
    if projection is not None:
        pd = check_array("projection", projection, ndim=2)
        if pd[0] != d:
            raise ValueError(f"projection: expected shape ({d}, P) to match bank (N, {d}), got {pd}")
    return n, num_samples, starts
