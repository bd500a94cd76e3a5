"""`alcove client sandbox exec|shell`: the CLI reaching a sandbox through the server's proxy,
as the SDKs do. Uses the server tests/sdk/run.sh started (E2B_API_URL, E2B_API_KEY) and the
binary it started it from (ALCOVE_BIN). Needs real sandboxes."""

import json
import os
import pty
import select
import subprocess
import time

import pytest

BIN = os.environ.get("ALCOVE_BIN")
pytestmark = pytest.mark.skipif(not BIN, reason="ALCOVE_BIN is not set; run tests/sdk/run.sh")


def alcove(*args, **kw):
    return subprocess.run([BIN, "client", "sandbox", *args], capture_output=True, text=True, timeout=120, **kw)


def test_exec_streams_output_and_returns_the_exit_code(sandbox):
    r = alcove("exec", sandbox.sandbox_id, "--", "echo out; echo err >&2; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout.strip() == "out"
    assert "err" in r.stderr
    r = alcove("--json", "exec", sandbox.sandbox_id, "-e", "X=42", "--cwd", "/tmp", "--", "echo $X $(pwd) $(whoami)")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 0
    assert doc["stdout"].strip() == "42 /tmp user"
    r = alcove("exec", "--user", "root", sandbox.sandbox_id, "--", "whoami")
    assert r.stdout.strip() == "root"


def test_exec_unknown_sandbox_is_a_clear_error():
    r = alcove("exec", "nosuchsandbox", "--", "true")
    assert r.returncode != 0
    assert "nosuchsandbox" in r.stderr


def test_shell_is_interactive_on_a_terminal(sandbox):
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(BIN, [BIN, "client", "sandbox", "shell", sandbox.sandbox_id])
    out = b""
    deadline = time.time() + 90
    sent = False
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if not sent and (b"$" in out or time.time() > deadline - 60):
            os.write(fd, b"echo $((6*7))xy; tty; exit 5\r")
            sent = True
    _, status = os.waitpid(pid, 0)
    assert b"42xy" in out, out[-2000:]
    assert b"/dev/pts/" in out, out[-2000:]
    assert os.waitstatus_to_exitcode(status) == 5
