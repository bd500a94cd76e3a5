"""Every platform port needs the sandbox's access token (issue 13), checked with the official
e2b-code-interpreter SDK and raw httpx against the shared server: the code interpreter (49999)
refuses a missing, wrong or other sandbox's token before any code runs, the SDK (which sends
the token) works, and the proxy strips the team's API key before a request reaches the guest.
Needs real sandboxes."""

import os
import time

import httpx
import pytest
from conftest import TEMPLATE
from e2b import Sandbox as BaseSandbox
from e2b_code_interpreter import Sandbox

API = os.environ.get("E2B_SANDBOX_URL") or os.environ.get("E2B_API_URL")
CI_PORT = 49999
ENVD_PORT = 49983


@pytest.fixture(scope="module")
def ci():
    sbx = Sandbox.create(timeout=300, metadata={"suite": "security-ports"})
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.fixture(scope="module")
def other():
    sbx = BaseSandbox.create(TEMPLATE, timeout=300, metadata={"suite": "security-ports"})
    try:
        yield sbx
    finally:
        sbx.kill()


def raw(sbx, port, path, token=None, method="POST", json=None, headers=None):
    h = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port)}
    if token is not None:
        h["X-Access-Token"] = token
    h.update(headers or {})
    return httpx.request(method, f"{API}{path}", headers=h, json=json, timeout=60)


def test_the_code_interpreter_refuses_requests_without_the_sandboxs_token(ci, other):
    token = ci._envd_access_token
    assert token, "sandboxes are secured by default"
    marker = "/tmp/ran-without-token"
    code = f"open({marker!r}, 'w').write('x'); print('ran')"
    for bad in (None, "wrong", other._envd_access_token):
        r = raw(ci, CI_PORT, "/execute", bad, json={"code": code})
        assert r.status_code == 401, (bad, r.status_code, r.text)
        assert r.json()["error_code"] == "invalid_access_token"
    # Nothing ran: the marker file does not exist.
    assert not ci.files.exists(marker)
    # With the token, as the SDK sends it, code runs.
    ok = raw(ci, CI_PORT, "/execute", token, json={"code": "print(6 * 7)"})
    assert ok.status_code == 200, ok.text
    assert "42" in ok.text
    assert ci.run_code("1 + 1").text == "2"


def test_envd_refuses_other_sandboxes_tokens(ci, other):
    r = raw(ci, ENVD_PORT, "/envs", other._envd_access_token, method="GET")
    assert r.status_code == 401, r.text
    assert raw(ci, ENVD_PORT, "/envs", ci._envd_access_token, method="GET").status_code == 200


def test_the_team_api_key_does_not_reach_the_guest(ci):
    # A server in the sandbox prints the headers it receives.
    server = """
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200); self.send_header('content-length', str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(('0.0.0.0', 8123), H).serve_forever()
"""
    ci.files.write("/tmp/headers.py", server)
    ci.commands.run("python3 /tmp/headers.py", background=True)
    key = os.environ["E2B_API_KEY"]
    seen = None
    for _ in range(50):
        r = raw(
            ci,
            8123,
            "/",
            ci._envd_access_token,
            method="GET",
            headers={"X-API-KEY": key, "Authorization": f"Bearer {key}"},
        )
        if r.status_code == 200:
            seen = r.json()
            break
        time.sleep(0.2)
    assert seen is not None, "the header server did not come up"
    assert "x-api-key" not in seen, seen
    assert "authorization" not in seen, seen
    assert "x-access-token" not in seen, seen
