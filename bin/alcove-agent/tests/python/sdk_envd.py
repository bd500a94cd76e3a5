"""Drives alcove-agent with the official, unmodified e2b Python SDK (envd clients only).

Usage: sdk_envd.py <agent base URL> <scratch dir> <access token or "-">
The SDK is pointed at the agent as its sandbox URL in debug mode, so no control plane is
involved. Every check raises on failure; the last line printed is "SDK OK".
"""

import asyncio
import hashlib
import os
import sys
import threading
import time

from packaging.version import Version

from e2b import AsyncSandbox, Sandbox
from e2b.connection_config import ConnectionConfig
from e2b.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    NotFoundException,
)
from e2b.sandbox.commands.command_handle import CommandExitException
from e2b.sandbox.filesystem.filesystem import FileType
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType

url, scratch, token = sys.argv[1], sys.argv[2], sys.argv[3]
token = None if token == "-" else token


def sandbox(access_token, cls=Sandbox):
    headers = {"E2b-Sandbox-Id": "sbx-sdk", "E2b-Sandbox-Port": "49983"}
    if access_token:
        headers["X-Access-Token"] = access_token
    config = ConnectionConfig(
        debug=True,
        sandbox_url=url,
        api_key="e2b_" + "0" * 40,
        extra_sandbox_headers=headers,
    )
    return cls(
        sandbox_id="sbx-sdk",
        sandbox_domain=None,
        envd_version=Version("0.6.4"),
        envd_access_token=access_token,
        traffic_access_token=None,
        connection_config=config,
    )


sbx = sandbox(token)

# commands: output, exit codes, envs, cwd, users
r = sbx.commands.run("echo out; echo err >&2", user="root")
assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0), r
try:
    sbx.commands.run("exit 3", user="root")
    raise AssertionError("expected CommandExitException")
except CommandExitException as e:
    assert e.exit_code == 3, e
r = sbx.commands.run("echo $FOO; pwd", envs={"FOO": "bar"}, cwd="/tmp", user="root")
assert r.stdout == "bar\n/tmp\n", r.stdout
r = sbx.commands.run("id -un", user="root")
assert r.stdout == "root\n", r.stdout

lines = sbx.commands.run("seq 1 10000", user="root").stdout.splitlines()
assert lines == [str(i) for i in range(1, 10001)], len(lines)

# stdin round trip and background handles
h = sbx.commands.run("while read -r l; do echo \"got $l\"; done", background=True, stdin=True, user="root")
sbx.commands.send_stdin(h.pid, "ping\n")
sbx.commands.send_stdin(h.pid, "pong\n")
sbx.commands.close_stdin(h.pid)
res = h.wait()
assert res.stdout == "got ping\ngot pong\n", res.stdout

# disconnect, list, reconnect, kill
h = sbx.commands.run("for i in $(seq 1 600); do echo tick $i; sleep 0.1; done", background=True, user="root")
pid = h.pid
h.disconnect()
assert any(p.pid == pid for p in sbx.commands.list()), sbx.commands.list()
time.sleep(0.5)
h2 = sbx.commands.connect(pid)
threading.Timer(1.0, lambda: sbx.commands.kill(pid)).start()
try:
    h2.wait()
    raise AssertionError("killed command should not succeed")
except CommandExitException as e:
    assert e.exit_code == -1 and "killed" in (e.error or ""), (e.exit_code, e.error)
    assert "tick" in e.stdout, e.stdout
assert sbx.commands.kill(999999) is False

# PTY: create, resize, input
from e2b.sandbox.commands.command_handle import PtySize

out = []
pty = sbx.pty.create(PtySize(rows=24, cols=80), user="root", cwd="/tmp")
waiter = threading.Thread(target=lambda: pty.wait(on_pty=lambda d: out.append(bytes(d))))
waiter.start()
sbx.pty.send_stdin(pty.pid, b"stty size\n")
deadline = time.time() + 10
while b"24 80" not in b"".join(out):
    if time.time() > deadline:
        raise AssertionError(f"no stty output: {b''.join(out)!r}")
    time.sleep(0.05)
sbx.pty.resize(pty.pid, PtySize(rows=40, cols=100))
sbx.pty.send_stdin(pty.pid, b"stty size; exit\n")
waiter.join(timeout=10)
assert not waiter.is_alive()
assert b"40 100" in b"".join(out), b"".join(out)

# files: write/read, binary, many files, list, stat, rename, remove, make_dir
base = os.path.join(scratch, "sdk")
info = sbx.files.write(f"{base}/a.txt", "hello file", user="root")
assert info.path == f"{base}/a.txt", info
assert sbx.files.read(f"{base}/a.txt", user="root") == "hello file"
blob = os.urandom(3 * 1024 * 1024)
sbx.files.write(f"{base}/blob.bin", blob, user="root")
got = sbx.files.read(f"{base}/blob.bin", format="bytes", user="root")
assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
sbx.files.write_files(
    [{"path": f"{base}/m/one.txt", "data": "1"}, {"path": f"{base}/m/two.txt", "data": "2"}],
    user="root",
)
names = sorted(e.name for e in sbx.files.list(f"{base}/m", user="root"))
assert names == ["one.txt", "two.txt"], names
deep = sbx.files.list(base, depth=2, user="root")
assert any(e.path == f"{base}/m/one.txt" for e in deep), [e.path for e in deep]
st = sbx.files.get_info(f"{base}/a.txt", user="root")
assert st.type == FileType.FILE and st.size == 10, st
assert sbx.files.exists(f"{base}/a.txt", user="root")
assert not sbx.files.exists(f"{base}/nope", user="root")
assert sbx.files.make_dir(f"{base}/d", user="root") is True
assert sbx.files.make_dir(f"{base}/d", user="root") is False
moved = sbx.files.rename(f"{base}/a.txt", f"{base}/d/b.txt", user="root")
assert moved.path == f"{base}/d/b.txt", moved
sbx.files.remove(f"{base}/d", user="root")
assert not sbx.files.exists(f"{base}/d", user="root")
try:
    sbx.files.read(f"{base}/missing.txt", user="root")
    raise AssertionError("expected NotFoundException")
except NotFoundException:
    pass
try:
    sbx.files.list(f"{base}/blob.bin", user="root")
    raise AssertionError("expected InvalidArgumentException")
except InvalidArgumentException:
    pass

# watcher
# (the sync SDK's watch_dir is the polling watcher: CreateWatcher / GetWatcherEvents)
w = sbx.files.watch_dir(base, user="root")
sbx.files.write(f"{base}/watched.txt", "x", user="root")
sbx.files.remove(f"{base}/watched.txt", user="root")
events = []
deadline = time.time() + 10
while not any(e.name == "watched.txt" and e.type == FilesystemEventType.REMOVE for e in events):
    if time.time() > deadline:
        raise AssertionError(f"watcher events: {events}")
    time.sleep(0.1)
    events.extend(w.get_new_events())
assert any(e.name == "watched.txt" and e.type == FilesystemEventType.CREATE for e in events), events
w.stop()

# a wrong token is refused with the SDK's AuthenticationException
if token:
    bad = sandbox("not-the-token")
    try:
        bad.commands.run("true", user="root")
        raise AssertionError("expected AuthenticationException")
    except AuthenticationException:
        pass
    try:
        bad.files.read(f"{base}/blob.bin", user="root")
        raise AssertionError("expected AuthenticationException")
    except AuthenticationException:
        pass



# the async SDK: streamed WatchDir (recursive, with entries) and streamed command output
async def async_checks():
    asbx = sandbox(token, AsyncSandbox)
    events = []
    w = await asbx.files.watch_dir(base, on_event=lambda e: events.append(e), user="root", recursive=True, include_entry=True)
    await asbx.files.make_dir(f"{base}/async-sub", user="root")
    await asyncio.sleep(0.2)
    await asbx.files.write(f"{base}/async-sub/f.txt", "y", user="root")
    deadline = time.time() + 10
    while not any(e.name == "async-sub/f.txt" and e.type == FilesystemEventType.WRITE for e in events):
        if time.time() > deadline:
            raise AssertionError(f"async watcher events: {events}")
        await asyncio.sleep(0.05)
    await w.stop()
    chunks = []
    r = await asbx.commands.run("for i in 1 2 3; do echo $i; sleep 0.1; done", on_stdout=chunks.append, user="root")
    assert r.stdout == "1\n2\n3\n" and "".join(chunks) == r.stdout, (r.stdout, chunks)


asyncio.run(async_checks())
print("SDK OK", flush=True)
# Every check passed. Leave without interpreter teardown: on CI the process once died after
# this line with no traceback (a signal while the SDK's background threads were finalised),
# which says nothing about the agent.
os._exit(0)
