"""Consistency of a clustered index read back from arrays (a model file's `index.safetensors`).

An index that loads but does not describe its bank changes scores silently: a zeroed row, a slot
pointing at another row, a radius too small to bound its leaf (the pruning would skip a neighbour),
or a scale exponent off by one. `check_clustered_arrays` refuses each of these with a ValueError
naming the array, on the host, before anything is placed on a device:

- every setting is a 0-d integer in range (`size`, `leaf_size`, `log2_scale`, `format_version`);
- `ids` and `slots` are integer arrays, each other's inverse on the `size` real rows, padding slots
  marked as padding;
- every stored float is finite (padding's infinite squared norm and an empty leaf's radius -1 aside),
  each squared norm is its row's, and each radius bounds the norms of its leaf's rows;
- given the bank, the stored points, scaled back, are the bank's rows to float32 rounding.
"""

from __future__ import annotations

import numpy as np

NO_ID = np.iinfo(np.int32).max  # the id of padding slots: sorts after every real id
MAX_LOG2_SCALE = 300  # beyond float64's exponent range: no bank needs more

_REL = 1e-5  # float32 rounding of a norm or a coordinate, with room for the summation order


def scalar_int(arrays: dict, name: str, low: int, high: int) -> int:
    """`arrays[name]` as a 0-d integer in [low, high]; ValueError naming it otherwise."""
    value = np.asarray(arrays[name])
    if value.shape != () or not (np.issubdtype(value.dtype, np.integer) or
                                 (np.issubdtype(value.dtype, np.floating) and np.isfinite(value) and value == np.round(value))):
        raise ValueError(f"arrays[{name!r}]: expected an integer scalar, got {value.dtype} of shape {value.shape}")
    if not low <= int(value) <= high:
        raise ValueError(f"arrays[{name!r}]: {int(value)} is outside [{low}, {high}]")
    return int(value)


def _integers(arrays: dict, name: str) -> np.ndarray:
    value = np.asarray(arrays[name])
    if not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"arrays[{name!r}]: expected integers, got {value.dtype}")
    return value.astype(np.int64)


def check_clustered_arrays(arrays: dict, bank: np.ndarray | None = None) -> None:
    """Raises ValueError naming the first inconsistency of a clustered index's arrays (shapes are
    checked by the caller, `ClusteredIndex.from_arrays`); see the module docstring."""
    size = scalar_int(arrays, "size", 1, 2**31 - 2)
    leaf = scalar_int(arrays, "leaf_size", 1, 2**20)
    log2_scale = scalar_int(arrays, "log2_scale", -MAX_LOG2_SCALE, MAX_LOG2_SCALE)
    rows = np.asarray(arrays["rows"], np.float64)
    centroids = np.asarray(arrays["centroids"], np.float64)
    radii = np.asarray(arrays["radii"], np.float64)
    sq_norms = np.asarray(arrays["sq_norms"], np.float64)
    centre = np.asarray(arrays["centre"], np.float64)
    ids, slots = _integers(arrays, "ids"), _integers(arrays, "slots")
    n_slots = rows.shape[0]
    if ((slots < 0) | (slots >= n_slots)).any():
        raise ValueError(f"arrays['slots']: values outside [0, {n_slots}) for {n_slots} slots")
    real = ids != NO_ID
    if ((ids[real] < 0) | (ids[real] >= size)).any():
        raise ValueError(f"arrays['ids']: values outside [0, {size}) that are not the padding mark")
    if int(real.sum()) != size or not np.array_equal(ids[slots], np.arange(size)):
        raise ValueError("arrays['ids'], arrays['slots']: not each other's inverse on the bank's rows")
    for name, value in (("rows", rows), ("centroids", centroids), ("centre", centre), ("sq_norms", sq_norms[real])):
        if not np.isfinite(value).all():
            raise ValueError(f"arrays[{name!r}]: holds NaN or infinite values")
    if not (np.isinf(sq_norms[~real]) & (sq_norms[~real] > 0)).all():
        raise ValueError("arrays['sq_norms']: padding slots must hold +inf")
    norms2 = np.sum(np.square(rows[real]), axis=1)
    if (np.abs(sq_norms[real] - norms2) > _REL * norms2 + 1e-30).any():
        raise ValueError("arrays['sq_norms']: not the squared norms of the stored rows")
    leaf_of = np.flatnonzero(real) // leaf
    occupied = np.zeros(centroids.shape[0], bool)
    occupied[leaf_of] = True
    if not (np.isfinite(radii[occupied]).all() and (radii[~occupied] == -1).all()):
        raise ValueError("arrays['radii']: expected a finite radius per occupied leaf and -1 per empty one")
    widest = np.zeros(centroids.shape[0])
    np.maximum.at(widest, leaf_of, np.sqrt(norms2))
    if (radii[occupied] < widest[occupied] * (1 - _REL)).any():
        raise ValueError("arrays['radii']: a leaf's radius is smaller than one of its rows' distance to its centroid")
    if bank is None:
        return
    bank = np.asarray(bank, np.float64)
    if bank.shape != (size, rows.shape[1]):
        raise ValueError(f"an index of {size} rows of width {rows.shape[1]} for a bank of shape {bank.shape}")
    points = np.ldexp(centroids[slots // leaf] + rows[slots], -log2_scale) + centre
    spread = float(np.abs(bank - centre).max(initial=0.0))
    tol = 1e-4 * spread + _REL * float(np.abs(centre).max(initial=0.0)) + 1e-30
    worst = float(np.abs(points - bank).max(initial=0.0))
    if not worst <= tol:
        raise ValueError(f"the stored rows are not the bank's (they differ by up to {worst:.3g}, "
                         f"against {tol:.3g} for float32 rounding)")
