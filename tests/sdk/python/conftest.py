"""Fixtures for the official `e2b` SDK suite.

Configured only through E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY, exactly as a user
would point the unmodified SDK at an Alcove server. `tests/sdk/run.sh` sets them.
"""

import os
import uuid

import pytest
from e2b import Sandbox

TEMPLATE = os.environ.get("ALCOVE_SDK_TEMPLATE", "base")


def pytest_configure(config):
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            raise pytest.UsageError(f"{var} is not set; run tests/sdk/run.sh")


@pytest.fixture
def run_id():
    """A value unique to this test, for metadata filters that must not see other tests."""
    return uuid.uuid4().hex


@pytest.fixture
def sandbox(run_id):
    sbx = Sandbox.create(TEMPLATE, timeout=120, metadata={"suite": "python", "run": run_id})
    try:
        yield sbx
    finally:
        sbx.kill()
