"""What a traced program will hold, read from its jaxpr before anything is compiled (the memory
estimate that refuses settings the machine cannot run)."""

from __future__ import annotations

import numpy as np


def largest_value(jaxpr) -> int:
    """Bytes of the largest array a jaxpr computes, nested jaxprs (jit, scan, ...) included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = getattr(v, "aval", None)
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                largest = max(largest, int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, largest_value(inner))
    return largest
