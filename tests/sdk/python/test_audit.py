"""Run traces and the audit log against the real server: what a sandbox did (commands with
their exit codes and output sizes, file writes and reads, state changes) through the unmodified
SDK shows in its events in order, and the exported log verifies with `alcove audit verify` and
fails it once a record is edited."""

import os
import subprocess

import pytest
from e2b import CommandExitException, Sandbox

from conftest import TEMPLATE, audit_events


def test_a_runs_commands_files_and_states_are_traced_in_order_and_the_export_verifies(tmp_path):
    sbx = Sandbox.create(TEMPLATE, timeout=120)
    sid = sbx.sandbox_id
    try:
        assert sbx.commands.run("echo hello").stdout == "hello\n"
        with pytest.raises(CommandExitException):
            sbx.commands.run("echo oops >&2; exit 3")
        sbx.files.write("/home/user/traced.txt", "x" * 1000)
        assert sbx.files.read("/home/user/traced.txt") == "x" * 1000
        sbx.commands.run("whoami", user="root")
    finally:
        sbx.kill()

    ev = audit_events(sid, lambda ev: any(e["action"] == "running -> killed" for e in ev)
                     and sum(e["kind"] == "process" for e in ev) >= 3)
    procs = [e for e in ev if e["kind"] == "process"]
    hello = next(p for p in procs if p["target"] == "/bin/bash -l -c echo hello")
    assert hello["result"] == "exit 0"
    assert hello["detail"]["stdoutBytes"] == 6
    assert hello["detail"]["user"] == "user"
    assert hello["detail"]["pid"] > 0
    assert "stdout" not in hello["detail"], "output is kept only when the sandbox opts in"
    oops = next(p for p in procs if "exit 3" in p["target"])
    assert oops["result"] == "exit 3"
    assert oops["detail"]["stderrBytes"] == 5
    root = next(p for p in procs if p["target"].endswith("whoami"))
    assert root["detail"]["user"] == "root"
    files = [e for e in ev if e["kind"] == "file" and e["target"] == "/home/user/traced.txt"]
    assert [f["action"] for f in files] == ["write", "read"], files
    assert files[0]["detail"]["bytes"] >= 1000 and files[1]["detail"]["bytes"] == 1000
    order = [e["seq"] for e in (hello, oops, files[0], files[1], root)]
    assert order == sorted(order)
    assert [e["action"] for e in ev if e["kind"] == "state"][-1] == "running -> killed"

    # The export verifies; an edited record is found.
    bin_ = os.environ["ALCOVE_BIN"]
    env = dict(os.environ)
    out = subprocess.run([bin_, "audit", "export", "--verify"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(sid in line for line in lines)
    path = tmp_path / "audit.jsonl"
    path.write_text(out.stdout)
    ok = subprocess.run([bin_, "audit", "verify", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "every chain intact" in ok.stdout, ok.stdout + ok.stderr
    i = next(i for i, line in enumerate(lines) if '"exit 3"' in line)
    lines[i] = lines[i].replace('"exit 3"', '"exit 0"')
    path.write_text("\n".join(lines) + "\n")
    bad = subprocess.run([bin_, "audit", "verify", str(path)], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "breaks at record" in bad.stdout and "edited" in bad.stdout, bad.stdout


def test_a_sandbox_that_opts_in_keeps_its_commands_output_in_the_trace():
    sbx = Sandbox.create(TEMPLATE, timeout=60, metadata={"alcove.capture-output": "true"})
    try:
        sbx.commands.run("echo captured; echo warned >&2")
    finally:
        sbx.kill()
    ev = audit_events(sbx.sandbox_id, lambda ev: any(e["kind"] == "process" for e in ev))
    p = next(e for e in ev if e["kind"] == "process")
    assert p["detail"]["stdout"] == "captured\n"
    assert p["detail"]["stderr"] == "warned\n"
