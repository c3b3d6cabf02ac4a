"""Hypothesis profiles: `ci` (derandomized, repeatable), `dev` (default), `nightly` (many examples).

Select with HYPOTHESIS_PROFILE=ci|dev|nightly; CI=true selects `ci` when none is named.
"""

import os

# Eight host devices for the multi-device tests; must be set before JAX initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The test run compiles about 1,700 distinct programs, and compiling is most of its time (60% of the
# workers' CPU time). Unless the nightly profile runs, the tests compile for speed of compiling: XLA's
# backend optimization level 0 (LLVM's costly passes skipped) and its older loop emitters in place of
# the MLIR fusion emitters (which took twice the CPU time to compile the same programs), one codegen
# thread. The HLO, its fusions and its float semantics are XLA's own either way (no fast math); the
# programs run slower, which the tests' tiny shapes do not feel. The nightly profile (and any XLA_FLAGS
# naming one of these flags) compiles as users do; subprocesses the tests start inherit the choice.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                "--xla_cpu_parallel_codegen_split_count=1")
if os.environ.get("HYPOTHESIS_PROFILE") != "nightly":
    for flag in FAST_COMPILE:
        if flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
            os.environ["XLA_FLAGS"] += " " + flag
# The same for numba, which compiles pynndescent's graph search (in the recall test) with LLVM: 21 s of
# CPU time instead of 27 at its default level 3.
os.environ.setdefault("NUMBA_OPT", "0")

# One compilation cache on disk for the whole test run, shared with the worker processes and the CLI
# subprocesses the tests start (they inherit the environment): a program compiled once (by another
# module's model of the same configuration, after a module's caches are cleared, or in another process)
# is read back instead of compiled again. A fresh folder per run, removed at exit, so one run's time
# never depends on an earlier one; JAX_COMPILATION_CACHE_DIR, when set, names another instead.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    import atexit
    import shutil
    import tempfile

    _run_cache = tempfile.mkdtemp(prefix="patchcore-jax-test-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _run_cache
    os.environ["PATCHCORE_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
    atexit.register(lambda: os.environ.get("PATCHCORE_JAX_TEST_CACHE_OWNER") == str(os.getpid())
                    and shutil.rmtree(_run_cache, ignore_errors=True))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program, however quick
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")  # and however small

import jax  # noqa: E402

# JAX reads the environment when it is imported, and a plugin may have imported it before this file.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=12, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test module starts from empty JAX caches, so one long run does not accumulate hundreds of
    compiled programs (and their memory) across modules; tests that count compilations do so within
    one test."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


# The order in which test modules go to the workers (`--dist loadscope --no-loadscope-reorder` in
# pyproject.toml): longest first, so that no long module starts last and runs alone at the end while
# the other worker idles (xdist's own reordering, by number of tests, put the few-test, long modules
# last). Rough CPU seconds of a 2-core run, December 2026; modules not named follow, in file order.
LONGEST_FIRST = [
    "test_sharding", "test_first_hour", "test_sweep", "test_reference_namespaces", "test_neighbors", "test_cli",
    "test_backbone", "test_persistence", "test_datasets", "test_gate", "test_signals", "test_model_races",
    "test_clustered", "test_export", "test_coreset", "test_ensemble", "test_scoring", "test_results", "test_model",
    "test_device_script", "test_knobs", "test_boundaries", "test_hardening",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    module = lambda item: os.path.splitext(os.path.basename(item.nodeid.split("::")[0]))[0]  # noqa: E731
    items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable: each module keeps its order
