"""Persistence through the official SDK: pause/resume (three times in a row, and across a server
restart), filesystem-only pauses and reboots, autoPause + autoResume, snapshots restored many
times, forks that diverge, deleting a parent snapshot under live children, and damaged saved
state reported clearly."""

import json
import os
import subprocess
import time

import pytest
from e2b import Sandbox, SandboxState
from e2b.exceptions import SandboxException

from conftest import TEMPLATE

# A process holding a variable in memory and a file open: every 0.2 s it appends
# "<secret> <n>" to the file it opened once. Pause/resume must keep both.
HOLDER = r"""
import os, random, time
secret = "%016x" % random.getrandbits(64)
f = open("/home/user/holder.log", "a")
n = 0
while True:
    n += 1
    f.write(f"{secret} {n}\n")
    f.flush()
    time.sleep(0.2)
"""


def start_holder(sbx):
    sbx.files.write("/home/user/holder.py", HOLDER)
    sbx.commands.run("python3 /home/user/holder.py", background=True)
    # Python starts slowly under TCG; wait for its first line.
    sbx.commands.run(
        "for i in $(seq 600); do test -s /home/user/holder.log && exit 0; sleep 0.1; done; exit 1",
        timeout=90,
    )


def last_line(sbx):
    out = sbx.commands.run("sleep 0.5; tail -n1 /home/user/holder.log").stdout.split()
    return out[0], int(out[1])


def test_pause_resume_three_times_keeps_process_variable_and_files():
    sbx = Sandbox.create(TEMPLATE, timeout=300)
    try:
        start_holder(sbx)
        secret, n = last_line(sbx)
        sbx.files.write("/home/user/data/before.txt", "written before any pause")
        written = {}
        for round_ in range(3):
            assert sbx.pause() is True
            assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
            # Pausing again is a no-op the SDK reports as False (409).
            assert sbx.pause() is False
            sbx.connect()
            assert sbx.get_info().state == SandboxState.RUNNING
            s2, n2 = last_line(sbx)
            assert s2 == secret, f"round {round_}: the process lost its variable"
            assert n2 > n, f"round {round_}: the process stopped ({n} -> {n2})"
            n = n2
            # Every file written so far is intact, including those written after earlier
            # resumes (the "second resume" bug loses those).
            assert sbx.files.read("/home/user/data/before.txt") == "written before any pause"
            for path, content in written.items():
                assert sbx.files.read(path) == content, f"round {round_}: {path}"
            path = f"/home/user/data/after-{round_}.txt"
            content = f"written after resume {round_}\n" * 1000
            sbx.files.write(path, content)
            written[path] = content
            assert sbx.commands.run("pgrep -c -f holder.py").stdout.strip() == "1"
    finally:
        sbx.kill()


def boot_id(sbx):
    return sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()


def test_filesystem_only_pause_cold_boots_with_files_and_env():
    data = os.environ.get("ALCOVE_SDK_DATA_DIR")
    sbx = Sandbox.create(TEMPLATE, timeout=300, envs={"KEPT_VAR": "kept value"})
    try:
        start_holder(sbx)
        first_boot = boot_id(sbx)
        sbx.files.write("/home/user/data/fs.txt", "on the disk\n" * 1000)
        sbx.pause(mode="filesystem")
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        if data:
            # Nothing of the memory is kept.
            assert not os.path.exists(os.path.join(sandbox_dir(data, sbx.sandbox_id), "paused.state"))
        sbx.connect()
        assert sbx.get_info().state == SandboxState.RUNNING
        # A new boot: the processes are gone; the files, the env vars and the identity stay.
        assert boot_id(sbx) != first_boot
        assert sbx.commands.run("pgrep -c -f '[h]older.py' || true").stdout.strip() == "0"
        assert sbx.files.read("/home/user/data/fs.txt") == "on the disk\n" * 1000
        assert sbx.commands.run("echo $KEPT_VAR").stdout.strip() == "kept value"
        assert sbx.commands.run("hostname").stdout.strip() == sbx.sandbox_id
        # The next pause is a full one again, and it resumes where it was.
        sbx.commands.run("rm -f /home/user/holder.log")
        start_holder(sbx)
        secret, n = last_line(sbx)
        sbx.pause()
        sbx.connect()
        s2, n2 = last_line(sbx)
        assert (s2, n2 > n) == (secret, True)
    finally:
        sbx.kill()


def test_a_timeout_pause_can_keep_only_the_disk():
    sbx = Sandbox.create(
        TEMPLATE, timeout=15, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}
    )
    try:
        first_boot = boot_id(sbx)
        sbx.files.write("/home/user/at-timeout.txt", "kept")
        deadline = time.time() + 120
        while Sandbox.get_info(sbx.sandbox_id).state != SandboxState.PAUSED:
            assert time.time() < deadline, "not paused at its end time"
            time.sleep(1)
        sbx.connect()
        assert boot_id(sbx) != first_boot
        assert sbx.files.read("/home/user/at-timeout.txt") == "kept"
    finally:
        sbx.kill()


def test_a_filesystem_only_snapshot_makes_cold_booted_sandboxes():
    src = Sandbox.create(TEMPLATE, timeout=300, envs={"FROM_SRC": "src"})
    children = []
    try:
        src.files.write("/home/user/snap.txt", "in the snapshot")
        src_boot = boot_id(src)
        snap = src.create_snapshot(mode="filesystem")
        # The source goes on where it was.
        assert boot_id(src) == src_boot
        for _ in range(2):
            child = Sandbox.create(snap.snapshot_id, timeout=120)
            children.append(child)
            assert child.files.read("/home/user/snap.txt") == "in the snapshot"
            assert boot_id(child) != src_boot
            assert child.commands.run("echo $FROM_SRC").stdout.strip() == "src"
    finally:
        for c in children:
            c.kill()
        src.kill()


def test_on_resume_reboot_drops_the_memory_image():
    sbx = Sandbox.create(TEMPLATE, timeout=300)
    try:
        start_holder(sbx)
        first_boot = boot_id(sbx)
        sbx.files.write("/home/user/reboot.txt", "kept")
        # A full pause keeps the page cache in the memory image, which a reboot drops.
        sbx.commands.run("sync")
        sbx.pause()
        resumed = Sandbox.connect(sbx.sandbox_id, on_resume="reboot")
        assert boot_id(resumed) != first_boot
        assert resumed.commands.run("pgrep -c -f '[h]older.py' || true").stdout.strip() == "0"
        assert resumed.files.read("/home/user/reboot.txt") == "kept"
    finally:
        sbx.kill()


def test_server_restart_between_pause_and_resume():
    restart = os.environ.get("ALCOVE_SDK_RESTART_SERVER")
    if not restart:
        pytest.skip("ALCOVE_SDK_RESTART_SERVER not set (run through tests/sdk/run.sh)")
    sbx = Sandbox.create(TEMPLATE, timeout=300)
    try:
        start_holder(sbx)
        secret, n = last_line(sbx)
        sbx.files.write("/home/user/kept.txt", "across a restart")
        sbx.pause()
        subprocess.run([restart], check=True, timeout=120)
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert resumed.files.read("/home/user/kept.txt") == "across a restart"
        s2, n2 = last_line(resumed)
        assert (s2, n2 > n) == (secret, True)
    finally:
        sbx.kill()


def test_auto_pause_at_timeout_then_auto_resume_on_traffic():
    sbx = Sandbox.create(
        TEMPLATE, timeout=10, lifecycle={"on_timeout": "pause", "auto_resume": True}
    )
    try:
        sbx.files.write("/home/user/auto.txt", "kept")
        info = sbx.get_info()
        assert info.lifecycle["on_timeout"] == "pause"
        deadline = time.time() + 120
        while Sandbox.get_info(sbx.sandbox_id).state != SandboxState.PAUSED:
            assert time.time() < deadline, "not paused at its timeout"
            time.sleep(1)
        # Plain sandbox traffic resumes it.
        assert sbx.files.read("/home/user/auto.txt") == "kept"
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
        # The lifetime restarted at the resume: it has not been paused again right away.
        assert sbx.commands.run("echo up").stdout == "up\n"
    finally:
        sbx.kill()


def test_fork_into_five_children_that_diverge_while_the_parent_is_unchanged():
    parent = Sandbox.create(TEMPLATE, timeout=300)
    children = []
    try:
        parent.files.write("/home/user/shared.txt", "from the parent")
        start_holder(parent)
        secret, _ = last_line(parent)
        results = parent.fork(count=5)
        assert len(results) == 5
        for r in results:
            assert not isinstance(r, Exception), r
        children = results
        ids = {c.sandbox_id for c in children}
        assert len(ids) == 5 and parent.sandbox_id not in ids
        for i, c in enumerate(children):
            assert c.files.read("/home/user/shared.txt") == "from the parent"
            c.files.write("/home/user/mine.txt", f"child {i}")
            # The held process was forked with its memory.
            s, _ = last_line(c)
            assert s == secret
        uuids = set()
        for i, c in enumerate(children):
            assert c.files.read("/home/user/mine.txt") == f"child {i}"
            assert c.commands.run("hostname").stdout.strip() == c.sandbox_id
            uuids.add(c.commands.run("cat /proc/sys/kernel/random/uuid").stdout)
        assert len(uuids) == 5, "children share RNG state"
        # The parent goes on, unchanged by its children.
        assert not parent.files.exists("/home/user/mine.txt")
        assert parent.files.read("/home/user/shared.txt") == "from the parent"
        assert parent.commands.run("hostname").stdout.strip() == parent.sandbox_id
    finally:
        for c in children:
            if not isinstance(c, Exception):
                c.kill()
        parent.kill()


def test_restore_one_snapshot_three_times_then_delete_it_under_live_children():
    src = Sandbox.create(TEMPLATE, timeout=300)
    restored = []
    try:
        src.files.write("/home/user/cp.txt", "checkpoint")
        start_holder(src)
        secret, _ = last_line(src)
        snap = src.create_snapshot()
        assert snap.snapshot_id
        # The source goes on running after the snapshot.
        src.files.write("/home/user/later.txt", "after the snapshot")
        for i in range(3):
            s = Sandbox.create(snap.snapshot_id, timeout=300)
            restored.append(s)
            assert s.files.read("/home/user/cp.txt") == "checkpoint"
            assert not s.files.exists("/home/user/later.txt")
            assert last_line(s)[0] == secret
            s.files.write("/home/user/cp.txt", f"changed by {i}")
        for i, s in enumerate(restored):
            assert s.files.read("/home/user/cp.txt") == f"changed by {i}"
        listed = [x.snapshot_id for x in Sandbox.list_snapshots().next_items()]
        assert snap.snapshot_id in listed
        # Names may carry a tag: list_snapshots matches them tag-qualified or not.
        tagged = src.create_snapshot(name="cp-snap:v1")
        try:
            found = lambda n: [x.snapshot_id for x in Sandbox.list_snapshots(name=n).next_items()]
            assert found("cp-snap") == [tagged.snapshot_id]
            assert found("cp-snap:v1") == [tagged.snapshot_id]
            assert found("cp-snap:v2") == []
            assert found(tagged.snapshot_id) == [tagged.snapshot_id]
        finally:
            Sandbox.delete_snapshot(tagged.snapshot_id)

        # Delete the parent snapshot while its children live: they keep working.
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
        assert Sandbox.delete_snapshot(snap.snapshot_id) is False
        for i, s in enumerate(restored):
            assert s.files.read("/home/user/cp.txt") == f"changed by {i}"
            s.files.write("/home/user/new.txt", "still writable")
            assert s.commands.run("cat /home/user/new.txt").stdout == "still writable"
        listed = [x.snapshot_id for x in Sandbox.list_snapshots().next_items()]
        assert snap.snapshot_id not in listed
        with pytest.raises(Exception):
            Sandbox.create(snap.snapshot_id, timeout=60)
    finally:
        for s in restored:
            s.kill()
        src.kill()


def sandbox_dir(data, sandbox_id):
    """The node's directory of a sandbox: the one whose record names it (a sandbox that came from
    the warm pool lives in its VM's directory, named by the VM's own id)."""
    root = os.path.join(data, "sandboxes")
    for name in os.listdir(root):
        try:
            with open(os.path.join(root, name, "record.json")) as f:
                if json.load(f).get("id") == sandbox_id:
                    return os.path.join(root, name)
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no record for sandbox {sandbox_id} under {root}")


def damage(path, offset=4096):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_corrupt_pause_state_is_a_clear_error_and_left_intact():
    data = os.environ.get("ALCOVE_SDK_DATA_DIR")
    if not data:
        pytest.skip("ALCOVE_SDK_DATA_DIR not set (run through tests/sdk/run.sh)")
    sbx = Sandbox.create(TEMPLATE, timeout=300)
    try:
        sbx.pause()
        state = os.path.join(sandbox_dir(data, sbx.sandbox_id), "paused.state")
        damage(state)
        size = os.path.getsize(state)
        with pytest.raises(SandboxException) as e:
            sbx.connect()
        msg = str(e.value)
        assert "corrupt" in msg and "checksum" in msg, msg
        # Nothing was changed or deleted; the sandbox is still paused, not broken.
        assert os.path.getsize(state) == size
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        # Undo the damage: the same state resumes fine.
        damage(state)
        sbx.connect()
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    finally:
        sbx.kill()


def test_a_corrupt_snapshot_is_a_clear_error():
    data = os.environ.get("ALCOVE_SDK_DATA_DIR")
    if not data:
        pytest.skip("ALCOVE_SDK_DATA_DIR not set (run through tests/sdk/run.sh)")
    src = Sandbox.create(TEMPLATE, timeout=300)
    try:
        snap = src.create_snapshot()
        # The device state a restore loads: `ram.state` once the memory image was re-homed into
        # a shared RAM file, else the full `memory.state`.
        sdir = os.path.join(data, "snapshots", snap.snapshot_id)
        name = "ram.state" if os.path.exists(os.path.join(sdir, "ram.state")) else "memory.state"
        damage(os.path.join(sdir, name), offset=64)
        with pytest.raises(SandboxException) as e:
            Sandbox.create(snap.snapshot_id, timeout=60)
        assert "corrupt" in str(e.value), str(e.value)
        # The source sandbox is unaffected.
        assert src.commands.run("echo ok").stdout == "ok\n"
        Sandbox.delete_snapshot(snap.snapshot_id)
    finally:
        src.kill()
