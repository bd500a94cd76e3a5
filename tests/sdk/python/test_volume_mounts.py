"""Volumes mounted in sandboxes (`Sandbox.create(volume_mounts=...)`), with the official SDK:
the files live on the host, outlive the sandbox, are shared by sandboxes and the volume content
API, survive a pause and a snapshot, and nothing a guest puts in a volume reaches outside it on
the host."""

import time
import uuid

import pytest
from e2b import Sandbox, Volume

from conftest import TEMPLATE


def sh(sbx, cmd, user=None):
    kwargs = {"timeout": 120}
    if user:
        kwargs["user"] = user
    return sbx.commands.run(cmd, **kwargs).stdout


@pytest.fixture
def volume():
    vol = Volume.create(f"t-{uuid.uuid4().hex[:12]}")
    yield vol
    # Every sandbox mounting it is gone by now (each test kills its own).
    for _ in range(10):
        try:
            Volume.destroy(vol.volume_id)
            break
        except Exception:  # noqa: BLE001 - a kill may still be settling
            time.sleep(1)


def eventually(check, timeout=10):
    """Names and attributes are cached in a guest for a second; a change made elsewhere shows
    within that."""
    deadline = time.time() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def test_a_volume_outlives_its_sandbox_and_is_shared(volume):
    a = Sandbox.create(TEMPLATE, timeout=300, volume_mounts={"/data": volume})
    b = None
    try:
        # The default user owns what it makes; the mount is a filesystem of its own.
        sh(a, "echo hello > /data/a.txt && mkdir -p /data/d/e && seq 1 1000 > /data/d/e/n.txt")
        # Modes follow the caller's umask, as on the root disk.
        sh(a, "touch /tmp/ref")
        ref = sh(a, "stat -c '%U %a' /tmp/ref").strip()
        assert sh(a, "stat -c '%U %a' /data/a.txt").strip() == ref
        assert ref.startswith("user ")
        assert "alcove-volume" in sh(a, "grep ' /data ' /proc/mounts")
        assert sh(a, "df -k /data | tail -1").split()[1] != "0"
        # Renames, appends, truncates, links and removals go to the host.
        sh(
            a,
            "cd /data && mv d/e/n.txt d/n.txt && echo more >> a.txt && ln -s a.txt link "
            "&& truncate -s 3 d/n.txt && touch gone && rm gone && rmdir d/e",
        )
        assert sh(a, "cat /data/a.txt") == "hello\nmore\n"
        assert sh(a, "cat /data/link") == "hello\nmore\n"
        assert sh(a, "cat /data/d/n.txt") == "1\n2"
        # A second sandbox mounts the same volume, by name, elsewhere.
        b = Sandbox.create(TEMPLATE, timeout=300, volume_mounts={"/mnt/v": volume.name})
        assert sh(b, "cat /mnt/v/a.txt") == "hello\nmore\n"
        sh(b, "echo from-b > /mnt/v/b.txt")
        eventually(lambda: _expect(sh(a, "cat /data/b.txt"), "from-b\n"))
        a.kill()
        a = None
        # The files outlive the sandbox that wrote them, and the content API sees them.
        assert sh(b, "cat /mnt/v/d/n.txt") == "1\n2"
        assert volume.read_file("/a.txt") == "hello\nmore\n"
        names = sorted(e.name for e in volume.list("/"))
        assert names == ["a.txt", "b.txt", "d", "link"]
        volume.write_file("/from-api.txt", "api")
        eventually(lambda: _expect(sh(b, "cat /mnt/v/from-api.txt"), "api"))
        # Root in the guest may write too; a large file round-trips intact.
        sh(b, "head -c 3000000 /dev/urandom > /mnt/v/big && sha256sum /mnt/v/big > /tmp/sum", user="root")
        want = sh(b, "cat /tmp/sum").split()[0]
        import hashlib

        got = hashlib.sha256(volume.read_file("/big", format="bytes")).hexdigest()
        assert got == want
    finally:
        if a:
            a.kill()
        if b:
            b.kill()


def _expect(got, want):
    assert got == want, (got, want)


def test_a_paused_sandbox_keeps_its_mount(volume):
    sbx = Sandbox.create(TEMPLATE, timeout=300, volume_mounts={"/data": volume})
    try:
        sh(sbx, "echo before > /data/f.txt")
        # A process holding the mount's directory open across the pause.
        sbx.commands.run("cd /data && sleep 600", background=True)
        assert sbx.pause() is True
        volume.write_file("/while-paused.txt", "written while paused")
        sbx = Sandbox.connect(sbx.sandbox_id)
        assert sh(sbx, "cat /data/f.txt /data/while-paused.txt") == "before\nwritten while paused"
        sh(sbx, "echo after > /data/g.txt")
        assert volume.read_file("/g.txt") == "after\n"
    finally:
        sbx.kill()


def test_sandboxes_made_from_a_snapshot_or_a_fork_mount_its_volumes(volume):
    src = Sandbox.create(TEMPLATE, timeout=300, volume_mounts={"/data": volume})
    child = None
    try:
        sh(src, "echo one > /data/one.txt")
        snap = src.create_snapshot()
        # The snapshot does not copy the volume: both see one set of files.
        child = Sandbox.create(snap.snapshot_id, timeout=300)
        assert sh(child, "cat /data/one.txt") == "one\n"
        sh(child, "echo two > /data/two.txt")
        eventually(lambda: _expect(sh(src, "cat /data/two.txt"), "two\n"))
        # A fork's children mount it too.
        forks = src.fork(count=1)
        assert not isinstance(forks[0], Exception), forks[0]
        fork = forks[0]
        try:
            assert sh(fork, "cat /data/two.txt") == "two\n"
            sh(fork, "echo three > /data/three.txt")
            eventually(lambda: _expect(sh(src, "cat /data/three.txt"), "three\n"))
        finally:
            fork.kill()
    finally:
        if child:
            child.kill()
        src.kill()


def test_nothing_in_a_volume_reaches_outside_it_on_the_host(volume):
    sbx = Sandbox.create(TEMPLATE, timeout=300, volume_mounts={"/data": volume})
    try:
        # Links a guest makes point into its own filesystem, never the host's: the host's
        # content API refuses to follow them out of the volume.
        sh(sbx, "cd /data && ln -s /etc/passwd abs && ln -s ../../../../../.. up && mkdir d")
        for path in ["/abs", "/up/etc/passwd", "/../../etc/passwd", "/d/../../x"]:
            with pytest.raises(Exception):
                volume.read_file(path)
        # Special files cannot be made; set-id bits do not stick.
        out = sbx.commands.run(
            "mkfifo /data/fifo; mknod /data/dev c 1 3; echo $?", user="root", timeout=60
        ).stdout
        assert out.strip() != "0"
        sh(sbx, "touch /data/s && chmod 4755 /data/s", user="root")
        assert sh(sbx, "stat -c %a /data/s").strip() == "755"
    finally:
        sbx.kill()



def test_a_volume_counts_against_its_teams_storage_quota():
    """A team over its storage limit: guests' writes to its volumes fail with EDQUOT within a
    metering tick (2 s here), the content API and new volumes are refused, and freeing space
    lets the volume grow again. Its own team, so no other test meets the limit."""
    import json
    import os
    import subprocess
    import urllib.request

    if not os.environ.get("ALCOVE_SDK_DATA_DIR"):
        pytest.skip("needs tests/sdk/run.sh (its data directory, to make a team)")
    team = f"vquota-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [os.environ["ALCOVE_BIN"], "keys", "--data-dir", os.environ["ALCOVE_SDK_DATA_DIR"],
         "--json", "create", "--team", team],
        check=True, capture_output=True, text=True, timeout=60,
    )
    key = json.loads(out.stdout)["key"]

    def set_limit(gib):
        body = {} if gib is None else {"maxStorageGib": gib}
        req = urllib.request.Request(
            os.environ["E2B_API_URL"] + f"/alcove/v1/teams/{team}/limits", method="PUT",
            data=json.dumps(body).encode(),
            headers={"X-API-KEY": os.environ["E2B_API_KEY"], "content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200

    vol = Volume.create("quota", api_key=key)
    sbx = None
    try:
        set_limit(1 / 1024)  # 1 MiB
        sbx = Sandbox.create(TEMPLATE, timeout=300, volume_mounts={"/data": vol}, api_key=key)
        # A tick may stop this write part way, once the volume holds more than the limit.
        sh(sbx, "head -c 2097152 /dev/urandom > /data/big; sync; true")

        def frozen():
            r = sbx.commands.run(
                "{ echo more >> /data/small; } 2>&1; echo rc=$?", timeout=60
            ).stdout
            assert "Disk quota exceeded" in r and "rc=1" in r, r

        eventually(frozen, timeout=30)
        # Reading, and removing what is there, still work.
        assert int(sh(sbx, "stat -c %s /data/big")) >= 1 << 20
        with pytest.raises(Exception) as refused:
            Volume.create("another", api_key=key)
        assert "storage" in str(refused.value).lower(), refused.value
        sh(sbx, "rm /data/big")

        def thawed():
            r = sbx.commands.run("echo more >> /data/small; echo rc=$?", timeout=60).stdout
            assert "rc=0" in r, r

        eventually(thawed, timeout=30)
    finally:
        set_limit(None)
        if sbx is not None:
            sbx.kill()
        for _ in range(10):
            try:
                Volume.destroy(vol.volume_id, api_key=key)
                break
            except Exception:  # noqa: BLE001 - the kill may still be settling
                time.sleep(1)
