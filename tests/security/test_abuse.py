"""Raw HTTP abuse of the API listener: oversize bodies and headers (API and proxy), slow headers,
10,000 idle connections, malformed Connect envelopes and HTTP/2 frames. Each gets a clear error
or a closed connection, and the server keeps serving the SDK afterwards.
"""

import asyncio
import resource
import socket
import struct
import time
from urllib.parse import urlparse

import httpx
import pytest

from conftest import sandbox_call, server_serves


def addr(api_url):
    u = urlparse(api_url)
    return u.hostname, u.port


def closed_or_answered(sock, deadline):
    """Reads until the server answers or closes; returns the bytes (b"" = closed silently)."""
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                break
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"neither an answer nor a close: {data[:200]!r}") from None
    return data


def test_oversize_api_body_is_refused_with_a_clear_error(api_url, owner):
    big = b'{"templateID": "base", "metadata": {"x": "' + b"a" * (8 << 20) + b'"}}'
    r = owner.post("/sandboxes", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.status_code
    assert r.json()["code"]
    # A body that claims to be huge but never comes is refused up front, not waited for.
    h, p = addr(api_url)
    with socket.create_connection((h, p), timeout=30) as s:
        s.sendall(b"POST /sandboxes HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + owner.headers["X-API-KEY"].encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{")
        data = closed_or_answered(s, time.monotonic() + 15)
        assert data == b"" or data.split(b" ")[1] in (b"413", b"400"), data[:200]
    server_serves(api_url)


def test_oversize_headers_are_refused(api_url):
    h, p = addr(api_url)
    with socket.create_connection((h, p), timeout=30) as s:
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * (4 << 20) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: a fine answer
        data = closed_or_answered(s, time.monotonic() + 30)
        assert data == b"" or data.split(b" ")[1] in (b"431", b"400", b"413"), data[:200]
    # And through the proxy: many headers to a sandbox port.
    r = httpx.get(api_url + "/health", headers={f"x-h{i}": "v" * 1000 for i in range(400)}
                  | {"E2b-Sandbox-Id": "nosuchsandbox"}, timeout=30)
    assert r.status_code >= 400
    server_serves(api_url)


def test_oversize_and_malformed_connect_bodies_through_the_proxy(api_url, sandbox):
    tok = sandbox._envd_access_token
    rpc = "/process.Process/Start"
    cases = {
        # An envelope that announces 4 GiB and sends 5 bytes.
        "huge length": b"\x00\xff\xff\xff\xff" + b"hello",
        # A 12 MiB message (above the agent's message limit).
        "oversize": b"\x00" + struct.pack(">I", 12 << 20) + b"\x00" * (12 << 20),
        "truncated header": b"\x00\x00",
        "unknown flags": b"\x7f\x00\x00\x00\x02{}",
        "not protobuf": b"\x00\x00\x00\x00\x10" + b"\xff" * 16,
        "end-stream from client": b"\x02\x00\x00\x00\x02{}",
    }
    for name, body in cases.items():
        for ctype in ("application/connect+proto", "application/connect+json"):
            r = sandbox_call(api_url, sandbox.sandbox_id, "POST", rpc, token=tok, content=body,
                             headers={"content-type": ctype, "connect-protocol-version": "1"})
            # Connect streams answer 200 with the error in the end-of-stream envelope.
            failed = r.status_code >= 400 or b'"error"' in r.content
            assert failed, (name, ctype, r.status_code, r.content[:300])
            assert b'"pid"' not in r.content
    # An oversize unary body too.
    r = sandbox_call(api_url, sandbox.sandbox_id, "POST", "/filesystem.Filesystem/Stat", token=tok,
                     content=b"{" + b" " * (12 << 20) + b"}",
                     headers={"content-type": "application/json", "connect-protocol-version": "1"})
    assert r.status_code >= 400, r.status_code
    assert sandbox.commands.run("echo still", timeout=60).stdout.strip() == "still"
    server_serves(api_url)


def test_malformed_http2_is_closed(api_url):
    h, p = addr(api_url)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    garbage = [
        b"\xff" * 64,  # not a frame
        settings + b"\x00\x00\x05\x01\x05\x00\x00\x00\x01" + b"\xff\xff\xff\xff\xff",  # bad HPACK
        settings + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",  # 16 MiB DATA frame on stream 1
        settings + b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"\x00" * 8,  # GOAWAY on a stream
    ]
    for g in garbage:
        with socket.create_connection((h, p), timeout=30) as s:
            s.sendall(preface + g)
            s.settimeout(30)
            t = time.monotonic()
            closed = False
            try:
                while time.monotonic() - t < 30:
                    if not s.recv(65536):
                        closed = True
                        break
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                closed = False
            assert closed, f"the server kept a connection that sent {g[:16]!r} open"
    # And plain garbage, not even HTTP: a broken TLS handshake. A server that serves TLS answers
    # it with a TLS alert record (0x15) and closes.
    with socket.create_connection((h, p), timeout=30) as s:
        s.sendall(b"\x16\x03\x01\x02\x00" + b"\x00" * 512)
        data = closed_or_answered(s, time.monotonic() + 30)
        assert data == b"" or b" 400 " in data[:20] or data[:1] == b"\x15", data[:100]
    server_serves(api_url)


def test_slow_headers_are_cut_off(api_url):
    """Slowloris: one header byte per second. The server must give up on the request (within a
    minute: it has no business waiting longer for a request's headers)."""
    h, p = addr(api_url)
    socks = []
    for _ in range(8):
        s = socket.create_connection((h, p), timeout=30)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    start = time.monotonic()
    open_socks = list(socks)
    while open_socks and time.monotonic() - start < 60:
        for s in list(open_socks):
            try:
                s.sendall(b"a")
                s.setblocking(False)
                try:
                    if s.recv(4096) == b"":
                        open_socks.remove(s)
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                open_socks.remove(s)
        # Meanwhile, the server answers everyone else.
        assert httpx.get(api_url + "/health", timeout=30).status_code == 200
        time.sleep(1)
    for s in socks:
        s.close()
    assert not open_socks, f"{len(open_socks)} slow-header connections still open after 60 s"
    server_serves(api_url)


def test_ten_thousand_idle_connections_do_not_starve_the_server(api_url):
    n = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 1024
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            pytest.skip(f"cannot raise this test's RLIMIT_NOFILE to {want} (hard {hard})")
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    h, p = addr(api_url)

    async def main():
        sem = asyncio.Semaphore(2000)
        conns = []

        async def one():
            async with sem:
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection(h, p), 2)
                    conns.append(w)
                except (OSError, asyncio.TimeoutError):
                    pass  # refused by a connection cap: fine

        await asyncio.gather(*(one() for _ in range(n)))
        try:
            # While they all sit there, a normal request gets through (within 30 s: the server
            # may first have to shed idle connections).
            async with httpx.AsyncClient(timeout=10) as c:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        r = await c.get(api_url + "/health")
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() < deadline, "the server did not answer with 10,000 idle connections open"
                    await asyncio.sleep(1)
        finally:
            for w in conns:
                w.close()
        return len(conns)

    asyncio.run(main())
    server_serves(api_url)
