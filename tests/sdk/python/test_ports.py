"""Servers in the sandbox reached through the proxy: the routing headers and the
`<port>-<sandboxID>.<domain>` host form (`Sandbox.get_host`), a WebSocket echo, a closed port,
and traffic access tokens (`network={"allow_public_traffic": False}`). Needs real sandboxes."""

import base64
import hashlib
import os
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
from e2b import Sandbox

from conftest import TEMPLATE

SANDBOX_URL = os.environ.get("E2B_SANDBOX_URL", "")
# 3.2 MB of incompressible bytes, served by http.server in the sandbox.
BIG = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(100_000))

# A WebSocket echo server using only the standard library (the guest has no `websockets`).
WS_SERVER = r'''
import base64, hashlib, socket, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def handle(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = c.recv(4096)
        if not chunk:
            return
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    keys = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
            if l.lower().startswith(b"sec-websocket-key:")]
    if not keys:
        c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        c.close()
        return
    key = keys[0]
    acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    def need(n):
        nonlocal buf
        while len(buf) < n:
            chunk = c.recv(65536)
            if not chunk:
                raise EOFError
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out
    try:
        while True:
            b0, b1 = need(2)
            op, ln = b0 & 0x0F, b1 & 0x7F
            if ln == 126:
                ln = int.from_bytes(need(2), "big")
            elif ln == 127:
                ln = int.from_bytes(need(8), "big")
            mask = need(4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(x ^ mask[i % 4] for i, x in enumerate(need(ln)))
            if op == 8:
                c.sendall(b"\x88\x00")
                break
            c.sendall(frame(op, data))
    except EOFError:
        pass
    c.close()
def frame(op, data, mask=None):
    n = len(data)
    b1 = 0x80 if mask else 0
    hdr = bytes([0x80 | op])
    if n < 126:
        hdr += bytes([b1 | n])
    elif n < 65536:
        hdr += bytes([b1 | 126]) + n.to_bytes(2, "big")
    else:
        hdr += bytes([b1 | 127]) + n.to_bytes(8, "big")
    return hdr + data
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
'''


def routed(sbx, port, extra=None):
    h = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port)}
    h.update(extra or {})
    return h


def wait_until_served(sbx, port, headers=None, timeout=60):
    """Polls until the server in the sandbox answers (502 port_not_open while it starts)."""
    deadline = time.time() + timeout
    while True:
        r = httpx.get(SANDBOX_URL + "/", headers=routed(sbx, port, headers), timeout=30)
        if r.status_code != 502 or time.time() > deadline:
            return r
        time.sleep(0.3)


def start_http_server(sbx, port):
    sbx.files.write("/tmp/www/index.html", "hello from the sandbox\n")
    sbx.files.write("/tmp/www/big.bin", BIG)
    sbx.commands.run(f"python3 -m http.server {port} --directory /tmp/www", background=True)


def test_http_server_by_routing_headers_and_host(sandbox):
    start_http_server(sandbox, 8000)
    r = wait_until_served(sandbox, 8000)
    assert r.status_code == 200, r.text
    assert r.text == "hello from the sandbox\n"  # http.server serves index.html for /

    r = httpx.get(SANDBOX_URL + "/index.html", headers=routed(sandbox, 8000), timeout=30)
    assert r.status_code == 200
    assert r.text == "hello from the sandbox\n"

    # The host form, as Sandbox.get_host gives it; sent to the server's address with that Host.
    host = sandbox.get_host(8000)
    assert host.startswith(f"8000-{sandbox.sandbox_id}.")
    r = httpx.get(SANDBOX_URL + "/index.html", headers={"Host": host}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.text == "hello from the sandbox\n"

    want = hashlib.sha256(BIG).hexdigest()
    r = httpx.get(SANDBOX_URL + "/big.bin", headers=routed(sandbox, 8000), timeout=120)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == want


def test_closed_port_is_port_not_open(sandbox):
    r = httpx.get(SANDBOX_URL + "/", headers=routed(sandbox, 8001), timeout=30)
    assert r.status_code == 502
    body = r.json()
    assert body["error_code"] == "port_not_open"
    assert "port is not open" in body["message"]


def ws_connect(sbx, port, extra_headers=b""):
    u = urlparse(SANDBOX_URL)
    s = socket.create_connection((u.hostname, u.port), timeout=60)
    key = base64.b64encode(os.urandom(16))
    s.sendall(
        b"GET /echo HTTP/1.1\r\nHost: " + sbx.get_host(port).encode() + b"\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n" + extra_headers + b"\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, f"connection closed during the handshake: {head!r}"
        head += chunk
    return s, key, head.decode()


def ws_send(s, data, op=1):
    mask = os.urandom(4)
    n = len(data)
    hdr = bytes([0x80 | op])
    if n < 126:
        hdr += bytes([0x80 | n])
    elif n < 65536:
        hdr += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        hdr += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    s.sendall(hdr + mask + bytes(x ^ mask[i % 4] for i, x in enumerate(data)))


def ws_recv(s):
    def need(n):
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            assert chunk, "connection closed mid-frame"
            out += chunk
        return out

    b0, b1 = need(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(need(2), "big")
    elif n == 127:
        n = int.from_bytes(need(8), "big")
    return b0 & 0x0F, need(n)


def start_ws_server(sbx, port):
    sbx.files.write("/tmp/ws_echo.py", WS_SERVER)
    sbx.commands.run(f"python3 /tmp/ws_echo.py {port}", background=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        r = httpx.get(SANDBOX_URL + "/", headers=routed(sbx, port), timeout=30)
        if r.status_code != 502:
            return
        # Anything but 502 means the server answered (400 to a plain GET).
        time.sleep(0.3)


def test_websocket_echo_round_trip(sandbox):
    start_ws_server(sandbox, 8765)
    s, key, head = ws_connect(sandbox, 8765)
    try:
        assert head.startswith("HTTP/1.1 101"), head
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        ).decode()
        assert accept in head
        for msg in [b"hello websocket", os.urandom(70_000)]:
            ws_send(s, msg, op=2)
            op, got = ws_recv(s)
            assert op == 2
            assert got == msg
        ws_send(s, b"", op=8)
        op, _ = ws_recv(s)
        assert op == 8
    finally:
        s.close()


def test_traffic_token_is_required_when_public_traffic_is_off(run_id):
    sbx = Sandbox.create(
        TEMPLATE, timeout=120, metadata={"run": run_id}, network={"allow_public_traffic": False}
    )
    try:
        token = sbx.traffic_access_token
        assert token, "create returns a traffic access token"
        # envd traffic keeps its own token and needs no traffic token: the SDK works as usual.
        start_http_server(sbx, 8000)
        r = wait_until_served(sbx, 8000, {"e2b-traffic-access-token": token})
        assert r.status_code == 200, r.text

        r = httpx.get(SANDBOX_URL + "/index.html", headers=routed(sbx, 8000), timeout=30)
        assert r.status_code == 403
        assert r.json()["error_code"] == "invalid_traffic_access_token"
        r = httpx.get(
            SANDBOX_URL + "/index.html",
            headers=routed(sbx, 8000, {"e2b-traffic-access-token": "wrong"}),
            timeout=30,
        )
        assert r.status_code == 403
        r = httpx.get(
            SANDBOX_URL + "/index.html",
            headers={"Host": sbx.get_host(8000), "e2b-traffic-access-token": token},
            timeout=30,
        )
        assert r.status_code == 200
        assert r.text == "hello from the sandbox\n"

        # Connecting again hands out the same token.
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.traffic_access_token == token
    finally:
        sbx.kill()


def test_public_sandboxes_have_no_traffic_token(sandbox):
    assert sandbox.traffic_access_token is None


HOST_ECHO = r'''
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.headers.get("Host", "").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 8002), H).serve_forever()
'''


def test_mask_request_host_sets_the_host_the_server_sees(run_id):
    sbx = Sandbox.create(
        TEMPLATE,
        timeout=120,
        metadata={"run": run_id},
        network={"mask_request_host": "${PORT}-myapp.example.com"},
    )
    try:
        sbx.files.write("/tmp/host_echo.py", HOST_ECHO)
        sbx.commands.run("python3 /tmp/host_echo.py", background=True)
        r = wait_until_served(sbx, 8002)
        assert r.text == "8002-myapp.example.com"
        # Also by the host-name form.
        host = sbx.get_host(8002)
        assert httpx.get(SANDBOX_URL + "/", headers={"Host": host}, timeout=30).text == "8002-myapp.example.com"
    finally:
        sbx.kill()
    with pytest.raises(Exception) as e:
        Sandbox.create(TEMPLATE, timeout=60, network={"mask_request_host": "bad host\r\nX: 1"})
    assert "maskRequestHost" in str(e.value)
