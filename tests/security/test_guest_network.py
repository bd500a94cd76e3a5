"""From inside a guest, as root: nothing of the host, the control plane, cloud metadata, other
sandboxes or private addresses behind a public name is reachable; with internet access off, no
DNS, IPv4, IPv6 or ICMP gets out.

The host side is this test's own: HTTP servers answering `hello <tag>` on every address of the
host (0.0.0.0), on its loopback only, on 198.51.100.1 (a "host service") and on two public
addresses clouds use for metadata (168.63.129.16, 100.100.100.200, put on run.sh's test veth for
the module's duration, so a missing block shows as an answer rather than a timeout), and a DNS
zone on 198.51.100.2:5353 (the server's upstream, set by run.sh) whose names point at them.
A probe passes when our server's `hello` never comes back.
"""

import http.server
import json
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from urllib.parse import urlparse

import httpx
import pytest
from e2b import Sandbox

from conftest import TEMPLATE, sandbox_call

CLOUD_ADDRS = ["168.63.129.16", "100.100.100.200"]
QUERIES = []  # every name the upstream DNS server was asked


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


HOST_ANY = free_port()  # listened on 0.0.0.0
HOST_LO = free_port()  # listened on 127.0.0.1 only


def zone():
    return {
        "a.test": "198.51.100.2",  # the test internet (trusted): the control
        "rebind.test": "127.0.0.1",
        "hostsvc.test": "198.51.100.1",
        "meta.test": "169.254.169.254",
        "azure.test": "168.63.129.16",
        "lan.test": "10.0.2.1",
        "private.test": "192.168.1.1",
    }


def dns_server():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("198.51.100.2", 5353))
    z = zone()

    def serve():
        while True:
            q, addr = s.recvfrom(1500)
            try:
                qid = struct.unpack(">H", q[:2])[0]
                i, labels = 12, []
                while q[i]:
                    labels.append(q[i + 1 : i + 1 + q[i]].decode())
                    i += 1 + q[i]
                qtype = struct.unpack(">H", q[i + 1 : i + 3])[0]
                name = ".".join(labels).lower()
                QUERIES.append(name)
                ip = z.get(name)
                answers = b""
                if ip and qtype == 1:
                    answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
                head = struct.pack(">HHHHHH", qid, 0x8180 | (0 if ip else 3), 1, 1 if answers else 0, 0, 0)
                s.sendto(head + q[12 : i + 5] + answers, addr)
            except (IndexError, struct.error, UnicodeDecodeError):
                pass

    threading.Thread(target=serve, daemon=True).start()


def http_server(ip, port, tag):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello {tag}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    class S(http.server.ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

    srv = S((ip, port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module", autouse=True)
def internet():
    if os.environ.get("ALCOVE_DNS_UPSTREAM") != "198.51.100.2:5353":
        pytest.skip("the test internet is set up by tests/sdk/run.sh")
    added = []
    have = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "alcove-inet"],
                          capture_output=True, text=True).stdout
    for a in CLOUD_ADDRS:
        if f"inet {a}/" not in have:
            subprocess.run(["ip", "addr", "add", f"{a}/32", "dev", "alcove-inet"], check=True)
            added.append(a)
    servers = [http_server("0.0.0.0", HOST_ANY, "host-any"), http_server("127.0.0.1", HOST_LO, "host-lo"),
               http_server("198.51.100.1", 8080, "host-svc"), http_server("198.51.100.2", 8080, "a")]
    servers += [http_server(a, 80, "cloud") for a in CLOUD_ADDRS]
    dns_server()
    try:
        yield
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for a in added:
            subprocess.run(["ip", "addr", "del", f"{a}/32", "dev", "alcove-inet"], check=False)


# Runs in the guest (as root): argv[1] is a JSON list of probes, prints a JSON list of results.
PROBE = r'''
import json, os, socket, struct, sys, time
def http(host, port, headers):
    try:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        ip = socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return "NXDOMAIN"
    try:
        s = socket.create_connection((ip, port), timeout=6)
        s.settimeout(6)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.decode(errors="replace").split("\r\n\r\n")[-1] or "EMPTY"
    except OSError as e:
        return "REFUSED"
def dns(name):
    try:
        return socket.gethostbyname(name)
    except OSError:
        return "ERR"
def udp_dns(server, port, name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(q, (server, port))
        a = s.recv(1500)
        return "ANSWER" if struct.unpack(">H", a[6:8])[0] > 0 else "NOANSWER"
    except OSError:
        return "TIMEOUT"
def icmp(ip):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as e:
        return "NOSOCKET"
    s.settimeout(3)
    body = struct.pack(">BBHHH", 8, 0, 0, 0x4242, 1) + b"alcove"
    c = sum(struct.unpack("!%dH" % (len(body) // 2), body))
    c = (c >> 16) + (c & 0xFFFF); c = ~(c + (c >> 16)) & 0xFFFF
    body = body[:2] + struct.pack(">H", c) + body[4:]
    s.sendto(body, (ip, 0))
    end = time.time() + 3
    while time.time() < end:
        try:
            pkt, addr = s.recvfrom(1500)
        except OSError:
            break
        if addr[0] == ip and pkt[20] == 0:
            return "PONG"
    return "NOREPLY"
out = []
for p in json.loads(sys.argv[1]):
    k = p[0]
    if k == "http": out.append(http(p[1], p[2], p[3] if len(p) > 3 else {}))
    elif k == "dns": out.append(dns(p[1]))
    elif k == "udp": out.append(udp_dns(p[1], p[2], p[3]))
    elif k == "icmp": out.append(icmp(p[1]))
print(json.dumps(out))
'''


def probe(sbx, probes):
    sbx.files.write("/tmp/probe.py", PROBE)
    arg = json.dumps(probes).replace("'", "'\\''")
    r = sbx.commands.run(f"python3 /tmp/probe.py '{arg}'", user="root", timeout=300)
    return dict(zip([json.dumps(p) for p in probes], json.loads(r.stdout)))


def host_addresses():
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    addrs = []
    for line in out.splitlines():
        f = line.split()
        if f[2] not in ("inet", "inet6"):
            continue
        a = f[3].split("/")[0]
        if a.startswith("198.51.100.") or a in CLOUD_ADDRS or a.startswith("fe80") or "scope host" in line:
            continue
        addrs.append(a)
    return addrs


def test_nothing_of_the_host_or_the_cloud_is_reachable_from_a_guest(api_url):
    api_port = urlparse(api_url).port
    sbx = Sandbox.create(TEMPLATE, timeout=300, metadata={"suite": "security"})
    other = Sandbox.create(TEMPLATE, timeout=300, metadata={"suite": "security"})
    try:
        other.commands.run("python3 -m http.server 8000 --directory /etc", background=True)
        probes = [["http", a, p] for a in host_addresses() for p in (HOST_ANY, HOST_LO, api_port)]
        probes += [["http", "10.0.2.1", p] for p in (HOST_ANY, HOST_LO, api_port, 22, 53, 15001)]
        probes += [["http", "127.0.0.1", p] for p in (HOST_LO, api_port)]
        probes += [["http", "198.51.100.1", 8080]]
        probes += [["http", a, 80] for a in ["169.254.169.254", "169.254.170.2", *CLOUD_ADDRS]]
        probes += [["http", "fd00:ec2::254", 80]]
        # The proxy on the API port, asked for another sandbox, from a host address or the gateway.
        probes += [["http", a, api_port, {"E2b-Sandbox-Id": other.sandbox_id, "E2b-Sandbox-Port": "8000"}]
                   for a in host_addresses()[:2] + ["10.0.2.1"]]
        # Names that resolve to private, loopback, metadata and host-service addresses.
        probes += [["http", "rebind.test", HOST_LO], ["http", "hostsvc.test", 8080],
                   ["http", "meta.test", 80], ["http", "azure.test", 80], ["http", "lan.test", HOST_ANY],
                   ["http", "private.test", 80]]
        control = ["http", "a.test", 8080]
        res = probe(sbx, [control] + probes)
        assert res[json.dumps(control)] == "hello a", "the test internet must work for the probes to mean anything"
        leaks = {p: r for p, r in res.items() if p != json.dumps(control) and "hello" in r}
        assert not leaks, f"reached from inside the guest: {leaks}"
        # The other sandbox's server is up (so a blocked probe is a real refusal).
        deadline = time.time() + 60
        while (r := sandbox_call(api_url, other.sandbox_id, "GET", "/hostname", port=8000)).status_code != 200:
            assert time.time() < deadline, r.text
            time.sleep(0.5)
        # Even when DNS answers a private address, nothing connects to it.
        assert res[json.dumps(["http", "hostsvc.test", 8080])] != "hello host-svc"
    finally:
        sbx.kill()
        other.kill()


def test_internet_off_lets_no_dns_ipv4_ipv6_or_icmp_out():
    sbx = Sandbox.create(TEMPLATE, timeout=180, allow_internet_access=False, metadata={"suite": "security"})
    try:
        name = f"off-{uuid.uuid4().hex[:8]}.test"
        res = probe(sbx, [
            ["dns", "a.test"],
            ["dns", name],
            ["udp", "10.0.2.1", 53, name],
            ["udp", "198.51.100.2", 5353, "a.test"],  # straight to the upstream, bypassing the resolver
            ["udp", "198.51.100.2", 53, "a.test"],
            ["http", "198.51.100.2", 8080],
            ["http", "a.test", 8080],
            ["http", "2001:db8::2", 8080],
            ["http", "::ffff:198.51.100.2", 8080],
            ["icmp", "198.51.100.2"],
            ["icmp", "10.0.2.1"],
        ])
        vals = list(res.values())
        assert vals[0] == "ERR" and vals[1] == "ERR"
        assert vals[2] != "ANSWER" and vals[3] != "ANSWER" and vals[4] != "ANSWER", res
        assert all("hello" not in v for v in vals[5:9]), res
        assert vals[9] != "PONG" and vals[10] != "PONG", res
        time.sleep(1)
        assert name not in QUERIES, "a DNS query left the host with internet access off"
    finally:
        sbx.kill()
