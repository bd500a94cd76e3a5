"""Cluster overhead: the same SDK calls through a single-host server (bench.sh's) and through a
control plane whose sandboxes run on one `alcove node` on this host (the cluster link: TLS,
calls as JSON over HTTP/2, traffic streamed), interleaved so both see the same machine.

- create -> first command: `Sandbox.create("base")` -> `commands.run("echo ok")`, each create
  with the server's warm pool full (both serve from a pool);
- command round trip: `commands.run("true")` on one live sandbox of each.

Prints p50/p95 of each and the ratio cluster / single host.
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


def start_cluster(bin_, root, pool):
    port, cport = free_port(), free_port()
    data = os.path.join(root, "control")
    log = open(os.path.join(root, "cluster.log"), "ab")
    procs = [subprocess.Popen(
        [bin_, "server", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
         "--cluster-listen", f"127.0.0.1:{cport}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)]
    token = os.path.join(data, "cluster.token")
    while not os.path.exists(token):
        time.sleep(0.1)
    procs.append(subprocess.Popen(
        [bin_, "node", "--server", f"http://127.0.0.1:{cport}", "--token-file", token,
         "--listen", "127.0.0.1:0", "--node-id", "bench-node", "--data-dir",
         os.path.join(root, "node"), "--warm-pool", pool],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
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
        return procs, Target(url, f.read().strip())


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
    procs, cluster = start_cluster(os.environ["ALCOVE_BIN"], root,
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
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["pkill", "-9", "-f", root], check=False)
