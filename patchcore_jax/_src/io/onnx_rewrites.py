"""What the ONNX converter cannot take, in standard operations: the exported function traced, for one
crop, to plain `lax` primitives with two of them rewritten (see `export`'s module docstring)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal


# -- ONNX: what the converter cannot take, in standard operations ----------------------------------------
def _pad_by_concat(x, value, *, padding_config):
    """`lax.pad` (no interior padding, no cropping) as a concatenation with constant blocks: the
    converter's Pad cannot carry a symbolic batch dimension through (its output shape must be constant)."""
    if any(lo < 0 or hi < 0 or interior for lo, hi, interior in padding_config):
        return jax.lax.pad(x, value, padding_config)
    for axis, (lo, hi, _) in enumerate(padding_config):
        def block(n, axis=axis, x=x):
            return jnp.broadcast_to(value.astype(x.dtype), (*x.shape[:axis], n, *x.shape[axis + 1:]))

        if lo or hi:
            x = jnp.concatenate(([block(lo)] if lo else []) + [x] + ([block(hi)] if hi else []), axis=axis)
    return x


def _max_pool_by_slices(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
    """`reduce_window(max)` as the maximum of its `prod(window)` strided slices of the -inf padded
    input: the converter emits a MaxPool over all four NHWC axes, which ONNX Runtime refuses."""
    if any(d != 1 for d in base_dilation):
        raise NotImplementedError("reduce_window_max with base dilation is not exported")
    padded = _pad_by_concat(x, jnp.array(-jnp.inf, x.dtype), padding_config=[(lo, hi, 0) for lo, hi in padding])
    out_shape = [(n - (k - 1) * dil - 1) // s + 1
                 for n, k, s, dil in zip(padded.shape, window_dimensions, window_strides, window_dilation)]
    out = None
    for offset in np.ndindex(*window_dimensions):
        start = [o * dil for o, dil in zip(offset, window_dilation)]
        limit = [st + (n - 1) * s + 1 for st, n, s in zip(start, out_shape, window_strides)]
        part = jax.lax.slice(padded, start, limit, window_strides)
        out = part if out is None else jnp.maximum(out, part)
    return out


_REWRITES = {"reduce_window_max": _max_pool_by_slices, "pad": _pad_by_concat}


def _eval_rewritten(jaxpr, consts, *args):
    """Evaluates a jaxpr with the primitives of `_REWRITES` replaced, inlining nested `jit` calls
    (where the backbone's pooling sits); every other equation is bound unchanged."""
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _REWRITES:
            outvals = [_REWRITES[name](*invals, **eqn.params)]
        elif name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outvals = _eval_rewritten(inner.jaxpr, inner.consts, *invals)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)  # jax < 0.7: (subfuns, params)
            outvals = eqn.primitive.bind(*subfuns, *invals, **params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for var, val in zip(eqn.outvars, outvals):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def for_onnx(fn, crop: int):
    """`fn` made convertible: traced here, for one crop, to plain `lax` primitives (outside the
    converter, whose tracing-time replacements of Flax layers mis-convert the ResNet bottleneck's
    BatchNorm), evaluated with `_REWRITES` applied, and mapped over the batch with `jax.vmap`, so the
    batch dimension stays symbolic."""
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.uint8))

    def one(image):
        return tuple(out[0] for out in _eval_rewritten(closed.jaxpr, closed.consts, image[None]))

    return jax.vmap(one)
