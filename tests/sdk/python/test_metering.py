"""Metering and spend caps against the real server (real microVMs, real SQLite), driven by the
official SDK for sandboxes and by plain HTTP for Alcove's /alcove/v1 endpoints.

The server runs with `--meter-interval 2s` and a webhook pointed at a port this test listens on
(tests/sdk/run.sh). Usage is compared with the wall clock measured around the operations, never
asserted as a latency.
"""

import hashlib
import hmac
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from e2b import Sandbox, SandboxState

from conftest import TEMPLATE

API = os.environ.get("E2B_API_URL", "")


def call(method, path, key=None, body=None):
    req = urllib.request.Request(
        API + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-API-KEY": key or os.environ["E2B_API_KEY"], "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def usage_of(sandbox_id):
    status, body = call("GET", "/alcove/v1/usage?groupBy=sandbox")
    assert status == 200, body
    for item in json.loads(body)["items"]:
        if item["key"] == sandbox_id:
            return item
    return None


def test_usage_is_the_time_a_sandbox_ran_across_a_restart_and_what_it_keeps_while_paused():
    restart = os.environ.get("ALCOVE_SDK_RESTART_SERVER")
    if not restart or not os.environ.get("ALCOVE_SDK_WEBHOOK_PORT"):
        pytest.skip("needs tests/sdk/run.sh (server restart and metering flags)")
    outer_start = time.monotonic()
    sbx = Sandbox.create(TEMPLATE, timeout=300)
    inner_start = time.monotonic()
    try:
        info = sbx.get_info()
        cpu, mem_gib = info.cpu_count, info.memory_mb / 1024
        time.sleep(4)
        # The server restarts while the VM runs on: that time is charged once.
        subprocess.run([restart], check=True, timeout=120)
        time.sleep(max(0, 10 - (time.monotonic() - inner_start)))
        inner_end = time.monotonic()
        sbx.pause()
        outer_end = time.monotonic()
        time.sleep(10)
        item = usage_of(sbx.sandbox_id)
        assert item is not None
        ran = item["vcpuSeconds"] / cpu
        lo, hi = inner_end - inner_start, outer_end - outer_start
        assert lo - 1 <= ran <= hi + 1, f"charged {ran:.2f} s of running, wall clock {lo:.2f}-{hi:.2f} s"
        assert abs(item["memoryGibSeconds"] - ran * mem_gib) < 1e-6
        # Paused, its memory image and disk are stored and charged as storage.
        assert item["storageGibHours"] > 0
        # Nothing more is charged for compute while paused.
        time.sleep(3)
        assert usage_of(sbx.sandbox_id)["vcpuSeconds"] == pytest.approx(item["vcpuSeconds"])
        status, body = call("GET", "/alcove/v1/usage/events?limit=10000")
        assert status == 200
        events = [json.loads(line) for line in body.splitlines()]
        mine = [e for e in events if e.get("sandboxID") == sbx.sandbox_id]
        assert {e["kind"] for e in mine} >= {"compute", "storage"}
        assert len({e["id"] for e in events}) == len(events), "idempotency keys are unique"
    finally:
        sbx.kill()


class _Hook(http.server.BaseHTTPRequestHandler):
    got = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"])).decode()
        _Hook.got.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_tiny_spend_cap_warns_by_signed_webhook_pauses_and_refuses_creates():
    port = os.environ.get("ALCOVE_SDK_WEBHOOK_PORT")
    if not port:
        pytest.skip("needs tests/sdk/run.sh (metering flags)")
    secret = os.environ["ALCOVE_SDK_WEBHOOK_SECRET"]
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    team = f"capped-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [os.environ["ALCOVE_BIN"], "keys", "--data-dir", os.environ["ALCOVE_SDK_DATA_DIR"],
         "--json", "create", "--team", team],
        check=True, capture_output=True, text=True, timeout=60,
    )
    key = json.loads(out.stdout)["key"]
    sbx = None
    try:
        # About two seconds of a 2-vCPU sandbox at E2B's list price.
        status, body = call(
            "PUT", f"/alcove/v1/teams/{team}/limits",
            body={"monthlySpendCapUsd": 0.00005, "warnAtPercent": [50, 100], "onCap": "pause"},
        )
        assert status == 200, body
        sbx = Sandbox.create(TEMPLATE, timeout=300, api_key=key)
        deadline = time.time() + 90
        while Sandbox.get_info(sbx.sandbox_id, api_key=key).state != SandboxState.PAUSED:
            assert time.time() < deadline, "the capped team's sandbox was not paused"
            time.sleep(1)
        with pytest.raises(Exception) as refused:
            Sandbox.create(TEMPLATE, timeout=60, api_key=key)
        assert "spend cap" in str(refused.value), refused.value
        deadline = time.time() + 30
        while len([g for g in _Hook.got if json.loads(g[1])["teamName"] == team]) < 2:
            assert time.time() < deadline, f"warnings not delivered: {_Hook.got}"
            time.sleep(0.5)
        percents = []
        for headers, body in _Hook.got:
            headers = {k.lower(): v for k, v in headers.items()}
            want = hmac.new(
                secret.encode(), f"{headers['x-alcove-timestamp']}.{body}".encode(), hashlib.sha256
            ).hexdigest()
            assert headers["x-alcove-signature"] == f"sha256={want}"
            event = json.loads(body)
            if event["teamName"] == team:
                percents.append(event["percent"])
        assert sorted(percents) == [50, 100]
        status, body = call("GET", f"/alcove/v1/teams/{team}/limits", key=key)
        assert status == 200 and json.loads(body)["capped"] is True, body
    finally:
        hook.shutdown()
        call("PUT", f"/alcove/v1/teams/{team}/limits", body={})
        if sbx is not None:
            Sandbox.kill(sbx.sandbox_id, api_key=key)
