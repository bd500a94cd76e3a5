"""Chaos: `kill -9` of the server during create, pause, snapshot and fork, then a restart;
`kill -9` of a QEMU; the data directory filling up. Nothing recorded is lost, every sandbox ends
in a state with a reason, and the server serves on.

This module starts its own server (it kills it), on a free port, with its data directory on a
size-limited tmpfs (so the disk-full case is real and cannot touch the host's disks) and no warm
pool (so a create takes long enough to be interrupted). Needs root (mount) and ALCOVE_BIN.
"""

import os
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time

import httpx
import pytest
from e2b import Sandbox, SandboxState
from e2b.exceptions import SandboxException

from conftest import TEMPLATE

pytestmark = pytest.mark.chaos
SETTLED = {"running", "paused", "killed", "lost"}


class Server:
    def __init__(self, root):
        self.root = root
        self.data = os.path.join(root, "state")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(tempfile.gettempdir(), f"alcove-chaos-{self.port}.log"), "ab")
        self.proc = None
        self.start()
        with open(os.path.join(self.data, "api-key")) as f:
            self.key = f.read().strip()
        self.http = httpx.Client(base_url=self.url, headers={"X-API-KEY": self.key}, timeout=120)

    def start(self):
        self.proc = subprocess.Popen(
            [os.environ["ALCOVE_BIN"], "server", "--listen", f"127.0.0.1:{self.port}",
             "--data-dir", self.data, "--warm-pool", "base=0"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while True:
            assert self.proc.poll() is None, "the server exited at start (see the chaos log)"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200 and os.path.exists(
                    os.path.join(self.data, "api-key")
                ):
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not answer within 60 s"
            time.sleep(0.1)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def restart(self):
        self.kill9() if self.proc.poll() is None else None
        self.start()

    def sdk(self):
        return {"api_key": self.key, "api_url": self.url, "sandbox_url": self.url}

    def create(self, **kw):
        return Sandbox.create(TEMPLATE, timeout=600, **self.sdk(), **kw)

    def record(self, sandbox_id):
        r = self.http.get(f"/alcove/v1/sandboxes/{sandbox_id}")
        assert r.status_code == 200, (sandbox_id, r.status_code, r.text)
        return r.json()

    def all_ids(self):
        db = sqlite3.connect(f"file:{os.path.join(self.data, 'alcove.db')}?mode=ro", uri=True, timeout=30)
        try:
            return [r[0] for r in db.execute("SELECT id FROM sandboxes")]
        finally:
            db.close()

    def qemu_pids(self, needle=None):
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmd.split(" ")[0] and self.data in cmd and (needle is None or needle in cmd):
                out.append(int(pid))
        return out

    def assert_settled(self):
        """Every sandbox ever recorded is running, paused, or ended with a reason (after giving
        the restarted server time to settle whatever was in flight)."""
        deadline = time.time() + 60
        while True:
            recs = {i: self.record(i) for i in self.all_ids()}
            unsettled = {i: r["state"] for i, r in recs.items() if r["state"] not in SETTLED}
            if not unsettled:
                break
            assert time.time() < deadline, f"still unsettled after a restart: {unsettled}"
            time.sleep(1)
        for i, r in recs.items():
            if r["state"] in ("killed", "lost"):
                assert r.get("endReason"), f"{i} is {r['state']} with no reason"
        # The server serves: lists, and a sandbox can be created.
        Sandbox.list(**self.sdk()).next_items()
        return recs


@pytest.fixture(scope="module")
def server():
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a size-limited tmpfs as the data directory")
    if not os.environ.get("ALCOVE_BIN"):
        pytest.skip("needs ALCOVE_BIN (set by tests/sdk/run.sh)")
    root = tempfile.mkdtemp(prefix="alcove-chaos.")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3g,mode=0700", "tmpfs", root], check=True)
    srv = None
    try:
        srv = Server(root)
        yield srv
    finally:
        if srv is not None and srv.proc.poll() is None:
            srv.proc.terminate()
            try:
                srv.proc.wait(30)
            except subprocess.TimeoutExpired:
                srv.kill9()
        # Sandboxes outlive a server by design; this module's must not outlive the module.
        if srv is not None:
            for pid in srv.qemu_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        subprocess.run(["umount", "-l", root], check=False)
        os.rmdir(root)


def during(server, action, delay):
    """Runs `action` in a thread and kills the server with SIGKILL `delay` seconds into it."""
    outcome = {}

    def run():
        try:
            outcome["result"] = action()
        except Exception as e:  # the server died under it: expected
            outcome["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(delay)
    server.kill9()
    t.join(120)
    server.start()
    return outcome


def file_is(server, sbx_id, path, content):
    sbx = Sandbox.connect(sbx_id, timeout=600, **server.sdk())
    assert sbx.files.read(path) == content


@pytest.fixture(scope="module")
def keep(server):
    """A running and a paused sandbox that every crash below must leave intact."""
    running = server.create()
    running.files.write("/home/user/keep.txt", "running one")
    paused = server.create()
    paused.files.write("/home/user/keep.txt", "paused one")
    assert paused.pause() is True
    return running.sandbox_id, paused.sandbox_id


def assert_kept(server, keep):
    running, paused = keep
    assert server.record(running)["state"] == "running"
    assert server.record(paused)["state"] == "paused"
    listed = {s.sandbox_id for s in Sandbox.list(**server.sdk()).next_items()}
    assert {running, paused} <= listed
    file_is(server, running, "/home/user/keep.txt", "running one")


def test_kill_9_during_create(server, keep):
    during(server, lambda: server.http.post("/sandboxes", json={"templateID": TEMPLATE, "timeout": 300}), 0.3)
    server.assert_settled()
    assert_kept(server, keep)
    server.create().kill()


def test_kill_9_during_pause(server, keep):
    sbx = server.create()
    sbx.files.write("/home/user/mine.txt", "before the crash")
    during(server, lambda: server.http.post(f"/sandboxes/{sbx.sandbox_id}/pause"), 0.15)
    recs = server.assert_settled()
    assert recs[sbx.sandbox_id]["state"] in ("running", "paused"), recs[sbx.sandbox_id]
    # Running or paused, its files are there (connect resumes a paused one).
    file_is(server, sbx.sandbox_id, "/home/user/mine.txt", "before the crash")
    assert_kept(server, keep)


def test_kill_9_during_snapshot_and_fork(server, keep):
    sbx = server.create()
    sbx.files.write("/home/user/mine.txt", "before the crash")
    for action in ("snapshots", "fork"):
        during(server, lambda: server.http.post(f"/sandboxes/{sbx.sandbox_id}/{action}", json={}), 0.15)
        recs = server.assert_settled()
        assert recs[sbx.sandbox_id]["state"] in ("running", "paused"), (action, recs[sbx.sandbox_id])
        file_is(server, sbx.sandbox_id, "/home/user/mine.txt", "before the crash")
        assert_kept(server, keep)
    # Every snapshot still listed restores (the newest one, to keep this short).
    snaps = Sandbox.list_snapshots(**server.sdk()).next_items()
    for s in snaps[:1]:
        child = Sandbox.create(s.snapshot_id, timeout=120, **server.sdk())
        assert child.files.read("/home/user/mine.txt") == "before the crash"
        child.kill()


def test_kill_9_of_qemu_reports_the_sandbox_dead_with_a_reason(server):
    sbx = server.create()
    pids = server.qemu_pids(sbx.sandbox_id)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.time() + 60
    while (rec := server.record(sbx.sandbox_id))["state"] not in ("killed", "lost"):
        assert time.time() < deadline, rec
        time.sleep(0.5)
    assert rec["endReason"], rec
    with pytest.raises(Exception):
        sbx.commands.run("echo hi", timeout=30)
    server.assert_settled()


def test_data_dir_full_gives_clear_errors_and_loses_nothing(server):
    sbx = server.create()
    sbx.files.write("/home/user/full.txt", "written before the disk filled")
    filler = os.path.join(server.root, "filler")
    st = os.statvfs(server.root)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        chunk = b"\0" * (8 << 20)
        try:
            for _ in range(free // len(chunk) + 1):
                f.write(chunk)
        except OSError:
            pass  # full
    try:
        # The guest writes to its disk while the host's is full: QEMU stops the VM on the failed
        # write (the node lets it run again once space is back, below).
        try:
            sbx.commands.run("dd if=/dev/zero of=/home/user/big bs=1M count=64 oflag=direct",
                             background=True, timeout=10)
        except Exception:
            pass  # the VM may already be stopped on a failed write of its own
        time.sleep(2)
        for attempt in (lambda: sbx.pause(), lambda: sbx.create_snapshot()):
            with pytest.raises(SandboxException) as e:
                attempt()
            assert str(e.value), "no error message"
            rec = server.record(sbx.sandbox_id)
            assert rec["state"] in SETTLED and (rec["state"] != "lost" or rec["endReason"])
        # The server still answers reads.
        Sandbox.list(**server.sdk()).next_items()
    finally:
        os.unlink(filler)
    # Space back: the sandbox is intact (running, or paused and resumable), and pauses work again.
    file_is(server, sbx.sandbox_id, "/home/user/full.txt", "written before the disk filled")
    assert Sandbox.connect(sbx.sandbox_id, **server.sdk()).pause() is True
    assert Sandbox.get_info(sbx.sandbox_id, **server.sdk()).state == SandboxState.PAUSED
    db = sqlite3.connect(os.path.join(server.data, "alcove.db"), timeout=30)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    server.assert_settled()
    file_is(server, sbx.sandbox_id, "/home/user/full.txt", "written before the disk filled")
