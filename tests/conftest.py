"""Shared test configuration: hypothesis profiles and the apache-tvm requirement."""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def tvm():
    """
    The real apache-tvm package. CI sets TVM_RPC_REQUIRE_INTEROP=1 so a missing
    package fails the run instead of skipping the interop tests.
    """
    try:
        import tvm as tvm_module
        import tvm.rpc  # noqa: F401
    except ImportError as e:
        if os.environ.get("TVM_RPC_REQUIRE_INTEROP"):
            pytest.fail(f"apache-tvm is required for the interop tests: {e}")
        pytest.skip(f"apache-tvm not installed: {e}")
    return tvm_module


#: The tiers; every test is in exactly one (see the markers in setup.cfg).
TIERS = ("unit", "system")


def pytest_collection_modifyitems(config, items):
    """Refuse a test that is in no tier or in both, so no module is left untiered."""
    wrong = sorted({
        item.nodeid.split("::")[0]
        for item in items
        if len({marker.name for marker in item.iter_markers()} & set(TIERS)) != 1
    })
    if wrong:
        raise pytest.UsageError(
            "tests must be marked unit or system (pytestmark), exactly one: " + ", ".join(wrong))
