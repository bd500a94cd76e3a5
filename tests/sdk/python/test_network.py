"""Sandbox networks through the official SDK: egress rules at create and live, DNS, the operator's
reserved ranges.

The "internet" is this test's own: a DNS zone on 198.51.100.2:5353 (conftest.py; the server's upstream, set by
run.sh) answering a.test -> 198.51.100.2 and b.test -> 198.51.100.3, and HTTP servers on those
addresses; 198.51.100.1 stands for a service of the host that no sandbox may reach. run.sh puts
the addresses on a veth and tells the server to trust 198.51.100.2/31 only.
"""

import http.server
import os
import socket
import subprocess
import threading
from urllib.parse import urlparse

import pytest
from e2b import ALL_TRAFFIC, Sandbox

from conftest import TEMPLATE, audit_events

def http_server(ip, tag):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello {tag}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((ip, 8080), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def tls_sink(ip):
    """Answers whatever first bytes arrive (a ClientHello) with `tls-seen`."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, 8443))
    s.listen(16)

    def serve():
        while True:
            c, _ = s.accept()
            try:
                c.settimeout(5)
                if c.recv(4096):
                    c.sendall(b"tls-seen")
            except OSError:
                pass
            finally:
                c.close()

    threading.Thread(target=serve, daemon=True).start()


@pytest.fixture(scope="module", autouse=True)
def internet():
    if os.environ.get("ALCOVE_DNS_UPSTREAM") != "198.51.100.2:5353":
        pytest.skip("the test internet is set up by tests/sdk/run.sh")
    # Its DNS zone is conftest.py's `test_internet_dns` (session-wide).
    for ip, tag in [("198.51.100.1", "host"), ("198.51.100.2", "a"), ("198.51.100.3", "b")]:
        http_server(ip, tag)
    tls_sink("198.51.100.2")


# Runs in the guest: one line per check.
GUEST = r'''
import socket, ssl, sys
def get(ip, port, host, tls):
    try:
        s = socket.create_connection((ip, port), timeout=8)
        if tls:
            o = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=host)
            try:
                o.do_handshake()
            except ssl.SSLWantReadError:
                pass
            s.sendall(out.read())
        else:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.decode(errors="replace").split("\r\n\r\n")[-1] or "EMPTY"
    except OSError:
        return "REFUSED"
for arg in sys.argv[1:]:
    kind, rest = arg.split(":", 1)
    if kind == "dns":
        try:
            print(socket.gethostbyname(rest))
        except OSError:
            print("ERR")
    else:
        ip, port, host = rest.split(",")
        print(get(ip, int(port), host, kind == "tls"))
'''


def check(sbx, *checks):
    sbx.files.write("/tmp/netcheck.py", GUEST)
    r = sbx.commands.run("python3 /tmp/netcheck.py " + " ".join(checks), timeout=120)
    return r.stdout.split()


def host_address():
    """A non-loopback address of this host (where a server listening on 0.0.0.0 would be)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next(a for a in out if ":" not in a and not a.startswith("198.51.100."))


def test_default_network_reaches_the_internet_but_never_the_host():
    api_port = urlparse(os.environ["E2B_API_URL"]).port
    sbx = Sandbox.create(TEMPLATE, timeout=180)
    try:
        out = check(
            sbx,
            "dns:a.test",
            "dns:nope.test",
            "http:a.test,8080,a.test",
            "http:198.51.100.3,8080,b.test",
            # a host service, the host's own address (the control plane), cloud metadata
            "http:198.51.100.1,8080,host",
            f"http:{host_address()},{api_port},control",
            "http:169.254.169.254,80,metadata",
        )
        assert out == ["198.51.100.2", "ERR", "hello", "a", "hello", "b", "REFUSED", "REFUSED", "REFUSED"]
    finally:
        sbx.kill()


def test_internet_off_means_no_packet_leaves_dns_included():
    sbx = Sandbox.create(TEMPLATE, timeout=180, allow_internet_access=False)
    try:
        assert check(sbx, "dns:a.test", "http:198.51.100.2,8080,a.test") == ["ERR", "REFUSED"]
        # The switch, live, both ways, as the SDK sends it (`allow_internet_access`).
        sbx.update_network({"allow_internet_access": True})
        assert check(sbx, "dns:a.test", "http:198.51.100.2,8080,a.test") == ["198.51.100.2", "hello", "a"]
        sbx.update_network({"allow_internet_access": False})
        assert check(sbx, "dns:a.test", "http:198.51.100.2,8080,a.test") == ["ERR", "REFUSED"]
        assert "0.0.0.0/0" in sbx.get_info().network["deny_out"]
    finally:
        sbx.kill()


def test_unsupported_network_fields_are_named_in_the_refusal():
    from e2b.exceptions import InvalidArgumentException, SandboxException

    with pytest.raises((InvalidArgumentException, SandboxException)) as e:
        Sandbox.create(TEMPLATE, timeout=60, network={"https_ports": [3000]})
    assert "network.httpsPorts" in str(e.value) and "plain HTTP" in str(e.value)
    with pytest.raises((InvalidArgumentException, SandboxException)) as e:
        Sandbox.create(TEMPLATE, timeout=60, network={"egress_proxy": {"address": "proxy.test:1080"}})
    assert "network.egressProxy" in str(e.value)


def test_domain_allow_list_binds_names_to_answers_and_updates_live():
    sbx = Sandbox.create(
        TEMPLATE, timeout=180, network={"allow_out": ["a.test"], "deny_out": [ALL_TRAFFIC]}
    )
    try:
        out = check(
            sbx,
            "dns:a.test",
            "dns:b.test",
            "http:a.test,8080,a.test",
            "tls:198.51.100.2,8443,a.test",
            # the allowed name's address under another name, by Host and by SNI
            "http:198.51.100.2,8080,b.test",
            "tls:198.51.100.2,8443,b.test",
            # an address outside the list
            "http:198.51.100.3,8080,b.test",
        )
        assert out == ["198.51.100.2", "ERR", "hello", "a", "tls-seen", "REFUSED", "REFUSED", "REFUSED"]
        # The run trace has each connection: where it went, the name sent, the verdict, bytes.
        ev = audit_events(sbx.sandbox_id, lambda ev: sum(e["kind"] == "egress" for e in ev) >= 5)
        egress = [e for e in ev if e["kind"] == "egress"]
        ok = next(e for e in egress if e["target"] == "a.test:8080" and e["result"] == "allowed")
        assert ok["detail"]["address"] == "198.51.100.2:8080"
        assert ok["detail"]["bytesOut"] > 0 and ok["detail"]["bytesIn"] > 0
        refused = [e for e in egress if e["result"] == "denied"]
        assert any(e["target"] == "b.test:8080" and e["detail"]["address"] == "198.51.100.2:8080"
                   and "not allowed" in e["detail"]["rule"] for e in refused), refused
        assert any(e["detail"]["address"] == "198.51.100.3:8080" for e in refused), refused

        # a live update replaces the rules whole
        sbx.update_network({"deny_out": ["198.51.100.2"]})
        # get_info shows the rules as they are now.
        info = sbx.get_info().network
        assert info["deny_out"] == ["198.51.100.2"] and info["allow_out"] == []
        assert info["allow_public_traffic"] is True
        assert check(sbx, "http:198.51.100.2,8080,a.test", "http:198.51.100.3,8080,b.test") == [
            "REFUSED",
            "hello",
            "b",
        ]
    finally:
        sbx.kill()


def test_bad_rules_are_refused_with_what_to_write():
    from e2b.exceptions import InvalidArgumentException, SandboxException

    with pytest.raises((InvalidArgumentException, SandboxException)) as e:
        Sandbox.create(TEMPLATE, timeout=60, network={"deny_out": ["example.com"]})
    assert "denyOut" in str(e.value)
