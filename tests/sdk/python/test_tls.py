"""TLS with the official SDK configured only by E2B_DOMAIN, as against E2B itself.

This module starts a server of its own with `--tls-cert/--tls-key` from `alcove tls init` and
`--domain alcove.localhost:PORT` (the port rides in the domain, so the SDK's https://api.<domain>
and https://<port>-<id>.<domain> reach this listener without binding 443). `*.localhost`
resolves to loopback in the SDK's resolver (RFC 6761); the CA is trusted through SSL_CERT_FILE.
The SDK runs in a child process whose environment has no E2B_API_URL or E2B_SANDBOX_URL, so
every link is the SDK's own: commands, files, a signed download and upload URL, a sandbox port
through get_host, and the volume content API. Needs ALCOVE_BIN (tests/sdk/run.sh sets it).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import pytest

from conftest import TEMPLATE

SDK_SCRIPT = textwrap.dedent(
    r"""
    import json, os, socket, ssl, sys, time, urllib.request, uuid
    from e2b import Sandbox, Volume

    port = int(os.environ["TLS_PORT"])
    ca = os.environ["SSL_CERT_FILE"]
    # urllib resolves with the C library, which may not know *.localhost: the test resolves
    # them itself (the SDK's own client needs no help).
    real = socket.getaddrinfo
    def getaddrinfo(host, *a, **kw):
        if isinstance(host, str) and host.endswith(".localhost"):
            host = "127.0.0.1"
        return real(host, *a, **kw)
    socket.getaddrinfo = getaddrinfo
    ctx = ssl.create_default_context(cafile=ca)

    out = {}
    sbx = Sandbox.create(os.environ["TLS_TEMPLATE"], timeout=300)
    try:
        out["host"] = sbx.get_host(8000)
        out["echo"] = sbx.commands.run("echo over-tls").stdout
        sbx.files.write("/home/user/a.txt", "written over https")
        out["read"] = sbx.files.read("/home/user/a.txt")
        url = sbx.download_url("/home/user/a.txt")
        out["download_url"] = url
        with urllib.request.urlopen(url, context=ctx, timeout=60) as r:
            out["downloaded"] = r.read().decode()
        up = sbx.upload_url("/home/user/up.txt")
        boundary = uuid.uuid4().hex
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"up.txt\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\nuploaded by url\r\n--{boundary}--\r\n"
        ).encode()
        req = urllib.request.Request(up, data=body, method="POST",
            headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, context=ctx, timeout=60) as r:
            out["upload_status"] = r.status
        out["uploaded"] = sbx.files.read("/home/user/up.txt")
        # A server in the sandbox, through the port proxy under the wildcard certificate.
        sbx.commands.run("cd /tmp && echo port-8000 > index.html && python3 -m http.server 8000",
                         background=True)
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"https://{out['host']}/index.html", context=ctx, timeout=10) as r:
                    out["port_page"] = r.read().decode()
                    break
            except Exception as e:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        sbx.kill()
    vol = Volume.create(f"tls-{uuid.uuid4().hex[:8]}")
    try:
        vol.write_file("/v.txt", "volume over https")
        out["volume"] = vol.read_file("/v.txt")
    finally:
        Volume.destroy(vol.volume_id)
    print(json.dumps(out))
    """
)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def tls_server():
    binary = os.environ.get("ALCOVE_BIN")
    if not binary:
        pytest.skip("needs ALCOVE_BIN (tests/sdk/run.sh)")
    root = tempfile.mkdtemp(prefix="alcove-tls-")
    port = _free_port()
    domain = f"alcove.localhost:{port}"
    made = json.loads(
        subprocess.run(
            [binary, "tls", "--json", "init", "--domain", domain, "--dir", os.path.join(root, "tls")],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout
    )
    assert made["names"] == ["alcove.localhost", "*.alcove.localhost"], made
    data = os.path.join(root, "state")
    log = open(os.path.join(root, "server.log"), "ab")
    proc = subprocess.Popen(
        [binary, "server", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
         "--warm-pool", "base=0", "--domain", domain,
         "--tls-cert", made["cert"], "--tls-key", made["key"]],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"the TLS server exited at start; see {log.name}"
            try:
                # Plain HTTP from loopback is still served (the server's own MCP tools use it).
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200 and os.path.exists(os.path.join(data, "api-key")):
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the TLS server did not answer within 60 s"
            time.sleep(0.2)
        with open(os.path.join(data, "api-key")) as f:
            key = f.read().strip()
        yield {"port": port, "domain": domain, "key": key, "ca": made["ca"], "log": log.name}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_sdk_works_over_https_with_only_e2b_domain(tls_server):
    env = {k: v for k, v in os.environ.items()
           if k not in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_VOLUME_API_URL", "E2B_DEBUG")}
    env.update({
        "E2B_DOMAIN": tls_server["domain"],
        "E2B_API_KEY": tls_server["key"],
        "SSL_CERT_FILE": tls_server["ca"],
        "TLS_PORT": str(tls_server["port"]),
        "TLS_TEMPLATE": TEMPLATE,
    })
    run = subprocess.run([sys.executable, "-c", SDK_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{run.stderr[-4000:]}\n(server log: {tls_server['log']})"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    port = tls_server["port"]
    assert out["host"].startswith("8000-") and out["host"].endswith(f".alcove.localhost:{port}")
    assert out["echo"] == "over-tls\n"
    assert out["read"] == "written over https"
    # The signed URL names the sandbox in its host, over https.
    assert out["download_url"].startswith("https://49983-"), out["download_url"]
    assert out["downloaded"] == "written over https"
    assert out["upload_status"] == 200 and out["uploaded"] == "uploaded by url"
    assert out["port_page"] == "port-8000\n"
    assert out["volume"] == "volume over https"


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server):
    import ssl

    port = tls_server["port"]
    ctx = ssl.create_default_context()  # the system's roots only
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="api.alcove.localhost")
    # The server serves on.
    trusted = ssl.create_default_context(cafile=tls_server["ca"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with trusted.wrap_socket(raw, server_hostname="api.alcove.localhost") as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: api.alcove.localhost\r\nConnection: close\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 200")
