"""Fixtures for the official `e2b` SDK suite.

Configured only through E2B_API_URL, E2B_SANDBOX_URL, E2B_VOLUME_API_URL and E2B_API_KEY,
exactly as a user would point the unmodified SDK at an Alcove server. `tests/sdk/run.sh` sets
them.
"""

import os
import uuid

import pytest
from e2b import Sandbox

from testnet import serve_test_dns

TEMPLATE = os.environ.get("ALCOVE_SDK_TEMPLATE", "base")


def pytest_configure(config):
    # Without E2B_VOLUME_API_URL the SDK would send volume tokens to api.e2b.app.
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_VOLUME_API_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            raise pytest.UsageError(f"{var} is not set; run tests/sdk/run.sh")


def audit_events(sandbox_id, until=None, timeout=30):
    """The sandbox's run trace (GET /alcove/v1/sandboxes/{id}/events); with `until`, polled
    until `until(events)` holds (events are written by a background task)."""
    import json
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        req = urllib.request.Request(
            f"{os.environ['E2B_API_URL']}/alcove/v1/sandboxes/{sandbox_id}/events?limit=10000",
            headers={"X-API-KEY": os.environ["E2B_API_KEY"]},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            ev = json.loads(r.read())
        if until is None or until(ev):
            return ev
        assert time.time() < deadline, json.dumps(ev, indent=1)
        time.sleep(0.5)


@pytest.fixture(scope="session", autouse=True)
def test_internet_dns():
    """The server's DNS upstream for this run (tests/sdk/run.sh sets 198.51.100.2:5353): the test
    zone (testnet.py)."""
    if os.environ.get("ALCOVE_DNS_UPSTREAM") != "198.51.100.2:5353":
        yield
        return
    serve_test_dns()
    yield


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
