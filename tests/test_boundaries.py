"""What separates the two packages, and what crosses the host-device boundary.

- Both packages expose the contract's functions under the same names and signatures, and raise the
  same `ValueError` (same message) on the same bad host input; each owns its own checks.
- `import patchcore_jax` does not import the oracle, and `import reference` does not import JAX.
- The JAX numerics run on device arrays with no implicit transfer, and never read a device array's
  values to check them.
"""

import inspect
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import patchcore_jax
import reference

# The numerics contract (shared/API.md) and the README's promise: the same names in both packages.
CONTRACT = ("aggregate_patches", "greedy_coreset", "random_projection", "nearest_neighbors", "image_scores",
            "anomaly_maps")


def _shared_names():
    return sorted(set(reference.__all__) & set(patchcore_jax.__all__))


def test_both_packages_expose_the_contract():
    for name in CONTRACT:
        assert name in reference.__all__ and name in patchcore_jax.__all__, name
    assert set(CONTRACT) <= set(_shared_names())


@pytest.mark.parametrize("name", _shared_names())
def test_same_signatures(name):
    """Positional parameters agree in name, order and default; keyword-only options present in both
    agree in default; an option only one backend has (the JAX loop's block size, pynndescent's
    epsilon) is keyword-only with a default, so a call written for one runs on the other."""
    ref = inspect.signature(getattr(reference, name)).parameters
    fast = inspect.signature(getattr(patchcore_jax, name)).parameters

    def positional(params):
        return [(p.name, p.default) for p in params.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]

    assert positional(ref) == positional(fast)
    for key in set(ref) & set(fast):
        assert ref[key].kind == fast[key].kind and ref[key].default == fast[key].default, key
    for params in (ref, fast):
        for extra in set(params) - (set(ref) & set(fast)):
            assert params[extra].kind is inspect.Parameter.KEYWORD_ONLY, extra
            assert params[extra].default is not inspect.Parameter.empty, extra


GOOD_BANK = np.ones((5, 3))
GOOD_MAPS = np.zeros((1, 4, 4, 2))
BAD_INPUTS = [
    # (function, args, kwargs): each breaks one rule
    ("aggregate_patches", ([],), {}),
    ("aggregate_patches", (np.zeros((4, 4, 2)),), {}),
    ("aggregate_patches", ([np.zeros((4, 4, 2))],), {}),
    ("aggregate_patches", ([GOOD_MAPS, np.zeros((2, 2, 2, 2))],), {}),
    ("aggregate_patches", ([np.full((1, 4, 4, 2), np.nan)],), {}),
    ("aggregate_patches", ([np.zeros((1, 0, 4, 2))],), {}),
    ("aggregate_patches", ([np.full((1, 4, 4, 2), "a")],), {}),
    ("aggregate_patches", ([np.zeros((1, 1, 1, 2))],), {"patch_size": 4}),
    ("aggregate_patches", ([GOOD_MAPS],), {"patch_size": 0}),
    ("aggregate_patches", ([GOOD_MAPS],), {"stride": 1.5}),
    ("aggregate_patches", ([GOOD_MAPS],), {"pretrain_dim": True}),
    ("aggregate_patches", ([GOOD_MAPS],), {"target_dim": -3}),
    ("greedy_coreset", (GOOD_BANK, 6), {}),
    ("greedy_coreset", (GOOD_BANK, -1), {}),
    ("greedy_coreset", (GOOD_BANK, 2.0), {}),
    ("greedy_coreset", (np.ones(5), 1), {}),
    ("greedy_coreset", (np.ones((0, 3)), 0), {}),
    ("greedy_coreset", ([[np.nan, 0.0, 0.0]], 1), {}),
    ("greedy_coreset", (np.ones((2, 3), complex), 1), {}),
    ("greedy_coreset", (GOOD_BANK, 1), {"projection": np.ones((4, 2))}),
    ("greedy_coreset", (GOOD_BANK, 1), {"projection": np.full((3, 2), np.inf)}),
    ("greedy_coreset", (GOOD_BANK, 1), {"start_indices": (7,)}),
    ("greedy_coreset", (GOOD_BANK, 1), {"start_indices": ()}),
    ("greedy_coreset", (GOOD_BANK, 1), {"start_indices": (0.5,)}),
    ("random_projection", (0, 0, 3), {}),
    ("random_projection", (0, 4, -1), {}),
    ("random_projection", (0, 4.0, 2), {}),
    ("nearest_neighbors", (GOOD_BANK, GOOD_BANK, 6), {}),
    ("nearest_neighbors", (GOOD_BANK, GOOD_BANK, 0), {}),
    ("nearest_neighbors", (GOOD_BANK, np.ones((2, 4))), {}),
    ("nearest_neighbors", (GOOD_BANK, np.ones(3)), {}),
    ("nearest_neighbors", (GOOD_BANK, np.full((2, 3), np.inf)), {}),
    ("nearest_neighbors", (np.ones((0, 3)), GOOD_BANK), {}),
    ("nearest_neighbors", ([[1.0, 2.0, np.nan]], [[0.0, 0.0, 0.0]]), {}),
    ("approximate_nearest_neighbors", (GOOD_BANK, GOOD_BANK, 6), {}),
    ("approximate_nearest_neighbors", (GOOD_BANK, np.ones((2, 4))), {}),
    ("approximate_nearest_neighbors", (np.full((5, 3), np.nan), GOOD_BANK), {}),
    ("image_scores", (GOOD_BANK, np.ones((2, 3))), {}),
    ("image_scores", (GOOD_BANK, np.ones((1, 2, 5))), {}),
    ("image_scores", (GOOD_BANK, np.ones((1, 2, 3))), {"num_neighbors": 9}),
    ("image_scores", (GOOD_BANK, np.ones((1, 2, 3))), {"num_neighbors": 0}),
    ("image_scores", (GOOD_BANK, np.full((1, 2, 3), np.nan)), {}),
    ("image_scores", (np.full((5, 3), -np.inf), np.ones((1, 2, 3))), {}),
    ("anomaly_maps", (np.ones((4, 4)), (8, 8)), {}),
    ("anomaly_maps", (np.ones((1, 4, 4)), (8, 0)), {}),
    ("anomaly_maps", (np.ones((1, 4, 4)), "big"), {}),
    ("anomaly_maps", (np.ones((1, 4, 4)), (8, 8, 8)), {}),
    ("anomaly_maps", (np.ones((1, 4, 4)), (8, 8)), {"sigma": -1.0}),
    ("anomaly_maps", (np.ones((1, 4, 4)), (8, 8)), {"sigma": np.inf}),
    ("anomaly_maps", (np.ones((1, 4, 4)), (8, 8)), {"sigma": True}),
    ("anomaly_maps", (np.full((1, 4, 4), np.nan), (8, 8)), {}),
]


@pytest.mark.parametrize("name, args, kwargs", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUTS)])
def test_same_error_on_bad_host_input(name, args, kwargs):
    with pytest.raises(ValueError) as from_reference:
        getattr(reference, name)(*args, **kwargs)
    with pytest.raises(ValueError) as from_jax:
        getattr(patchcore_jax, name)(*args, **kwargs)
    assert str(from_jax.value) == str(from_reference.value)


def _run(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_patchcore_jax_does_not_import_the_reference():
    loaded = _run(
        "import importlib, pkgutil, sys, patchcore_jax\n"
        "for m in pkgutil.walk_packages(patchcore_jax.__path__, 'patchcore_jax.'): importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'reference'))"
    )
    assert loaded == "[]"


def test_reference_does_not_import_jax():
    # Imported and run on NumPy arrays: array_namespace must not reach for JAX either.
    loaded = _run(
        "import sys, numpy as np, reference as r\n"
        "bank = np.random.default_rng(0).normal(size=(20, 3))\n"
        "r.greedy_coreset(bank, 3, projection=r.random_projection(0, 3, 2)); r.nearest_neighbors(bank, bank, 2)\n"
        "r.image_scores(bank, bank[None], num_neighbors=3); r.anomaly_maps(np.ones((1, 3, 3)), 8)\n"
        "r.aggregate_patches([np.ones((1, 4, 4, 2))], pretrain_dim=4, target_dim=4)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))"
    )
    assert loaded == "[]"


@pytest.fixture(scope="module")
def on_device():
    rng = np.random.default_rng(0)
    put = jax.device_put  # explicit transfers, before the guard
    return dict(
        bank=put(rng.normal(size=(300, 16)).astype(np.float32)),
        queries=put(rng.normal(size=(20, 16)).astype(np.float32)),
        feats=put(rng.normal(size=(2, 12, 16)).astype(np.float32)),
        scores=put(np.abs(rng.normal(size=(2, 4, 4))).astype(np.float32)),
        maps=[put(rng.normal(size=(2, 6, 6, 8)).astype(np.float32)), put(rng.normal(size=(2, 3, 3, 8)).astype(np.float32))],
        projection=patchcore_jax.random_projection(0, 16, 4),
    )


def _device_calls(a):
    index = patchcore_jax.build_index(a["bank"])
    return {
        "nearest_neighbors": lambda: patchcore_jax.nearest_neighbors(a["bank"], a["queries"], 3),
        "build_index": lambda: patchcore_jax.build_index(a["bank"], block=64),
        "search": lambda: patchcore_jax.search(index, a["queries"], 2),
        "image_scores": lambda: patchcore_jax.image_scores(a["bank"], a["feats"], num_neighbors=3),
        "image_scores_from_index": lambda: patchcore_jax.image_scores_from_index(index, a["feats"]),
        "greedy_coreset lazy": lambda: patchcore_jax.greedy_coreset(a["bank"], 20, projection=a["projection"],
                                                                    start_indices=(0, 5)),
        "greedy_coreset dense": lambda: patchcore_jax.greedy_coreset(a["bank"], 20, projection=a["projection"],
                                                                     method="dense"),
        "greedy_coreset full space": lambda: patchcore_jax.greedy_coreset(a["bank"], 20),
        "greedy_coreset in chunks": lambda: patchcore_jax.greedy_coreset(a["bank"], 20, projection=a["projection"],
                                                                         progress=lambda done: None, chunk=8),
        "greedy_coreset none": lambda: patchcore_jax.greedy_coreset(a["bank"], 0),
        "anomaly_maps": lambda: patchcore_jax.anomaly_maps(a["scores"], (16, 16)),
        "aggregate_patches": lambda: patchcore_jax.aggregate_patches(a["maps"], pretrain_dim=8, target_dim=8),
        "approximate_nearest_neighbors": lambda: patchcore_jax.approximate_nearest_neighbors(a["bank"], a["queries"], 2),
    }


def test_numerics_run_on_device_arrays_without_implicit_transfers(on_device):
    calls = _device_calls(on_device)
    # Compiled first: a compilation is no transfer, but keeps this test about the calls.
    expected = {name: jax.block_until_ready(call()) for name, call in calls.items()}
    with jax.transfer_guard("disallow"):
        got = {name: jax.block_until_ready(call()) for name, call in calls.items()}
    for name in calls:
        for g, e in zip(jax.tree.leaves(got[name]), jax.tree.leaves(expected[name])):
            assert isinstance(g, jax.Array), name
            np.testing.assert_array_equal(np.asarray(g), np.asarray(e), err_msg=name)


def test_device_arrays_are_never_value_checked():
    # A NaN on the host is refused at the boundary; the same NaN on the device is not looked for,
    # since finding it would need the values on the host. (On a CPU, jax.transfer_guard lets
    # device-to-host reads through, so this is the proof there that no check reads them.)
    bank = np.ones((4, 3), np.float32)
    bank[2, 1] = np.nan
    with pytest.raises(ValueError, match="bank: expected finite values"):
        patchcore_jax.nearest_neighbors(bank, bank[:1])
    dist, _ = patchcore_jax.nearest_neighbors(jnp.asarray(bank), jnp.asarray(bank[:1]))
    assert dist.shape == (1, 1)
    with pytest.raises(ValueError, match="patch_scores: expected finite values"):
        patchcore_jax.anomaly_maps(bank[None], (4, 4))
    assert np.isnan(np.asarray(patchcore_jax.anomaly_maps(jnp.asarray(bank)[None], (4, 4)))).any()
