"""Fixtures for the adversarial suite (`tests/security/`).

It runs against the server `tests/sdk/run.sh` starts (suite `security`), as an attacker would:
the official SDK and raw HTTP (httpx, sockets). Configured through E2B_API_URL, E2B_API_KEY (the
first team's key), ALCOVE_BIN and ALCOVE_SDK_DATA_DIR; a second team ("intruder") and its key are
made here with `alcove keys create`, straight in the server's database, as an operator would.
"""

import json
import os
import subprocess
import uuid

import httpx
import pytest
from e2b import Sandbox

TEMPLATE = os.environ.get("ALCOVE_SDK_TEMPLATE", "base")


def pytest_configure(config):
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            raise pytest.UsageError(f"{var} is not set; run SUITES=security tests/sdk/run.sh")


@pytest.fixture(scope="session")
def api_url():
    return os.environ["E2B_API_URL"].rstrip("/")


@pytest.fixture(scope="session")
def data_dir():
    d = os.environ.get("ALCOVE_SDK_DATA_DIR")
    if not d:
        pytest.skip("needs the server's data directory (ALCOVE_SDK_DATA_DIR, set by run.sh)")
    return d


@pytest.fixture(scope="session")
def other_key(data_dir):
    """An API key of a second team, which owns nothing of the first team's."""
    out = subprocess.run(
        [os.environ.get("ALCOVE_BIN", "alcove"), "keys", "--data-dir", data_dir, "--json", "create",
         "--team", "intruder", "--name", f"security-{uuid.uuid4().hex[:6]}"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    return json.loads(out)["key"]


@pytest.fixture(scope="session")
def owner(api_url):
    """Raw HTTP as the first team."""
    with httpx.Client(base_url=api_url, headers={"X-API-KEY": os.environ["E2B_API_KEY"]},
                      timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def intruder(api_url, other_key):
    """Raw HTTP as the second team."""
    with httpx.Client(base_url=api_url, headers={"X-API-KEY": other_key}, timeout=120) as c:
        yield c


@pytest.fixture
def sandbox():
    sbx = Sandbox.create(TEMPLATE, timeout=180, metadata={"suite": "security"})
    try:
        yield sbx
    finally:
        sbx.kill()


def sandbox_call(api_url, sandbox_id, method, path, port=49983, token=None, **kw):
    """A request to a sandbox port through the API's proxy, routed by E2B's headers."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **kw.pop("headers", {})}
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.request(method, api_url + path, headers=headers, timeout=60, **kw)


def server_serves(api_url):
    """The server still answers the SDK: lists sandboxes through the official client."""
    Sandbox.list().next_items()
    assert httpx.get(api_url + "/health", timeout=30).status_code == 200


# Cheap and read-only first, then what loads the host, then what abuses or kills servers.
ORDER = ["test_cross_team", "test_tokens", "test_jail", "test_guest_network",
         "test_noisy_neighbour", "test_abuse", "test_chaos"]


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1]
        return ORDER.index(name) if name in ORDER else len(ORDER)

    items.sort(key=rank)
