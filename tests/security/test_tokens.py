"""Sandbox ports through the API's proxy: every port the platform serves (envd 49983, the code
interpreter 49999) refuses a missing, wrong or other sandbox's access token, by either routing
(E2B's headers or the `<port>-<id>.<domain>` host name); user ports with
`allowPublicTraffic: false` need the traffic token; signed file URLs refuse tampering; and the
caller's API key never reaches a server inside the sandbox.
"""

import json
import os
import time
import urllib.parse

import httpx
import pytest
from e2b import Sandbox
from e2b.sandbox.signature import get_signature

from conftest import TEMPLATE, sandbox_call

PLATFORM_PORTS = [49983, 49999]


@pytest.fixture(scope="module")
def pair():
    a = Sandbox.create(TEMPLATE, timeout=300, metadata={"suite": "security"})
    b = Sandbox.create(TEMPLATE, timeout=300, metadata={"suite": "security"})
    a.files.write("/home/user/a.txt", "file of a")
    try:
        yield a, b
    finally:
        a.kill()
        b.kill()


def refused(resp):
    return resp.status_code in (401, 403)


def by_host(api_url, sandbox_id, port, path, token=None, method="GET", **kw):
    """The same request routed by host name, as a browser or a tunnel would send it."""
    u = urllib.parse.urlparse(api_url)
    # The server's domain (tests/sdk/run.sh serves `alcove.localhost:<port>`); the default one
    # is `localhost:<port>`.
    domain = os.environ.get("ALCOVE_SDK_DOMAIN") or f"localhost:{u.port}"
    headers = {"Host": f"{port}-{sandbox_id}.{domain}", **kw.pop("headers", {})}
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.request(method, api_url + path, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("port", PLATFORM_PORTS)
def test_platform_ports_refuse_missing_wrong_and_other_sandboxes_tokens(api_url, pair, port):
    a, b = pair
    path = "/files?path=/home/user/a.txt" if port == 49983 else "/execute"
    method = "GET" if port == 49983 else "POST"
    body = None if port == 49983 else {"code": "import os; print(os.getuid())"}
    for token in [None, "", "wrong-token", b._envd_access_token, a._envd_access_token + "x"]:
        for route in (sandbox_call, by_host):
            if route is sandbox_call:
                r = sandbox_call(api_url, a.sandbox_id, method, path, port=port, token=token, json=body)
            else:
                r = by_host(api_url, a.sandbox_id, port, path, token=token, method=method, json=body)
            assert refused(r), (port, route.__name__, token, r.status_code, r.text[:200])
            assert "file of a" not in r.text
    # The right token passes the proxy (envd answers; nothing listens on 49999 in `base`).
    ok = sandbox_call(api_url, a.sandbox_id, method, path, port=port, token=a._envd_access_token, json=body)
    assert not refused(ok), ok.text
    if port == 49983:
        assert ok.status_code == 200 and ok.text == "file of a"


def test_code_interpreter_port_runs_nothing_without_the_token(api_url):
    """The original finding: POST /execute to 49999 with no token ran code."""
    from e2b_code_interpreter import Sandbox as CodeSandbox

    sbx = CodeSandbox.create(timeout=300)
    try:
        marker = "pwned-" + sbx.sandbox_id
        code = f"open('/tmp/marker','w').write({marker!r}); print({marker!r})"
        for token in [None, "wrong", ""]:
            r = sandbox_call(api_url, sbx.sandbox_id, "POST", "/execute", port=49999, token=token,
                             json={"code": code})
            assert refused(r), (token, r.status_code, r.text[:200])
            assert marker not in r.text
        assert sbx.commands.run("cat /tmp/marker 2>/dev/null || echo absent").stdout.strip() == "absent"
        # The SDK (which sends the token) still runs code.
        assert sbx.run_code("print(6*7)").logs.stdout == ["42\n"]
    finally:
        sbx.kill()


def test_user_ports_of_a_private_sandbox_need_its_traffic_token(api_url):
    sbx = Sandbox.create(TEMPLATE, timeout=120, network={"allow_public_traffic": False})
    other = Sandbox.create(TEMPLATE, timeout=120, network={"allow_public_traffic": False})
    try:
        sbx.commands.run("python3 -m http.server 8000 --directory /etc", background=True)
        path = "/hostname"
        tok = sbx.traffic_access_token
        assert tok
        deadline = time.time() + 60
        while True:
            ok = sandbox_call(api_url, sbx.sandbox_id, "GET", path, port=8000,
                              headers={"e2b-traffic-access-token": tok})
            if ok.status_code == 200 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert ok.status_code == 200
        for bad in [None, "wrong", other.traffic_access_token, sbx._envd_access_token]:
            headers = {} if bad is None else {"e2b-traffic-access-token": bad}
            r = sandbox_call(api_url, sbx.sandbox_id, "GET", path, port=8000, headers=headers)
            assert r.status_code == 403, (bad, r.status_code)
    finally:
        sbx.kill()
        other.kill()


ECHO = r'''
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("0.0.0.0", 8001), H).serve_forever()
'''


def test_api_credentials_never_reach_the_sandbox(api_url, pair):
    a, _ = pair
    a.files.write("/home/user/echo.py", ECHO)
    a.commands.run("python3 /home/user/echo.py", background=True)
    key = "e2b_" + "5" * 40
    headers = {"X-API-KEY": key, "Authorization": "Bearer " + key, "X-Probe": "kept"}
    deadline = time.time() + 60
    while True:
        r = sandbox_call(api_url, a.sandbox_id, "GET", "/", port=8001, headers=headers)
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    seen = json.loads(r.text)
    assert seen.get("x-probe") == "kept"
    assert "x-api-key" not in seen and "authorization" not in seen, seen


def test_signed_file_urls_refuse_tampering(api_url, pair):
    a, _ = pair
    tok = a._envd_access_token

    def get(query, method="GET", content=None):
        return httpx.request(method, f"{api_url}/files?{urllib.parse.urlencode(query)}",
                             headers={"E2b-Sandbox-Id": a.sandbox_id}, content=content, timeout=60)

    def signed(path, op, user="user", expires_in=120):
        s = get_signature(path, op, user, tok, expires_in)
        q = {"path": path, "username": user, "signature": s["signature"]}
        if s["expiration"] is not None:
            q["signature_expiration"] = str(s["expiration"])
        return q

    good = signed("/home/user/a.txt", "read")
    assert get(good).text == "file of a"
    # The SDK's own URL works too.
    url = urllib.parse.urlparse(a.download_url("/home/user/a.txt", use_signature_expiration=120))
    assert get(dict(urllib.parse.parse_qsl(url.query))).text == "file of a"

    tampered = [
        {**good, "path": "/etc/shadow"},
        {**good, "path": "/home/user/../../etc/shadow"},
        {**good, "username": "root"},
        {**good, "signature_expiration": str(int(good["signature_expiration"]) + 86400)},
        {k: v for k, v in good.items() if k != "signature_expiration"},
        {**good, "signature": good["signature"][:-2] + "AA"},
        signed("/home/user/a.txt", "read", expires_in=-5),  # expired
        signed("/home/user/a.txt", "write"),  # a write signature used to read
    ]
    for q in tampered:
        r = get(q)
        assert r.status_code in (401, 403), (q, r.status_code, r.text[:200])
        assert "file of a" not in r.text and "root:" not in r.text
    # A read signature does not allow a write.
    r = get({**signed("/home/user/a.txt", "read")}, method="POST",
            content=b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nowned\r\n--x--\r\n")
    assert r.status_code in (401, 403)
    assert a.files.read("/home/user/a.txt") == "file of a"


def test_traffic_without_a_token_does_not_wake_a_paused_sandbox(api_url):
    """autoResume wakes a paused sandbox for its owner's traffic, not for anyone's."""
    sbx = Sandbox.create(TEMPLATE, timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        assert sbx.pause() is True
        for token in [None, "wrong"]:
            r = sandbox_call(api_url, sbx.sandbox_id, "GET", "/files?path=/etc/hostname", token=token)
            assert r.status_code in (401, 403), (token, r.status_code, r.text[:200])
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
    finally:
        sbx.kill()
