"""Fixtures for the official `e2b` SDK suite.

Configured only through E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY, exactly as a user
would point the unmodified SDK at an Alcove server. `tests/sdk/run.sh` sets them.
"""

import os
import socket
import struct
import threading
import uuid

import pytest
from e2b import Sandbox

TEMPLATE = os.environ.get("ALCOVE_SDK_TEMPLATE", "base")


def pytest_configure(config):
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
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


# The test internet's names (tests/sdk/python/test_network.py), served with the rest below.
TEST_ZONE = {"a.test": "198.51.100.2", "b.test": "198.51.100.3"}


def _host_resolver():
    with open("/etc/resolv.conf") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                return (parts[1], 53)
    return ("127.0.0.1", 53)


def _forward(query, upstream):
    f = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    f.settimeout(3)
    try:
        f.sendto(query, upstream)
        return f.recvfrom(4096)[0]
    except OSError:
        return None
    finally:
        f.close()


@pytest.fixture(scope="session", autouse=True)
def test_internet_dns():
    """The server's DNS upstream for this run (tests/sdk/run.sh sets 198.51.100.2:5353): the test
    zone's names answered here, other `.test` names NXDOMAIN, every other name forwarded to the
    host's resolver, so template builds (pip, apt) reach the real package registries."""
    if os.environ.get("ALCOVE_DNS_UPSTREAM") != "198.51.100.2:5353":
        yield
        return
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("198.51.100.2", 5353))
    upstream = _host_resolver()

    def answer(q, addr):
        try:
            qid = struct.unpack(">H", q[:2])[0]
            i, labels = 12, []
            while q[i]:
                labels.append(q[i + 1 : i + 1 + q[i]].decode())
                i += 1 + q[i]
            qtype = struct.unpack(">H", q[i + 1 : i + 3])[0]
        except (IndexError, struct.error, UnicodeDecodeError):
            return
        name = ".".join(labels).lower()
        if not name.endswith(".test"):
            reply = _forward(q, upstream)
            if reply:
                s.sendto(reply, addr)
            return
        ip = TEST_ZONE.get(name)
        answers = b""
        if ip and qtype == 1:
            answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
        head = struct.pack(">HHHHHH", qid, 0x8180 | (0 if ip else 3), 1, 1 if answers else 0, 0, 0)
        s.sendto(head + q[12 : i + 5] + answers, addr)

    def serve():
        while True:
            q, addr = s.recvfrom(1500)
            threading.Thread(target=answer, args=(q, addr), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
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
