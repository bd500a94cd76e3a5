"""Cluster overhead: the same SDK calls through a single-host server (bench.sh's) and through a
control plane whose sandboxes run on one `alcove node` on this host (the cluster link: TLS,
calls as JSON over HTTP/2, traffic streamed), interleaved so both see the same machine.

- create -> first command: `Sandbox.create("base")` -> `commands.run("echo ok")`, each create
  with the server's warm pool full (both serve from a pool);
- command round trip: `commands.run("true")` on one live sandbox of each.

Prints p50/p95 of each and the ratio cluster / single host.

`bench_drain` (bench.py's `drain` mode) times `alcove node drain` and the resumes that follow;
`bench_moves` (`moves`) times snapshots and templates moving between nodes through the blob store.
"""

import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Target:
    def __init__(self, url, key):
        self.url, self.key = url, key

    def sdk(self):
        return {"api_key": self.key, "api_url": self.url, "sandbox_url": self.url}

    def pool(self):
        req = urllib.request.Request(self.url + "/alcove/v1/warm-pool",
                                     headers={"X-API-KEY": self.key})
        with urllib.request.urlopen(req, timeout=10) as r:
            return {p["templateID"]: p for p in json.load(r)}.get("base")

    def wait_pool(self, limit=600):
        deadline = time.monotonic() + limit
        while True:
            p = self.pool()
            if p is not None and p["ready"] >= max(p["target"], 1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.url}: warm pool not full after {limit} s: {p}")
            time.sleep(0.1)


def start_node(bin_, root, cport, name, pool, extra=(), prefix=()):
    log = open(os.path.join(root, "cluster.log"), "ab")
    return subprocess.Popen(
        [*prefix, bin_, "node", "--server", f"http://127.0.0.1:{cport}", "--token-file",
         os.path.join(root, "control", "cluster.token"), "--listen", "127.0.0.1:0",
         "--node-id", name, "--data-dir", os.path.join(root, name), "--warm-pool", pool, *extra],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def start_cluster(bin_, root, pool, blobs=None):
    """A control plane and one node ("bench-node"); with `blobs` (a directory), both use it as
    the blob store. Answers the processes, the API target and the cluster port."""
    port, cport = free_port(), free_port()
    data = os.path.join(root, "control")
    log = open(os.path.join(root, "cluster.log"), "ab")
    store = ["--blob-store", "file://" + blobs] if blobs else []
    procs = [subprocess.Popen(
        [bin_, "server", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
         "--cluster-listen", f"127.0.0.1:{cport}", *store],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)]
    token = os.path.join(data, "cluster.token")
    while not os.path.exists(token):
        time.sleep(0.1)
    procs.append(start_node(bin_, root, cport, "bench-node", pool, store))
    url = f"http://127.0.0.1:{port}"
    key_file = os.path.join(data, "api-key")
    for _ in range(600):
        try:
            if os.path.exists(key_file) and urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    with open(key_file) as f:
        return procs, Target(url, f.read().strip()), cport


def create_and_run(t):
    from e2b import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create("base", timeout=120, **t.sdk())
    try:
        assert sbx.commands.run("echo ok").stdout.strip() == "ok"
        return time.perf_counter() - t0
    finally:
        sbx.kill()


def stats(xs):
    ms = sorted(x * 1000 for x in xs)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return round(statistics.median(ms), 1), round(p95, 1)


def bench_cluster(n):
    from e2b import Sandbox

    single = Target(os.environ["E2B_API_URL"], os.environ["E2B_API_KEY"])
    root = tempfile.mkdtemp(prefix="alcove-bench-cluster-")
    procs, cluster, _ = start_cluster(os.environ["ALCOVE_BIN"], root,
                                      os.environ.get("ALCOVE_WARM_POOL") or "base=4")
    try:
        results = {"single host": [], "cluster (1 node)": []}
        targets = {"single host": single, "cluster (1 node)": cluster}
        for t in targets.values():
            t.wait_pool()
            create_and_run(t)  # warm caches on both paths
        for _ in range(n):
            for name, t in targets.items():
                t.wait_pool()
                results[name].append(create_and_run(t))
        rtt = {name: [] for name in targets}
        sbxs = {name: Sandbox.create("base", timeout=300, **t.sdk()) for name, t in targets.items()}
        try:
            for s in sbxs.values():
                for _ in range(5):
                    s.commands.run("true")
            for _ in range(5 * n):
                for name, s in sbxs.items():
                    t0 = time.perf_counter()
                    s.commands.run("true")
                    rtt[name].append(time.perf_counter() - t0)
        finally:
            for s in sbxs.values():
                s.kill()
        for what, series in (("sdk create -> first command (base), pool full", results),
                             ("sdk commands.run('true') round trip", rtt)):
            rows = {name: stats(xs) for name, xs in series.items()}
            (s50, s95), (c50, c95) = rows["single host"], rows["cluster (1 node)"]
            print(json.dumps({"name": what, "n": len(series["single host"]),
                              "single_p50_ms": s50, "single_p95_ms": s95,
                              "cluster_p50_ms": c50, "cluster_p95_ms": c95,
                              "ratio_p50": round(c50 / s50, 2)}), flush=True)
    finally:
        stop(procs, root)


def stop(procs, root):
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["pkill", "-9", "-f", root], check=False)


def api(t, method, path, timeout=600):
    req = urllib.request.Request(t.url + path, method=method, headers={"X-API-KEY": t.key})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def bench_drain(n):
    """`alcove node drain` with n sandboxes on the drained node, each with a 64 MiB file and a
    process running: the drain's wall time (each sandbox paused, uploaded to the blob store with
    its SHA-256s, removed from the node), then each one's first call after it (a resume on the
    other node: download, checks, restore), with the file and the process checked there."""
    from e2b import Sandbox

    bin_ = os.environ["ALCOVE_BIN"]
    root = tempfile.mkdtemp(prefix="alcove-bench-drain-")
    blobs = os.path.join(root, "blobs")
    procs, t, cport = start_cluster(bin_, root, "base=1", blobs)
    try:
        t.wait_pool()
        sbxs = [Sandbox.create("base", timeout=1800, **t.sdk()) for _ in range(n)]
        for s in sbxs:
            s.commands.run("head -c 64M /dev/urandom > /home/user/blob && sha256sum /home/user/blob > /home/user/blob.sum")
            s.commands.run("sleep 36000", background=True)
        procs.append(start_node(bin_, root, cport, "bench-other", "base=1", ["--blob-store", "file://" + blobs]))
        deadline = time.monotonic() + 300
        while len([x for x in api(t, "GET", "/alcove/v1/nodes") if x["up"] and x["templates"]]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the second node did not join")
            time.sleep(0.5)
        t0 = time.perf_counter()
        report = api(t, "POST", "/alcove/v1/nodes/bench-node/drain")
        drain_s = time.perf_counter() - t0
        du = subprocess.run(["du", "-sm", blobs], capture_output=True, text=True).stdout.split()
        moved = report.get("moved", [])
        resumes, bad = [], []
        for s in sbxs:
            t1 = time.perf_counter()
            s.connect()
            ok = s.commands.run("sha256sum -c /home/user/blob.sum >/dev/null && pgrep -x sleep >/dev/null",
                                timeout=120).exit_code == 0
            resumes.append(time.perf_counter() - t1)
            if not ok:
                bad.append(s.sandbox_id)
        p50, p95 = stats(resumes)
        print(json.dumps({"name": "drain: sandboxes moved through the blob store", "n": n,
                          "moved": len(moved), "failed": report.get("failed"),
                          "drain_s": round(drain_s, 1), "drain_per_sandbox_s": round(drain_s / n, 2),
                          "resume_elsewhere_p50_ms": p50, "resume_elsewhere_p95_ms": p95,
                          "blob_store_mib_after_drain": int(du[0]) if du else None,
                          "file_or_process_lost": bad}), flush=True)
        for s in sbxs:
            s.kill()
    finally:
        stop(procs, root)


def du_mib(path):
    out = subprocess.run(["du", "-sm", path], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def wait_nodes(t, up, limit=300):
    deadline = time.monotonic() + limit
    while len([x for x in api(t, "GET", "/alcove/v1/nodes") if x["up"]]) < up:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {up} nodes up after {limit} s")
        time.sleep(0.5)


def bench_moves(n):
    """Snapshots and templates between nodes through the blob store (a directory here):
    - a snapshot of a sandbox with 64 MiB written: how long its copy to the store takes (behind
      the snapshot call) and its size there;
    - create -> first command from that snapshot, n times on its own node, then n times after
      that node is drained: the first on another node includes taking the snapshot in, the
      rest use that node's copy;
    - a node that joins with an empty cache (its own mount namespace over the cache path): the
      first create it gets (every other node draining) includes copying the template to the
      store and taking it in; then n more creates there."""
    from e2b import Sandbox

    bin_ = os.environ["ALCOVE_BIN"]
    root = tempfile.mkdtemp(prefix="alcove-bench-moves-")
    blobs = os.path.join(root, "blobs")
    store = ["--blob-store", "file://" + blobs]
    procs, t, cport = start_cluster(bin_, root, "base=1", blobs)

    def from_snapshot(snap):
        t0 = time.perf_counter()
        s = Sandbox.create(snap, timeout=600, **t.sdk())
        try:
            assert s.commands.run("sha256sum -c /home/user/blob.sum >/dev/null").exit_code == 0
            return time.perf_counter() - t0
        finally:
            s.kill()

    try:
        t.wait_pool()
        src = Sandbox.create("base", timeout=1800, **t.sdk())
        src.commands.run("head -c 64M /dev/urandom > /home/user/blob && sha256sum /home/user/blob > /home/user/blob.sum")
        snap = src.create_snapshot().snapshot_id
        t0 = time.perf_counter()
        manifest = os.path.join(blobs, "snapshots", snap, "manifest.json")
        while not os.path.exists(manifest):
            time.sleep(0.05)
        copy_s = time.perf_counter() - t0
        home = [from_snapshot(snap) for _ in range(n)]
        procs.append(start_node(bin_, root, cport, "bench-other", "base=1", store))
        wait_nodes(t, 2)
        api(t, "POST", "/alcove/v1/nodes/bench-node/drain")
        elsewhere = [from_snapshot(snap) for _ in range(n + 1)]
        cache = os.environ.get("ALCOVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "alcove")
        fresh = os.path.join(root, "fresh-cache")
        os.makedirs(fresh)
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", fresh, cache]
        procs.append(start_node(bin_, root, cport, "bench-fresh", "base=0", store, prefix=wrap))
        wait_nodes(t, 3)
        api(t, "POST", "/alcove/v1/nodes/bench-other/drain")
        fresh_creates = [create_and_run(t) for _ in range(n + 1)]
        hp50, hp95 = stats(home)
        ep50, ep95 = stats(elsewhere[1:])
        fp50, fp95 = stats(fresh_creates[1:])
        print(json.dumps({"name": "moves: snapshots and templates through the blob store", "n": n,
                          "snapshot_copy_s": round(copy_s, 1),
                          "snapshot_mib_in_store": du_mib(os.path.join(blobs, "snapshots")),
                          "from_snapshot_on_its_node_p50_ms": hp50, "p95_ms": hp95,
                          "from_snapshot_first_elsewhere_ms": round(elsewhere[0] * 1000, 1),
                          "from_snapshot_elsewhere_after_p50_ms": ep50, "after_p95_ms": ep95,
                          "template_first_create_on_new_node_s": round(fresh_creates[0], 1),
                          "template_mib_in_store": du_mib(os.path.join(blobs, "templates")),
                          "new_node_later_creates_p50_ms": fp50, "later_p95_ms": fp95}), flush=True)
        src.kill()
    finally:
        stop(procs, root)
