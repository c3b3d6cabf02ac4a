"""Argument checks of the JAX backend, at the public boundary, on host data only.

Every public function validates its arguments here and raises `ValueError` naming the argument and
what was expected; the messages are the reference's (a test holds the two packages to that), but the
code is this package's own: the product never imports the oracle.

Shapes and dtypes are read from anything that has them, tracers included: that costs nothing and runs
once per trace under `jit`. Values (finiteness) are checked only on host data (NumPy arrays, Python
sequences and scalars), never on a `jax.Array` or a tracer: reading a device array's values would
force a transfer and a sync per call on a GPU (SciPy's `check_finite = not is_lazy_array(obs)`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np


def is_host_data(x: Any) -> bool:
    """True for NumPy arrays and scalars and for Python data: values readable without a transfer."""
    return isinstance(x, (np.ndarray, np.generic)) or not hasattr(x, "shape")


def _kind(dtype: Any) -> str:
    """NumPy's dtype kind letter, with bfloat16 and JAX's other extended floats as 'f'."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return "?"
    return "f" if jnp.issubdtype(dtype, jnp.floating) else dtype.kind


def check_array(
    name: str,
    x: Any,
    *,
    ndim: int | None = None,
    nonempty: bool = True,
    finite: bool = True,
    numeric: bool = True,
) -> tuple[int, ...]:
    """Checks rank, emptiness and dtype kind of `x`, and finiteness when `x` is host data; returns
    its shape."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    shape = tuple(int(s) for s in x.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {shape}")
    if nonempty and any(s == 0 for s in shape):
        raise ValueError(f"{name}: expected a non-empty array, got shape {shape}")
    kind = _kind(x.dtype)
    if numeric and kind not in "fiub":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
    if finite and kind == "f" and is_host_data(x):
        ok = np.isfinite(x)
        if not ok.all():
            raise ValueError(f"{name}: expected finite values, found {int(ok.size - ok.sum())} NaN or infinite entries")
    return shape


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


def check_indices(name: str, indices: Sequence[int], size: int) -> tuple[int, ...]:
    """Checks a non-empty host sequence of integer indices into an axis of length `size`.

    Indices are configuration (a few start rows), read as Python integers; a device array here is
    read once, deliberately.
    """
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
    pad = (patch_size - 1) // 2
    for j, s in enumerate(shapes):
        if s[0] != batch:
            raise ValueError(f"feature_maps[{j}]: expected batch size {batch} like feature_maps[0], got shape {s}")
        if s[1] + 2 * pad < patch_size or s[2] + 2 * pad < patch_size:
            raise ValueError(f"feature_maps[{j}]: spatial size {s[1:3]} is smaller than patch_size {patch_size}")
    return shapes


def unfolded_size(size: int, patch_size: int, stride: int) -> int:
    """Output length of a zero-padded unfold (padding `(patch_size - 1) // 2`), as torch.nn.Unfold."""
    return (size + 2 * ((patch_size - 1) // 2) - patch_size) // stride + 1


def check_out_size(out_size: Any) -> tuple[int, int]:
    if isinstance(out_size, numbers.Integral):
        out_size = (out_size, out_size)
    try:
        h, w = out_size
    except (TypeError, ValueError):
        raise ValueError(f"out_size: expected an int or a pair (H, W), got {out_size!r}") from None
    return (check_int("out_size[0]", h, low=1), check_int("out_size[1]", w, low=1))


def check_width(name: str, x: Any, leading: str, dim: int, against: str) -> tuple[int, ...]:
    """Checks that `x` is `(*leading, dim)`, e.g. `leading="B, P"`: rows as wide as the bank."""
    shape = check_array(name, x, ndim=leading.count(",") + 2)
    if shape[-1] != dim:
        raise ValueError(f"{name}: expected shape ({leading}, {dim}) to match {against}, got {shape}")
    return shape


def check_search_args(bank: Any, queries: Any, k: Any) -> tuple[int, int]:
    """The checks of `nearest_neighbors`; returns `(N, k)`."""
    n, d = check_array("bank", bank, ndim=2)
    check_width("queries", queries, "Q", d, f"bank (N, {d})")
    return n, check_int("k", k, low=1, high=n)


def check_scores_args(bank: Any, patch_features: Any, num_neighbors: Any) -> tuple[int, int]:
    """The checks of `image_scores`; returns `(N, num_neighbors)`."""
    n, d = check_array("bank", bank, ndim=2)
    check_width("patch_features", patch_features, "B, P", d, f"bank (N, {d})")
    return n, check_int("num_neighbors", num_neighbors, low=1, high=n)


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
