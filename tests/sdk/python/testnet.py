"""The test internet's DNS zone (tests/sdk/run.sh points the server's DNS upstream at it):
a.test -> 198.51.100.2, b.test -> 198.51.100.3, other `.test` names NXDOMAIN, every other name
forwarded to the host's resolver. Used by conftest.py and tests/sdk/bench/bench.py."""

import socket
import struct
import threading

TEST_ZONE = {"a.test": "198.51.100.2", "b.test": "198.51.100.3"}
DNS_ADDR = ("198.51.100.2", 5353)


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


def serve_test_dns():
    """Answers on DNS_ADDR from a daemon thread."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(DNS_ADDR)
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
