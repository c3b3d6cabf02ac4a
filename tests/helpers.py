"""Shared tolerances and data builders for the agreement tests.

One tolerance table by dtype: the reference computes in float64; a JAX float32 result may differ by
rounding that grows with the magnitude of the values, so the bound is relative to the largest value.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import jax
import numpy as np
from hypothesis import strategies as st

# The hypothesis profile of this run, chosen as conftest.py chooses it.
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")


def shape_buckets(**axes):
    """A strategy of dicts, one value per axis, for the parameters the compiler specialises on (array
    shapes, k, block sizes): each new combination costs a compilation, the other drawn values (seeds,
    offsets, spreads) do not.

    Under the `ci` profile the draws come from a few fixed combinations in which every value of every
    axis appears (as many combinations as the longest axis has values, each axis shifted by its
    position), so compiled programs are reused from one example to the next. The `dev` and `nightly`
    profiles draw from the whole product, as before.
    """
    if PROFILE != "ci":
        return st.fixed_dictionaries({name: st.sampled_from(values) for name, values in axes.items()})
    width = max(len(values) for values in axes.values())
    combos = [{name: values[(i + j) % len(values)] for j, (name, values) in enumerate(axes.items())}
              for i in range(width)]
    return st.sampled_from(combos)


# dtype -> (rtol, atol relative to max(1, max |expected|))
TOLERANCES = {
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float64): (1e-10, 1e-10),
}


def assert_close(actual, expected, dtype=np.float32, *, err_msg: str = "") -> None:
    """`|actual - expected| <= atol * scale + rtol * |expected|`, with `scale = max(1, max|expected|)`."""
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {err_msg}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=err_msg)


@contextlib.contextmanager
def x64():
    """Runs a block with `jax_enable_x64`, restoring the setting after."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def xla_flags(devices: int) -> str:
    """This run's XLA_FLAGS (conftest.py sets them) with `devices` host devices instead of 8, for the
    processes of a multi-process test."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


def gaussian(seed: int, shape, *, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Continuous random data: exact ties have probability zero, near-ties are vanishingly rare."""
    return np.random.default_rng(seed).normal(size=shape) * scale + offset


def both_ways(fn, *args, static=(), **kwargs):
    """Yields `(label, result)` for `fn` called plain and under `jax.jit` (kwargs static)."""
    yield "plain", fn(*args, **kwargs)
    jitted = jax.jit(lambda *a: fn(*a, **kwargs))
    yield "jit", jitted(*args)


# -- the reference in other array namespaces -------------------------------------------------------
def namespace_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@contextlib.contextmanager
def in_namespace(name: str):
    """Yields a function that moves host arrays into namespace `name` (JAX under x64, so that the
    reference computes in float64 there too)."""
    if name == "numpy":
        yield np.asarray
    elif name == "array_api_strict":
        import array_api_strict

        yield array_api_strict.asarray
    elif name == "jax":
        import jax.numpy as jnp

        with x64():
            yield jnp.asarray
    elif name == "torch":
        import torch

        yield torch.asarray
    else:
        raise ValueError(f"unknown namespace {name!r}")


def to_host(tree):
    """NumPy copies of the arrays in a result (tuples kept, Python scalars as they are)."""
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_host(t) for t in tree)
    return tree if isinstance(tree, (int, float)) else np.asarray(tree)


def to_namespace(tree, convert):
    """The NumPy arrays in `tree` (tuples and lists kept) moved by `convert`."""
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_namespace(t, convert) for t in tree)
    return convert(tree) if isinstance(tree, np.ndarray) else tree


# The namespace the agreement tests run the reference in: NumPy by default; REFERENCE_NAMESPACE=jax
# runs the oracle on JAX arrays (float64 under x64), as it would run beside the product on a GPU or TPU.
REFERENCE_NAMESPACE = os.environ.get("REFERENCE_NAMESPACE", "numpy")


class _Oracle:
    """`oracle.f(*args)`: `reference.f` run on the arguments' NumPy arrays moved to
    REFERENCE_NAMESPACE; its results come back as NumPy arrays."""

    def __getattr__(self, name):
        import reference

        fn = getattr(reference, name)

        def call(*args, **kwargs):
            with in_namespace(REFERENCE_NAMESPACE) as convert:
                args, kwargs = to_namespace(args, convert), {k: to_namespace(v, convert) for k, v in kwargs.items()}
                return to_host(fn(*args, **kwargs))

        return call


oracle = _Oracle()


# A small model that compiles and fits in seconds: the shared setting of the model-level tests.
SMALL = dict(backbone="resnet18", resize=72, crop=64, pretrain_dim=64, target_dim=64, num_neighbors=3, batch_size=4)
# The same setting on the command line (then --quiet), so that command-line runs reuse the programs the
# model-level tests compiled (one compilation cache serves the whole run, see conftest.py).
CLI_SMALL = ["--backbone", "resnet18", "--resize", "72", "--crop", "64", "--pretrain-dim", "64", "--target-dim", "64",
             "--neighbors", "3", "--batch-size", "4", "--quiet"]


def quiet_model(base: dict, **changes):
    """`PatchCore(PatchCoreConfig(**base, **changes))` without progress bars or the random-weights warning."""
    import warnings

    from patchcore_jax._src.model.config import PatchCoreConfig
    from patchcore_jax._src.api.patchcore import PatchCore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PatchCore(PatchCoreConfig(**{**base, **changes}), progress=False)


def small_model(**changes):
    return quiet_model(SMALL, **changes)


def cli_here(*args, cwd=None):
    """`patchcore-jax ARGS` run in this process (the interpreter and JAX loaded already), for checks of
    a command's refusals and outputs; what needs a process of its own (signals, the environment, a
    kill, a traceback with --debug, loading without JAX) keeps `subprocess`.
    Returns a `subprocess.CompletedProcess` with `returncode`, `stdout` and `stderr`, as `run` does."""
    import contextlib
    import io
    import subprocess

    from patchcore_jax._src.app import cli

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as stop:  # argparse's own refusals
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
