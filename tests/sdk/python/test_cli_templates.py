"""`alcove template build NAME --dockerfile`: the CLI turns a Dockerfile into a build on the
server (E2B's template build API), and the official SDK creates sandboxes from the result. Also
`alcove template ls|logs|rm` over REST. Uses the server tests/sdk/run.sh started (E2B_API_URL,
E2B_API_KEY) and the binary it started it from (ALCOVE_BIN). Needs real builds (microVMs)."""

import json
import os
import subprocess

import pytest
from e2b import Sandbox

# The CLI under test; ALCOVE_CLI_BIN when the server runs another build of alcove.
BIN = os.environ.get("ALCOVE_CLI_BIN") or os.environ.get("ALCOVE_BIN")
pytestmark = pytest.mark.skipif(not BIN, reason="ALCOVE_BIN is not set; run tests/sdk/run.sh")

# A build under TCG boots a builder VM, runs the steps and snapshots: minutes, not seconds.
BUILD_TIMEOUT = 1200

DOCKERFILE = """\
# syntax is Docker's; FROM names a template the server has
FROM base
ARG GREETING=hello
ARG UNUSED
ENV APP_MODE=cli-test GREETING_ENV=${GREETING}
WORKDIR /app
COPY hello.txt ./
COPY data /app/data/
COPY --chmod=0755 tool.sh /usr/local/bin/
RUN echo "$GREETING from $(whoami)" > /app/run.txt
RUN ["sh", "-c", "chown -R user /app"]
USER user
RUN whoami > /home/user/whoami.txt
EXPOSE 8000
"""


def alcove(*args, timeout=120):
    return subprocess.run([BIN, "template", *args], capture_output=True, text=True, timeout=timeout)


def events(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def context_dir(tmp_path):
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "hello.txt").write_text("hello from the context\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("A")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "b.txt").write_text("B")
    (tmp_path / "data" / "secret.key").write_text("must not be uploaded")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    (tmp_path / ".dockerignore").write_text("**/*.key\n")
    return tmp_path


@pytest.fixture
def name(run_id):
    n = f"cli-df-{run_id[:10]}"
    yield n
    alcove("rm", n)


def build(context_dir, name, *extra):
    return alcove(
        "--json", "build", name,
        "--dockerfile", str(context_dir / "Dockerfile"),
        "--build-arg", "GREETING=hi",
        *extra,
        timeout=BUILD_TIMEOUT,
    )


def test_dockerfile_build_then_sandbox_sees_each_step(context_dir, name):
    r = build(context_dir, name)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evs = events(r.stdout)
    kinds = [e["event"] for e in evs]
    assert kinds[-1] == "done" and evs[-1]["status"] == "ready", evs[-5:]
    requested = next(e for e in evs if e["event"] == "requested")
    assert requested["fromTemplate"] is True and requested["from"] == "base"
    uploads = [e for e in evs if e["event"] == "upload"]
    assert len(uploads) == 3 and all(not u["present"] for u in uploads), uploads
    assert any(e["event"] == "note" and "EXPOSE" in e["message"] for e in evs)
    assert any(e["event"] == "log" for e in evs)

    sbx = Sandbox.create(name, timeout=120)
    try:
        def run(cmd, **kw):
            res = sbx.commands.run(cmd, **kw)
            return res.stdout.strip()

        # COPY (a file to a relative dest, a directory's contents, a mode), .dockerignore
        assert run("cat /app/hello.txt") == "hello from the context"
        assert run("cat /app/data/a.txt /app/data/sub/b.txt") == "AB"
        assert run("test -e /app/data/secret.key && echo yes || echo no") == "no"
        assert run("stat -c %a /usr/local/bin/tool.sh") == "755"
        assert run("tool.sh") == "tool ran"
        # ENV with an ARG substituted (--build-arg over the default); ARGs are not kept
        assert run("echo $APP_MODE $GREETING_ENV") == "cli-test hi"
        assert run("echo ${GREETING:-unset}") == "unset"
        # RUN as root (Docker's default user) saw the build arg; RUN after USER ran as user
        assert run("cat /app/run.txt") == "hi from root"
        assert run("cat /home/user/whoami.txt") == "user"
        assert run("stat -c %U /app/hello.txt") == "user"
        # WORKDIR and USER are the sandbox's defaults
        assert run("pwd") == "/app"
        assert run("whoami") == "user"
    finally:
        sbx.kill()

    # The server lists it; `ls` with a server named goes there.
    r = alcove("--json", "ls")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert any(name in (t.get("names") or []) + (t.get("aliases") or []) for t in listed), listed

    # The build's log, by template name and build id.
    r = alcove("--json", "logs", name, requested["buildID"])
    assert r.returncode == 0, r.stderr
    logs = events(r.stdout)
    assert logs[-1]["event"] == "status" and logs[-1]["status"] == "ready", logs[-3:]
    assert any(e["event"] == "log" for e in logs)

    # An unchanged rebuild uploads nothing (content-addressed files).
    r = build(context_dir, name)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    uploads = [e for e in events(r.stdout) if e["event"] == "upload"]
    assert len(uploads) == 3 and all(u["present"] for u in uploads), uploads

    # rm deletes it: a create by name fails afterwards.
    r = alcove("--json", "rm", name)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == name
    with pytest.raises(Exception):
        Sandbox.create(name, timeout=60)


def test_failing_run_exits_non_zero_naming_the_step(tmp_path, name):
    (tmp_path / "Dockerfile").write_text("FROM base\nRUN echo about to fail && exit 7\n")
    r = alcove("build", name, "--dockerfile", str(tmp_path / "Dockerfile"), timeout=BUILD_TIMEOUT)
    assert r.returncode != 0
    # USER root and WORKDIR / come first: the RUN is step 3, on line 2.
    assert "step 3" in r.stderr and "Dockerfile line 2" in r.stderr, r.stderr[-3000:]


def test_unsupported_dockerfile_is_refused_before_any_request(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM base\nRUN true\nHEALTHCHECK CMD true\n")
    r = alcove("build", "never-built", "--dockerfile", str(tmp_path / "Dockerfile"))
    assert r.returncode != 0
    assert "line 3" in r.stderr and "HEALTHCHECK" in r.stderr, r.stderr
    (tmp_path / "Dockerfile").write_text("FROM base AS a\nFROM base\n")
    r = alcove("--json", "build", "never-built", "--dockerfile", str(tmp_path / "Dockerfile"))
    assert r.returncode != 0
    assert "multi-stage" in json.loads(r.stdout.splitlines()[-1])["error"]
