"""QEMU, the process that runs guest code, holds nothing a guest escape could use: every
qemu-system process of this server runs as a non-root uid/gid with no capabilities and
no_new_privs (read from /proc, as an attacker who got out of QEMU would find it)."""

import os

from conftest import data_dir  # noqa: F401  (fixture)


def server_pid(data_dir):
    try:
        with open(os.path.join(os.path.dirname(data_dir), "server.pid")) as f:
            return f.read().strip()
    except OSError:
        return None


def descends_from(pid, ancestor):
    for _ in range(16):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = f.read().rsplit(")", 1)[1].split()[1]
        except OSError:
            return False
        if pid == ancestor:
            return True
        if pid in ("0", "1"):
            return False
    return False


def qemu_processes(data_dir):
    """Every qemu-system process of this server: its cmdline names the data directory (paths may
    be jail-relative once jailed, so descendants of the server process count too)."""
    server = server_pid(data_dir)
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except OSError:
            continue
        mine = data_dir in cmd or (server is not None and descends_from(pid, server))
        if "qemu-system" in cmd.split(" ")[0] and mine:
            procs.append((pid, {k: v.strip() for k, v in status.items()}))
    return procs


def test_qemu_runs_unprivileged(sandbox, data_dir):
    procs = qemu_processes(os.path.realpath(data_dir)) or qemu_processes(data_dir)
    assert procs, "no qemu-system process mentions the server's data directory"
    bad = []
    for pid, st in procs:
        uids, gids = st["Uid"].split(), st["Gid"].split()
        if "0" in uids or "0" in gids:
            bad.append((pid, "uid/gid", st["Uid"], st["Gid"]))
        for cap in ("CapEff", "CapPrm", "CapAmb"):
            if int(st[cap], 16) != 0:
                bad.append((pid, cap, st[cap]))
        if st.get("NoNewPrivs") != "1":
            bad.append((pid, "NoNewPrivs", st.get("NoNewPrivs")))
        if st.get("Seccomp") != "2":
            bad.append((pid, "Seccomp", st.get("Seccomp")))
    assert not bad, bad


# crates/vmm/src/jail.rs DEFAULT_UID_BASE (the server runs with the default range).
JAIL_ID_BASE = 1_900_000_000


def test_data_dir_is_private_to_the_server(sandbox, data_dir):
    """Another local user reads nothing: the data directory and every file under it (the
    database with key hashes, records with tokens) are closed to others, and to every group but
    the jail's own (a VM's gid, or the jail's shared group for read-only VM inputs: ids from
    1,900,000,000 up that no login has)."""
    sandbox.pause()  # so a paused sandbox's saved state is there too
    loose = []
    for root, dirs, files in os.walk(data_dir):
        for name in [root] + [os.path.join(root, f) for f in files]:
            try:
                st = os.lstat(name)
            except OSError:
                continue
            jail_group = st.st_gid >= JAIL_ID_BASE
            if not os.path.islink(name) and (
                st.st_mode & 0o007 or (st.st_mode & 0o070 and not jail_group)
            ):
                loose.append((name, oct(st.st_mode & 0o777)))
    assert not loose, loose[:20]
