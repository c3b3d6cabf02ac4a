"""The array-namespace plumbing of the reference: which namespace, which float, and the door to NumPy.

Every public function finds the namespace of its array arguments with `array_namespace` (as SciPy's
array-agnostic functions do: `xp = array_namespace(obs)`), computes with `xp.` calls only, and returns
arrays of that namespace, on the arguments' device. Python sequences and scalars count as NumPy.
What the standard cannot express (pynndescent's graph search, random draws) goes through NumPy at its
boundary (`to_numpy`), and its result comes back with `xp.asarray(..., device=...)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_array_api_obj, to_device

__all__ = ["as_arrays", "device", "index_dtype", "namespace", "real_float", "to_numpy"]


def as_arrays(*arrays: Any) -> tuple[Any, ...]:
    """Arrays stay as they are; sequences and scalars become NumPy arrays (None stays None)."""
    return tuple(a if a is None or is_array_api_obj(a) else np.asarray(a) for a in arrays)


def namespace(*arrays: Any) -> Any:
    """The one namespace of the array arguments (None skipped; sequences count as NumPy)."""
    return array_namespace(*as_arrays(*arrays))


def namespace_of_module(xp: Any) -> Any:
    """The standard-compatible namespace of an array library given as a module (`numpy`, `torch`,
    `jax.numpy`, ...), as `array_namespace` would return it for one of its arrays."""
    return array_namespace(xp.empty(0))


def real_float(xp: Any, dev: Any = None) -> Any:
    """float64 where the namespace (on that device) has it, else its default real float.

    JAX has float64 only under `jax_enable_x64`; Apple's MPS has none.
    """
    info = xp.__array_namespace_info__()
    # DECISION: the oracle computes in float64 whenever it can; where it cannot, it still runs (in
    # the namespace's default float) rather than refusing, and its tolerance is then the caller's.
    floats = info.dtypes(kind="real floating", device=dev)
    return floats.get("float64", info.default_dtypes(device=dev)["real floating"])


def index_dtype(xp: Any, dev: Any = None) -> Any:
    """The namespace's default integer dtype for indices (int64 for NumPy and PyTorch, and for JAX
    under `jax_enable_x64`)."""
    return xp.__array_namespace_info__().default_dtypes(device=dev)["indexing"]


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy (or view) of `x`, for the steps the standard cannot express."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)  # NumPy, JAX, PyTorch on the CPU, array_api_strict
    except (TypeError, RuntimeError):  # e.g. a tensor on a GPU: bring it to the host first
        return np.asarray(to_device(x, "cpu"))
