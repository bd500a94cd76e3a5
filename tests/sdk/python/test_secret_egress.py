"""Secrets that never enter the sandbox, through the official SDK: `Secret.create`, a network rule
whose header carries `Secret.fill(name)`, and the egress proxy setting that header on requests to
that host only (TLS terminated with the sandbox's own CA, which the guest trusts from `/init`; the
real host verified against the server's trust store plus `--egress-ca`).

The test internet is conftest.py's (a.test -> 198.51.100.2, b.test -> 198.51.100.3); run.sh makes
its CA and a certificate for both names, and points the server's `--egress-ca` at that CA. The
HTTPS servers here never echo what they receive: they answer `match` or `nomatch` and keep the
headers on the host, so the value can only reach the guest if something leaks it.
"""

import http.server
import os
import ssl
import subprocess
import threading
import uuid

import pytest
from e2b import ALL_TRAFFIC, Sandbox, Secret

from conftest import TEMPLATE, audit_events

PORT = 9443
SEEN = {"a.test": [], "b.test": []}
EXPECTED = {}


STARTED = set()


def https_server(ip, name, tls_dir):
    """Serves `name` on `ip`, once per process (test_cluster.py uses it too)."""
    if ip in STARTED:
        return
    STARTED.add(ip)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            auth = self.headers.get("Authorization", "")
            SEEN[name].append(auth)
            body = b"match" if auth == EXPECTED.get("auth") else b"nomatch"
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((ip, PORT), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{tls_dir}/server.pem", f"{tls_dir}/server.key")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()


@pytest.fixture(scope="module", autouse=True)
def internet():
    tls = os.environ.get("ALCOVE_SDK_TEST_TLS")
    if os.environ.get("ALCOVE_DNS_UPSTREAM") != "198.51.100.2:5353" or not tls:
        pytest.skip("the test internet and its CA are set up by tests/sdk/run.sh")
    https_server("198.51.100.2", "a.test", tls)
    https_server("198.51.100.3", "b.test", tls)
    return tls


@pytest.fixture
def secret():
    name = f"egress-{uuid.uuid4().hex[:12]}"
    value = f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    Secret.create(name, value)
    EXPECTED["auth"] = f"Bearer {value}"
    try:
        yield name, value
    finally:
        Secret.destroy(name)


def rule_for(host, name):
    return {host: [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(name)}"}}}]}


def read_or_empty(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def files_holding(value, paths):
    """The files under `paths` whose bytes contain `value` (grep over memory images too)."""
    out = subprocess.run(["grep", "-rlaF", value, *paths], capture_output=True, text=True)
    return [l for l in out.stdout.splitlines() if l]


def test_a_rule_sets_the_secret_for_its_host_only_and_the_value_stays_on_the_host(internet, secret):
    name, value = secret
    sbx = Sandbox.create(
        TEMPLATE,
        timeout=300,
        network={
            "allow_out": ["a.test", "b.test"],
            "deny_out": [ALL_TRAFFIC],
            "rules": rule_for("a.test", name),
        },
    )
    try:
        info = sbx.get_info()
        # The rule is reported with its placeholder, never the value.
        assert value not in repr(info)

        url = f"https://a.test:{PORT}/check"
        # curl (OpenSSL, the system bundle), Python's urllib and Node's fetch (NODE_EXTRA_CA_CERTS)
        # all trust the sandbox's CA and get the header set on the way out.
        assert sbx.commands.run(f"curl -sS {url}", timeout=60).stdout == "match"
        py = f"import urllib.request; print(urllib.request.urlopen('{url}').read().decode())"
        assert sbx.commands.run(f'python3 -c "{py}"', timeout=60).stdout.strip() == "match"
        js = f"fetch('{url}').then(r => r.text()).then(t => console.log(t))"
        assert sbx.commands.run(f'node -e "{js}"', timeout=60).stdout.strip() == "match"
        env = sbx.commands.run("env", timeout=30).stdout
        assert "REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt" in env
        assert "NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/alcove-egress.crt" in env

        # Another host: its TLS goes through untouched (the guest checks b.test's own certificate
        # with the test CA) and a placeholder sent there arrives as written, never substituted.
        with open(f"{internet}/ca.pem") as f:
            sbx.files.write("/tmp/test-ca.pem", f.read())
        # (A command naming a placeholder is refused by the API: the headers come from a file.)
        placeholder = Secret.fill(name)
        sbx.files.write("/tmp/auth.h", f"Authorization: Bearer {placeholder}\n")
        sbx.files.write("/tmp/key.h", f"X-Key: {placeholder}\n")
        out = sbx.commands.run(
            f"curl -sS --cacert /tmp/test-ca.pem -H @/tmp/auth.h https://b.test:{PORT}/check",
            timeout=60,
        )
        assert out.stdout == "nomatch"
        assert SEEN["b.test"][-1] == f"Bearer {placeholder}"

        # A placeholder the sandbox sends to the rule's host itself is refused and recorded.
        out = sbx.commands.run(f"curl -sS -w ' %{{http_code}}' -H @/tmp/key.h {url}", timeout=60)
        assert out.stdout.startswith("alcove egress: the request carries"), out.stdout
        assert out.stdout.endswith(" 403"), out.stdout
        ev = audit_events(
            sbx.sandbox_id,
            lambda ev: any("request refused" in str(e) for e in ev if e["kind"] == "egress"),
        )
        assert value not in repr(ev)

        # Paused: the memory image, the disk, the records, the database and the server's log hold
        # placeholders at most, never the value.
        sbx.pause()
        data = os.environ["ALCOVE_SDK_DATA_DIR"]
        root = os.path.join(data, "sandboxes")
        # (A sandbox claimed from the warm pool keeps its VM's directory name.)
        sdir = next(d for d in (os.path.join(root, x) for x in os.listdir(root))
                    if sbx.sandbox_id in read_or_empty(os.path.join(d, "record.json")))
        assert "paused.state" in os.listdir(sdir), os.listdir(sdir)
        places = [sdir, os.path.join(os.path.dirname(data), "server.log")]
        places += [os.path.join(data, f) for f in os.listdir(data) if f.startswith("alcove.db")]
        assert files_holding(value, places) == []
        assert files_holding(placeholder, [sdir]), "the guest saw the placeholder it sent"

        # Resumed, it keeps its CA and its rule.
        sbx.connect()
        assert sbx.commands.run(f"curl -sS {url}", timeout=60).stdout == "match"

        # A live update without rules ends the interception (the guest now sees a.test's own
        # certificate, and no header is set); one with rules brings it back.
        sbx.update_network({"allow_out": ["a.test"], "deny_out": [ALL_TRAFFIC]})
        out = sbx.commands.run(f"curl -sS --cacert /tmp/test-ca.pem {url}", timeout=60)
        assert out.stdout == "nomatch"
        assert SEEN["a.test"][-1] == ""
        sbx.update_network(
            {"allow_out": ["a.test"], "deny_out": [ALL_TRAFFIC], "rules": rule_for("a.test", name)}
        )
        assert sbx.commands.run(f"curl -sS {url}", timeout=60).stdout == "match"
    finally:
        sbx.kill()


def test_placeholders_in_envs_and_unknown_secrets_are_refused_at_create(secret):
    name, _ = secret
    with pytest.raises(Exception) as e:
        Sandbox.create(TEMPLATE, timeout=60, envs={"OPENAI_API_KEY": Secret.fill(name)})
    assert "envVars" in str(e.value) and "network.rules" in str(e.value), str(e.value)
    with pytest.raises(Exception) as e:
        Sandbox.create(
            TEMPLATE,
            timeout=60,
            network={"allow_out": ["a.test"], "rules": rule_for("a.test", "no-such-secret")},
        )
    assert "no-such-secret" in str(e.value) and "Secret.create" in str(e.value), str(e.value)


def test_a_command_or_command_env_with_a_placeholder_is_refused(sandbox, secret):
    name, _ = secret
    with pytest.raises(Exception) as e:
        sandbox.commands.run(f"echo {Secret.fill(name)}", timeout=30)
    assert "placeholder" in str(e.value) and "network.rules" in str(e.value), str(e.value)
    with pytest.raises(Exception) as e:
        sandbox.commands.run("true", envs={"KEY": Secret.fill(name)}, timeout=30)
    assert '"KEY"' in str(e.value), str(e.value)
    # The sandbox keeps working.
    assert sandbox.commands.run("echo ok", timeout=30).stdout == "ok\n"
