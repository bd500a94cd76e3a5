"""Custom templates (issue 14) through the official `e2b` SDK's `Template` API, unmodified:
`Template.build` from `base` with every step kind, its sandboxes, the build log, the layer cache,
a failing step, tags, another team, bad input on the REST surface, and an OCI image from the
local test registry. Needs a real server (builds run in microVMs: each costs ~30-90 s under TCG,
so each template is built once per module and shared by the tests that read it).

Names are unique per run (`sdk-<what>-<run>`), so the suite can run twice against one server.
"""

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import tarfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from e2b import BuildException, Sandbox, Template, wait_for_port

API_URL = os.environ.get("E2B_API_URL", "").rstrip("/")
SANDBOX_URL = os.environ.get("E2B_SANDBOX_URL", "").rstrip("/")
API_KEY = os.environ.get("E2B_API_KEY", "")
RUN = uuid.uuid4().hex[:8]
REPO = Path(__file__).resolve().parents[3]

# A small pure-Python package with no dependencies, pinned, not in `base`.
PIP_PACKAGE, PIP_VERSION = "tabulate", "0.9.0"
# A small Debian package, not in `base`.
APT_PACKAGE = "tree"
GREETING = "hello from a template"
EXTRA_CA_DIR = "/usr/local/share/ca-certificates"
# Computed by the shell at build time, so only the step's output (never the echoed command
# line) contains it.
STEP_MARK = "step-output-$((6*7))"
STEP_OUT = "step-output-42"


# --- helpers -------------------------------------------------------------------------------


def build(template, name, **kw):
    """Template.build with the log collected; returns (BuildInfo, [LogEntry])."""
    logs = []
    info = Template.build(template, name, on_build_logs=logs.append, **kw)
    return info, logs


def server_logs(logs):
    """The messages the server sent: those after the SDK's own "Waiting for logs..." line (the
    SDK logs its uploads, e.g. "Skipping upload of 'x', already cached", before it)."""
    msgs = [str(e.message) for e in logs if getattr(e, "message", None) is not None]
    for i, m in enumerate(msgs):
        if m.startswith("Waiting for logs"):
            return msgs[i + 1:]
    return msgs


def ids_from_logs(logs):
    """(templateID, buildID) from the SDK's "Template created with ID: X, Build ID: Y" line."""
    for e in logs:
        m = re.search(r"Template created with ID: (\S+), Build ID: (\S+)", str(getattr(e, "message", "")))
        if m:
            return m.group(1), m.group(2)
    raise AssertionError("the SDK logged no template/build id")


def rest(key=None):
    return httpx.Client(base_url=API_URL, headers={"X-API-KEY": key or API_KEY}, timeout=60)


def run(sbx, cmd, **kw):
    r = sbx.commands.run(cmd, timeout=60, **kw)
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return r.stdout.strip()


def get_through_proxy(sbx, port, path="/", limit=60):
    """GET a sandbox port through the server's proxy (the `get_host` form); retries while the
    proxy answers 502 (nothing listening yet)."""
    deadline = time.monotonic() + limit
    while True:
        r = httpx.get(SANDBOX_URL + path, headers={"Host": sbx.get_host(port)}, timeout=30)
        if r.status_code != 502 or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def targz(files):
    """A tar.gz of {name: bytes}, as the SDK uploads a COPY source."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def new_build(c, what):
    """POST /v3/templates for a fresh name: (templateID, buildID)."""
    r = c.post("/v3/templates", json={"name": f"sdk-{what}-{RUN}"})
    assert r.status_code == 202, r.text
    body = r.json()
    return body["templateID"], body["buildID"]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def context_dir(tmp_path_factory):
    """The build context: a file and a directory with a nested file."""
    d = tmp_path_factory.mktemp("template-context")
    (d / "hello.txt").write_text("copied file\n")
    (d / "conf" / "sub").mkdir(parents=True)
    (d / "conf" / "app.ini").write_text("[app]\nname = alcove\n")
    (d / "conf" / "sub" / "deep.txt").write_text("nested\n")
    # CAs the host trusts beyond Debian's (a TLS-inspecting egress, as on our CI machines): the
    # guest's pip needs them to reach PyPI, as a user behind such a proxy would add them.
    cas = sorted(Path(EXTRA_CA_DIR).glob("*.crt")) if os.path.isdir(EXTRA_CA_DIR) else []
    if cas:
        (d / "extra-ca").mkdir()
        for ca in cas:
            (d / "extra-ca" / ca.name).write_bytes(ca.read_bytes())
    return d


def with_host_cas(t, context_dir):
    """Adds the host's extra CAs to a template (see context_dir), if it has any."""
    if (Path(context_dir) / "extra-ca").is_dir():
        t = (t.copy("extra-ca", "/usr/local/share/ca-certificates/alcove-test", user="root")
             .run_cmd("update-ca-certificates", user="root"))
    return t


def full_template(context_dir):
    """Every step kind the issue lists, each with an effect a sandbox can see."""
    return (
        with_host_cas(Template(file_context_path=str(context_dir)).from_template("base"), context_dir)
        .copy("hello.txt", "/home/user/greeting.txt", user="user", mode=0o640)
        .copy("conf", "/opt/conf")
        .pip_install(f"{PIP_PACKAGE}=={PIP_VERSION}")
        .apt_install(APT_PACKAGE)
        .run_cmd("id -un > /home/user/ran-as-user.txt", user="user")
        .run_cmd("id -un > /etc/ran-as-root.txt && useradd -m -s /bin/bash app"
                 " && install -d -o app -g app /srv/app", user="root")
        .set_envs({"ALCOVE_TPL_GREETING": GREETING})
        .set_workdir("/srv/app")
        .set_user("app")
        # No user given: runs as the USER so far, in the WORKDIR so far, with the ENV so far.
        .run_cmd(f'echo {STEP_MARK}; id -un > state.txt; pwd >> state.txt; echo "$ALCOVE_TPL_GREETING" >> state.txt')
        .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    )


@pytest.fixture(scope="module")
def full(context_dir):
    """The full template, built once: {name, info, logs, template}."""
    name = f"sdk-full-{RUN}"
    t = full_template(context_dir)
    info, logs = build(t, name)
    return {"name": name, "info": info, "logs": logs, "template": t}


@pytest.fixture(scope="module")
def full_sandbox(full):
    sbx = Sandbox.create(full["name"], timeout=300, metadata={"suite": "templates"})
    try:
        yield sbx
    finally:
        sbx.kill()


def small_template(context_dir, *extra):
    t = (
        Template(file_context_path=str(context_dir))
        .from_template("base")
        .copy("hello.txt", "/home/user/small.txt")
        .run_cmd("echo small-$((20+1)) | tee /home/user/small-run.txt")
    )
    for cmd in extra:
        t = t.run_cmd(cmd)
    return t


@pytest.fixture(scope="module")
def small(context_dir):
    """A two-step template built with tag v1: {name, info, logs}."""
    name = f"sdk-small-{RUN}"
    info, logs = build(small_template(context_dir), name, tags=["v1"])
    return {"name": name, "info": info, "logs": logs}


@pytest.fixture(scope="module")
def other_team_key():
    """An API key of a second team, made as an operator would (`alcove keys create`)."""
    data_dir = os.environ.get("ALCOVE_SDK_DATA_DIR")
    if not data_dir:
        pytest.skip("needs the server's data directory (ALCOVE_SDK_DATA_DIR, set by tests/sdk/run.sh)")
    out = subprocess.run(
        [os.environ.get("ALCOVE_BIN", "alcove"), "keys", "--data-dir", data_dir, "--json", "create",
         "--team", f"tpl-other-{RUN}", "--name", "templates-test"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    return json.loads(out)["key"]


# --- the full template ---------------------------------------------------------------------


def test_build_streams_each_steps_output(full):
    msgs = server_logs(full["logs"])
    assert msgs, "the server sent no build log"
    text = "\n".join(msgs)
    # RUN output (computed by the shell, so not an echo of the command line).
    assert STEP_OUT in text, text[-3000:]
    # pip's and apt's own output.
    assert PIP_PACKAGE in text and APT_PACKAGE in text, text[-3000:]
    assert full["info"].template_id and full["info"].build_id
    assert full["name"] in (full["info"].name, full["info"].alias)


def test_sandbox_sees_copied_files(full_sandbox):
    # Owned by `user`, mode 0640: the sandbox's default user (`app`) may not read it.
    assert run(full_sandbox, "cat /home/user/greeting.txt", user="user") == "copied file"
    assert full_sandbox.commands.run("cat /home/user/greeting.txt 2>&1 || true").stdout.strip().endswith(
        "Permission denied")
    assert run(full_sandbox, "stat -c '%U %a' /home/user/greeting.txt") == "user 640"
    # A directory's contents land in the destination (as Docker's COPY and E2B do).
    assert run(full_sandbox, "cat /opt/conf/app.ini") == "[app]\nname = alcove"
    assert run(full_sandbox, "cat /opt/conf/sub/deep.txt") == "nested"


def test_sandbox_sees_installed_packages(full_sandbox):
    version = run(full_sandbox, f"python3 -c 'import {PIP_PACKAGE}; print({PIP_PACKAGE}.__version__)'")
    assert version == PIP_VERSION
    assert run(full_sandbox, f"dpkg-query -W -f '${{Status}}' {APT_PACKAGE}") == "install ok installed"
    assert run(full_sandbox, "tree --version").startswith("tree v")


def test_sandbox_sees_run_steps_as_their_users(full_sandbox):
    assert run(full_sandbox, "cat /home/user/ran-as-user.txt") == "user"
    assert run(full_sandbox, "stat -c %U /home/user/ran-as-user.txt") == "user"
    assert run(full_sandbox, "cat /etc/ran-as-root.txt") == "root"
    # The last RUN had no user: it ran as USER, in WORKDIR, with ENV, as they were then.
    assert run(full_sandbox, "cat /srv/app/state.txt").splitlines() == ["app", "/srv/app", GREETING]


def test_sandbox_defaults_are_the_templates(full_sandbox):
    """ENV, WORKDIR and USER are the sandbox's defaults (the SDK sends no user: envd >= 0.4)."""
    assert run(full_sandbox, 'echo "$ALCOVE_TPL_GREETING"') == GREETING
    assert run(full_sandbox, "pwd") == "/srv/app"
    assert run(full_sandbox, "id -un") == "app"


def test_start_command_serves_through_the_proxy(full_sandbox):
    # http.server serves its cwd, the template's WORKDIR.
    r = get_through_proxy(full_sandbox, 8000, "/state.txt")
    assert r.status_code == 200, r.text
    assert r.text.splitlines()[0] == "app"


def test_unchanged_rebuild_is_a_cache_hit(full):
    info, logs = build(full["template"], full["name"])
    assert info.template_id == full["info"].template_id, "a new build of a name reuses its templateID"
    assert info.build_id != full["info"].build_id
    text = "\n".join(server_logs(logs))
    assert "cached" in text.lower(), text[-3000:]
    # No step ran again: the RUN step's output is not in this build's log.
    assert STEP_OUT not in text, text[-3000:]


# --- cache, tags and teams on a small template ---------------------------------------------


def test_tag_resolves(small):
    sbx = Sandbox.create(f"{small['name']}:v1", timeout=120)
    try:
        assert run(sbx, "cat /home/user/small-run.txt") == "small-21"
        assert run(sbx, "cat /home/user/small.txt") == "copied file"
    finally:
        sbx.kill()


def test_tags_assign_list_remove(small):
    name, build_id = small["name"], small["info"].build_id
    got = Template.assign_tags(f"{name}:v1", "stable")
    assert got.build_id == build_id and "stable" in got.tags
    tags = {t.tag: t.build_id for t in Template.get_tags(small["info"].template_id)}
    assert tags.get("v1") == build_id and tags.get("stable") == build_id, tags
    sbx = Sandbox.create(f"{name}:stable", timeout=120)
    sbx.kill()
    Template.remove_tags(name, "stable")
    assert "stable" not in {t.tag for t in Template.get_tags(small["info"].template_id)}
    with pytest.raises(Exception) as e:
        Sandbox.create(f"{name}:stable", timeout=60).kill()
    assert "stable" in str(e.value) or "not found" in str(e.value).lower(), str(e.value)


def test_editing_the_last_step_reruns_only_it(small, context_dir):
    info, logs = build(small_template(context_dir, "echo extra-$((30+3))"), small["name"])
    assert info.template_id == small["info"].template_id
    text = "\n".join(server_logs(logs))
    assert "extra-33" in text, text[-3000:]
    assert "small-21" not in text, "the unchanged RUN step ran again:\n" + text[-3000:]


def test_skip_cache_rebuilds(small, context_dir):
    _, logs = build(small_template(context_dir), small["name"], skip_cache=True)
    text = "\n".join(server_logs(logs))
    assert "small-21" in text, "skip_cache=True did not rerun the RUN step:\n" + text[-3000:]


def test_another_team_cannot_use_a_private_template(small, other_team_key):
    with rest(other_team_key) as c:
        for template in (small["name"], f"{small['name']}:v1", small["info"].template_id):
            r = c.post("/sandboxes", json={"templateID": template, "timeout": 60})
            assert r.status_code == 404, (template, r.status_code, r.text)
        r = c.get(f"/templates/{small['info'].template_id}/tags")
        assert r.status_code in (403, 404), r.text
        r = c.get(f"/templates/{small['info'].template_id}/builds/{small['info'].build_id}/status")
        assert r.status_code in (403, 404), r.text
    with pytest.raises(Exception):
        Sandbox.create(small["name"], timeout=60, api_key=other_team_key).kill()


# --- a failing step ------------------------------------------------------------------------


def test_failing_step_raises_build_exception_naming_it(context_dir):
    t = (
        Template(file_context_path=str(context_dir))
        .from_template("base")
        .run_cmd("echo fine")
        .run_cmd("echo about-to-$((1+1))-fail; exit 3")
    )
    logs = []
    with pytest.raises(BuildException) as e:
        Template.build(t, f"sdk-fail-{RUN}", on_build_logs=logs.append)
    msg = str(e.value)
    assert "exit 3" in msg or "exited with 3" in msg or "code 3" in msg, msg
    template_id, build_id = ids_from_logs(logs)
    with rest() as c:
        r = c.get(f"/templates/{template_id}/builds/{build_id}/status")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "error", body
    assert body["reason"]["step"] == "2", body["reason"]
    # The failing step's last output is in the reason or the log.
    seen = body["reason"]["message"] + "\n".join(str(e.message) for e in logs)
    assert "about-to-2-fail" in seen, seen[-3000:]


# --- bad input on the REST surface ---------------------------------------------------------


def test_copy_of_files_never_uploaded_is_refused():
    missing = hashlib.sha256(b"never uploaded " + RUN.encode()).hexdigest()
    with rest() as c:
        tid, bid = new_build(c, "nofiles")
        r = c.post(f"/v2/templates/{tid}/builds/{bid}", json={
            "fromTemplate": "base", "force": False,
            "steps": [{"type": "COPY", "args": ["x.txt", "/tmp/x.txt", "", ""], "force": False,
                       "filesHash": missing}],
        })
    assert r.status_code == 400, r.text
    assert missing in r.json()["message"], r.text


def test_unknown_step_type_is_refused():
    with rest() as c:
        tid, bid = new_build(c, "badstep")
        r = c.post(f"/v2/templates/{tid}/builds/{bid}", json={
            "fromTemplate": "base", "force": False,
            "steps": [{"type": "FROBNICATE", "args": ["x"], "force": False}],
        })
    assert r.status_code == 400, r.text
    assert "FROBNICATE" in r.json()["message"], r.text


def test_upload_url_is_single_use_and_content_addressed():
    data = targz({"once.txt": b"once " + RUN.encode()})
    files_hash = hashlib.sha256(data).hexdigest()
    with rest() as c:
        tid, _ = new_build(c, "upload")
        r = c.get(f"/templates/{tid}/files/{files_hash}")
        assert r.status_code == 201, r.text
        link = r.json()
        assert link["present"] is False and link["url"], link
        # The SDK uploads without the API key: the URL authenticates itself.
        first = httpx.put(link["url"], content=data, timeout=60)
        assert 200 <= first.status_code < 300, first.text
        second = httpx.put(link["url"], content=data, timeout=60)
        assert second.status_code in (400, 401, 403, 409, 410), (second.status_code, second.text)
        again = c.get(f"/templates/{tid}/files/{files_hash}")
        assert again.status_code == 201 and again.json()["present"] is True, again.text
        # A tampered signature is refused too.
        fresh = c.get(f"/templates/{tid}/files/{hashlib.sha256(b'x' + data).hexdigest()}").json()
        u = fresh["url"]
        tampered = u[:-1] + ("0" if u[-1] != "0" else "1")
        bad = httpx.put(tampered, content=data, timeout=60)
        assert bad.status_code in (400, 401, 403), (bad.status_code, bad.text)


def test_upload_over_the_cap_is_413():
    """A PUT that announces 1 TiB is refused before its body is read."""
    with rest() as c:
        tid, _ = new_build(c, "bigupload")
        r = c.get(f"/templates/{tid}/files/{hashlib.sha256(b'big' + RUN.encode()).hexdigest()}")
        assert r.status_code == 201, r.text
    url = urlparse(r.json()["url"])
    target = url.path + ("?" + url.query if url.query else "")
    # Headers only: a server that answered after reading unsent bytes would time out here, and
    # no unread body makes its close a reset that could eat the answer.
    with socket.create_connection((url.hostname, url.port or 80), timeout=30) as s:
        s.sendall(
            f"PUT {target} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {1 << 40}\r\n"
            f"Content-Type: application/gzip\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.split(b"\r\n")[0].split(b" ")[1:2] == [b"413"], head[:200]


# --- OCI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """host:port of the local test registry with alcove-test/busybox-httpd:1. tests/sdk/run.sh
    starts it before the server (which must be told it speaks plain HTTP) and exports
    ALCOVE_SDK_REGISTRY; otherwise this starts one (tests/registry/start.sh DIR), which works only
    if the server was started with --insecure-registry for it."""
    if os.environ.get("ALCOVE_SDK_REGISTRY"):
        yield os.environ["ALCOVE_SDK_REGISTRY"]
        return
    start = REPO / "tests" / "registry" / "start.sh"
    if not start.exists():
        pytest.skip("tests/registry/start.sh is absent (the OCI branch adds it)")
    d = tmp_path_factory.mktemp("registry") / "r"
    out = subprocess.run(["bash", str(start), str(d)], capture_output=True, text=True, timeout=900)
    try:
        assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(REPO / "tests" / "registry" / "stop.sh"), str(d)], timeout=60)


def test_oci_image_becomes_a_template_serving_its_cmd(registry):
    name = f"sdk-oci-{RUN}"
    t = Template().from_image(f"{registry}/alcove-test/busybox-httpd:1")
    _, logs = build(t, name)
    sbx = Sandbox.create(name, timeout=120)
    try:
        # The image's CMD is busybox httpd on 8080; any answer from it (not the proxy's 502).
        r = get_through_proxy(sbx, 8080, "/")
        assert r.status_code in (200, 403, 404), (r.status_code, r.text[:500])
    finally:
        sbx.kill()
