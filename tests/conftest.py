"""Hypothesis profiles: `ci` (derandomized, repeatable), `dev` (default), `nightly` (many examples).

Select with HYPOTHESIS_PROFILE=ci|dev|nightly; CI=true selects `ci` when none is named.
"""

import os

# Eight host devices for the multi-device tests; must be set before JAX initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

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
