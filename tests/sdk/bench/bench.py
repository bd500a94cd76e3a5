"""SDK-driven benchmarks: what a user of the official SDKs sees, end to end through
`alcove server`. Prints medians and percentiles; asserts nothing (timings belong in
docs/benchmarks.md, not in tests).

  create   base: Sandbox.create() -> commands.run("echo ok") result, sequential; with a warm
           pool, once with the pool refilled before each create and once back to back
  burst    base: N concurrent creates (+ first command), all must succeed (the pool is
           refilled first)
  code     code-interpreter-v1: Sandbox.create() -> run_code("1+1") result, sequential
  chart    code-interpreter-v1: a matplotlib line chart round trip on a live sandbox
  net      base: guest -> host through the egress proxy: request latency (new connection each)
           and download throughput, measured in the guest (needs bench.sh's test address)
  egress   base: HTTPS requests from the guest to a.test with a network rule that sets a secret
           header (the proxy terminates TLS) vs the same host without rules (TLS passes through),
           new connection each and on one kept-alive connection, interleaved sandboxes (needs
           bench.sh's test internet: its DNS zone and CA)
  template custom templates (Template.build): a build from base + one pip package + one copied
           file (skip_cache, so every step runs), the time of that pip install inside a running
           sandbox (the download's share), an unchanged rebuild (all cache hits), and create ->
           first command from the built template vs from base, interleaved (run with
           ALCOVE_WARM_POOL="" so neither comes from a warm pool)
  density  minimal: sandboxes kept alive until --density N are (or creates keep failing), each
           then answering `echo ok`; host memory they take (MemAvailable, QEMU PSS)
  sustained base: create -> first command -> kill by --workers clients in a loop for
           ALCOVE_BENCH_SECONDS (300): creates per second, p50/p95, failures
  cluster  base: create -> first command and a command's round trip through a control plane
           and one `alcove node` vs this single-host server, interleaved (bench_cluster.py)
  drain    base: `alcove node drain` of a node with n sandboxes (each a 64 MiB file and a
           process) to a second node through the blob store: drain time, then each one's
           resume elsewhere with the file and process checked (bench_cluster.py)
  moves    base: a snapshot's copy to the blob store, creates from it on its node and (drained)
           on another, and a node that joins with an empty cache taking the template in from
           the store (needs root: a mount namespace) (bench_cluster.py)
  mcp      base: run_command through `alcove mcp` (stdio) and `/mcp` (HTTP) vs the SDK's
           commands.run, interleaved on one sandbox (bench_mcp.py)
  desktop  desktop, with the e2b-desktop SDK: create -> first screenshot() bytes, sequential with
           the warm pool full before each create, then (with a pool) the same with the pool's VMs
           taken first, so the create restores a VM; on one sandbox: screenshot() round trip,
           the host's PSS of its QEMU and the guest's `free -m` after 20 s idle, a local page
           opened in the browser, left_click -> the first screenshot whose pixel changed (the
           click toggles the page's colour), and the memory again with the page open (run
           with a small desktop pool: bench.sh defaults to desktop=2 for this mode)

Run through tests/sdk/bench.sh, which starts a server and sets E2B_API_URL etc.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import time
import urllib.request


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(name, xs, extra=None):
    ms = [x * 1000 for x in xs]
    row = {
        "name": name,
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(pct(ms, 95), 1),
        "p99_ms": round(pct(ms, 99), 1),
        "min_ms": round(min(ms), 1),
        "max_ms": round(max(ms), 1),
    }
    if extra:
        row.update(extra)
    print(json.dumps(row), flush=True)
    return row


def alcove_api(method, path, body=None, timeout=10):
    """An Alcove extension call with the run's API key; its JSON answer."""
    req = urllib.request.Request(
        os.environ["E2B_API_URL"] + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-API-KEY": os.environ["E2B_API_KEY"], "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def warm_pool():
    """The server's warm pools (GET /alcove/v1/warm-pool), keyed by template."""
    return {p["templateID"]: p for p in alcove_api("GET", "/alcove/v1/warm-pool")}


def wait_for_pool(template, limit=900):
    """Waits until the template's warm pool (if it has one) is full again."""
    deadline = time.monotonic() + limit
    while True:
        p = warm_pool().get(template)
        if p is None or p["ready"] >= p["target"]:
            return p
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm pool of {template} not full after {limit} s: {p}")
        time.sleep(0.1)


def pool_hits(template, before):
    after = warm_pool().get(template)
    if after is None or before is None:
        return {}
    return {"warm_pool": after["target"], "pool_hits": after["hits"] - before["hits"],
            "pool_misses": after["misses"] - before["misses"]}


def create_and_run(_=None):
    from e2b import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create("base", timeout=120)
    try:
        out = sbx.commands.run("echo ok").stdout.strip()
        dt = time.perf_counter() - t0
        assert out == "ok", out
        return dt
    finally:
        sbx.kill()


def pool_ready_series(template, once, n):
    """`once()` n times, each with the template's warm pool full; returns (timings, pool hits)."""
    before = wait_for_pool(template)
    xs = []
    for _ in range(n):
        wait_for_pool(template)
        xs.append(once())
    return xs, pool_hits(template, before)


def bench_create(n):
    create_and_run()  # warm the server's and the host's caches
    summary("sdk create -> first command (base)", *pool_ready_series("base", create_and_run, n))
    before = warm_pool().get("base")
    if before is not None:
        before = wait_for_pool("base")
        summary("sdk create -> first command (base), back to back", [create_and_run() for _ in range(n)],
                pool_hits("base", before))


def bench_sequential(n):
    """A client creating one sandbox after another from a server that has been idle: what the
    default pool does against a plain loop (the pool grows with the demand it sees)."""
    before = wait_for_pool("base")
    xs = [create_and_run() for _ in range(n)]
    summary("sdk create -> first command (base), back to back from an idle pool", xs,
            pool_hits("base", before))


def bench_burst(n):
    before = wait_for_pool("base")
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as ex:
        futures = [ex.submit(create_and_run) for _ in range(n)]
        results, failures = [], []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # reported, not raised: the count is the result
                failures.append(repr(e))
    summary(
        f"sdk {n} concurrent creates -> first command (base)",
        results or [float("nan")],
        {"ok": len(results), "failed": len(failures), "wall_s": round(time.perf_counter() - t0, 1),
         "errors": failures[:3], **pool_hits("base", before)},
    )


def meminfo_kib():
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}


def qemu_pss_mib():
    """Summed PSS of every QEMU process on the host (shared template pages counted once)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if b"qemu-system" not in f.read().split(b"\0")[0]:
                    continue
            with open(f"/proc/{d}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return round(total / 1024, 1)


def bench_density(target, workers=2):
    """`minimal` sandboxes created (by `workers` clients) and kept until `target` are alive or
    creates fail three times in a row; after a minute idle, every one must answer `echo ok`.
    Host memory: MemAvailable before and after, and the QEMU processes' summed PSS. bench.sh
    raises --max-vms and the team's running limit above `target` for this mode."""
    import threading

    from e2b import Sandbox

    avail0 = meminfo_kib()["MemAvailable"]
    alive, errors, lock = [], [], threading.Lock()
    state = {"failed_in_a_row": 0}

    def one(_):
        if state["failed_in_a_row"] >= 3:
            return
        try:
            s = Sandbox.create("minimal", timeout=3600)
            with lock:
                alive.append(s)
                state["failed_in_a_row"] = 0
        except Exception as e:  # counted: where creates start failing is the result
            with lock:
                errors.append(repr(e)[:300])
                state["failed_in_a_row"] += 1

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
        list(ex.map(one, range(target)))
    created_s = time.perf_counter() - t0
    time.sleep(60)
    lat, silent = [], []
    for s in alive:
        t1 = time.perf_counter()
        try:
            assert s.commands.run("echo ok", timeout=60).stdout.strip() == "ok"
            lat.append(time.perf_counter() - t1)
        except Exception as e:
            silent.append(repr(e)[:200])
    mem = meminfo_kib()
    extra = {"alive": len(alive), "answered": len(lat), "did_not_answer": len(silent),
             "create_failures": len(errors), "errors": (errors + silent)[:3],
             "created_in_s": round(created_s, 1),
             "host_mem_used_by_them_mib": round((avail0 - mem["MemAvailable"]) / 1024, 1),
             "host_mem_available_mib": round(mem["MemAvailable"] / 1024, 1),
             "qemu_pss_total_mib": qemu_pss_mib()}
    if alive:
        extra["qemu_pss_each_mib"] = round(extra["qemu_pss_total_mib"] / len(alive), 1)
    summary(f"density: idle minimal sandboxes alive at once (asked for {target}), echo round trip",
            lat or [float("nan")], extra)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as ex:
        list(ex.map(lambda s: s.kill(), alive))


def bench_sustained(workers, seconds=None):
    """Creates for `seconds` (ALCOVE_BENCH_SECONDS, default 300): `workers` clients each doing
    create -> first command -> kill in a loop. Creates per second over the whole run, latency
    p50/p95, and every failure counted."""
    seconds = seconds or float(os.environ.get("ALCOVE_BENCH_SECONDS", "300"))
    before = wait_for_pool("base")
    end = time.monotonic() + seconds
    lat, failures = [], []

    def worker():
        while time.monotonic() < end:
            try:
                lat.append(create_and_run())
            except Exception as e:  # counted: a sustained run's failures are its result
                failures.append(repr(e))

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
        for f in [ex.submit(worker) for _ in range(workers)]:
            f.result()
    wall = time.perf_counter() - t0
    summary(
        f"sdk sustained creates -> first command (base), {workers} clients for {seconds:.0f} s",
        lat or [float("nan")],
        {"ok": len(lat), "failed": len(failures), "creates_per_s": round(len(lat) / wall, 2),
         "wall_s": round(wall, 1), "errors": failures[:3], **pool_hits("base", before)},
    )


def code_once():
    from e2b_code_interpreter import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create(timeout=120)
    try:
        text = sbx.run_code("1+1").text
        dt = time.perf_counter() - t0
        assert text == "2", text
        return dt
    finally:
        sbx.kill()


def bench_code(n):
    code_once()
    summary("sdk create -> run_code('1+1') (code-interpreter-v1)",
            *pool_ready_series("code-interpreter-v1", code_once, n))


def bench_chart(n):
    from e2b_code_interpreter import Sandbox

    code = "import matplotlib.pyplot as plt\nplt.plot(range(100), [i * i for i in range(100)])\nplt.show()"
    sbx = Sandbox.create(timeout=300)
    try:
        sbx.run_code(code)
        xs = []
        for _ in range(n):
            t0 = time.perf_counter()
            ex = sbx.run_code(code)
            xs.append(time.perf_counter() - t0)
            assert any(r.png for r in ex.results) and any(r.chart for r in ex.results)
        summary("matplotlib line chart round trip (png + chart)", xs)
    finally:
        sbx.kill()


def bench_js(n):
    """The first JavaScript cell of a sandbox (it starts Deno's kernel), then cells on the warm
    kernel, against the same for Python (whose kernel is warm in the template snapshot)."""
    from e2b_code_interpreter import Sandbox

    first_js, first_py, warm_js = [], [], []
    for _ in range(n):
        sbx = Sandbox.create(timeout=300)
        try:
            t0 = time.perf_counter()
            assert sbx.run_code("1+1").text == "2"
            first_py.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert sbx.run_code("1+1", language="js", timeout=240).text == "2"
            first_js.append(time.perf_counter() - t0)
            for _ in range(5):
                t0 = time.perf_counter()
                assert sbx.run_code("[1, 2, 3].length", language="js").text == "3"
                warm_js.append(time.perf_counter() - t0)
        finally:
            sbx.kill()
    summary("first run_code in a sandbox: python (warm kernel)", first_py)
    summary("first run_code in a sandbox: javascript (starts Deno's kernel)", first_js)
    summary("run_code javascript on a started kernel", warm_js)


NET_GUEST = r'''
import json, socket, sys, time
host, port, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lat = []
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
    lat.append(time.perf_counter() - t0)
s = socket.create_connection((host, port), timeout=30)
s.sendall(f"GET /big/{mib} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
t0, got = time.perf_counter(), 0
while (k := len(s.recv(1 << 20))):
    got += k
dt = time.perf_counter() - t0
print(json.dumps({"lat": lat, "bytes": got, "secs": dt}))
'''


def bench_net(n, mib=100):
    import http.server
    import threading

    from e2b import Sandbox

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            if self.path.startswith("/big/"):
                size = int(self.path[5:]) << 20
                self.send_response(200)
                self.send_header("content-length", str(size))
                self.end_headers()
                chunk = b"\0" * (1 << 20)
                for _ in range(size >> 20):
                    self.wfile.write(chunk)
            else:
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("198.51.100.2", 0), H)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    sbx = Sandbox.create("base", timeout=600)
    try:
        sbx.files.write("/tmp/netbench.py", NET_GUEST)
        r = sbx.commands.run(f"python3 /tmp/netbench.py 198.51.100.2 {port} {n} {mib}", timeout=600)
        res = json.loads(r.stdout)
        summary("guest -> host HTTP request, new TCP connection each (through the egress proxy)", res["lat"])
        mbit = res["bytes"] * 8 / res["secs"] / 1e6
        print(json.dumps({"name": f"guest <- host download, {mib} MiB, one connection", "mbit_s": round(mbit, 1),
                          "secs": round(res["secs"], 2)}), flush=True)
    finally:
        sbx.kill()
        srv.shutdown()


EGRESS_GUEST = r'''
import http.client, json, ssl, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.create_default_context(cafile="/tmp/all-ca.pem")
def get(c):
    c.request("GET", "/")
    r = c.getresponse()
    assert r.status == 200, r.status
    return r.read()
new, reuse = [], []
for _ in range(n):
    t0 = time.perf_counter()
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
    get(c)
    c.close()
    new.append(time.perf_counter() - t0)
c = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
get(c)
for _ in range(n):
    t0 = time.perf_counter()
    get(c)
    reuse.append(time.perf_counter() - t0)
print(json.dumps({"new": new, "reuse": reuse}))
'''


def bench_egress(n):
    """Egress latency with TLS interception (a rule with a secret header) vs without."""
    import http.server
    import ssl
    import sys
    import threading

    from e2b import ALL_TRAFFIC, Sandbox, Secret

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
    from testnet import serve_test_dns

    tls = os.environ["ALCOVE_BENCH_TLS"]
    serve_test_dns()

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("198.51.100.2", 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{tls}/server.pem", f"{tls}/server.key")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    name = f"bench-{os.getpid()}"
    Secret.create(name, "bench-secret-value")
    net = {"allow_out": ["a.test"], "deny_out": [ALL_TRAFFIC]}
    rules = {"a.test": [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(name)}"}}}]}
    boxes = {"intercepted": Sandbox.create("base", timeout=600, network={**net, "rules": rules}),
             "passthrough": Sandbox.create("base", timeout=600, network=net)}
    res = {k: {"new": [], "reuse": []} for k in boxes}
    try:
        with open(f"{tls}/ca.pem") as f:
            ca = f.read()
        for sbx in boxes.values():
            sbx.files.write("/tmp/test-ca.pem", ca)
            sbx.files.write("/tmp/egressbench.py", EGRESS_GUEST)
            sbx.commands.run("cat /etc/ssl/certs/ca-certificates.crt /tmp/test-ca.pem > /tmp/all-ca.pem")
        # Interleaved rounds, so both see the same machine.
        for _ in range(5):
            for k, sbx in boxes.items():
                r = sbx.commands.run(f"python3 /tmp/egressbench.py a.test {port} {max(1, n // 5)}", timeout=600)
                out = json.loads(r.stdout)
                res[k]["new"] += out["new"]
                res[k]["reuse"] += out["reuse"]
        for how in ("new", "reuse"):
            label = "new connection each" if how == "new" else "one kept-alive connection"
            for k in boxes:
                summary(f"guest HTTPS request to a rule's host, {label}: {k}", res[k][how])
            ratio = statistics.median(res["intercepted"][how]) / statistics.median(res["passthrough"][how])
            print(json.dumps({"name": f"egress interception p50 ratio, {label}", "ratio": round(ratio, 2)}),
                  flush=True)
    finally:
        for sbx in boxes.values():
            sbx.kill()
        Secret.destroy(name)
        srv.shutdown()


BENCH_PIP = "tabulate==0.9.0"
EXTRA_CA_DIR = "/usr/local/share/ca-certificates"


def bench_template(n):
    import tempfile

    from e2b import Sandbox, Template

    pools = {k: v for k, v in warm_pool().items() if v.get("target")}
    ctx = tempfile.mkdtemp(prefix="alcove-bench-template-")
    with open(os.path.join(ctx, "data.txt"), "w") as f:
        f.write("benchmark\n")
    name = f"bench-tpl-{os.getpid()}"

    # The host's extra CAs (a TLS-inspecting egress, as on our CI machines), which the guest's pip
    # needs to reach PyPI, go into a parent template first so they are not part of what is timed.
    parent = "base"
    cas = [f for f in sorted(os.listdir(EXTRA_CA_DIR)) if f.endswith(".crt")] \
        if os.path.isdir(EXTRA_CA_DIR) else []
    if cas:
        os.makedirs(os.path.join(ctx, "extra-ca"))
        for f in cas:
            with open(os.path.join(EXTRA_CA_DIR, f), "rb") as src, \
                    open(os.path.join(ctx, "extra-ca", f), "wb") as dst:
                dst.write(src.read())
        parent = f"bench-tpl-parent-{os.getpid()}"
        Template.build(Template(file_context_path=ctx).from_template("base")
                       .copy("extra-ca", "/usr/local/share/ca-certificates/alcove-bench", user="root")
                       .run_cmd("update-ca-certificates", user="root"), parent)

    def template():
        return (Template(file_context_path=ctx).from_template(parent)
                .pip_install(BENCH_PIP).copy("data.txt", "/home/user/data.txt"))

    def timed_build(**kw):
        t0 = time.perf_counter()
        Template.build(template(), name, **kw)
        return time.perf_counter() - t0

    builds = [timed_build(skip_cache=True) for _ in range(max(1, n // 5))]
    summary(f"template build: {parent} + 1 pip + 1 copy (skip_cache)", builds)

    # The download's share: the same pip install in a running sandbox of base, through the same
    # egress proxy, no pip cache.
    sbx = Sandbox.create(parent, timeout=600)
    try:
        pip = []
        for _ in range(max(1, n // 5)):
            t0 = time.perf_counter()
            r = sbx.commands.run(f"sudo pip install --no-cache-dir -q {BENCH_PIP}", timeout=300)
            pip.append(time.perf_counter() - t0)
            assert r.exit_code == 0, r.stderr
            sbx.commands.run(f"sudo pip uninstall -y -q {BENCH_PIP.split('==')[0]}", timeout=120)
        summary(f"template: the same pip install inside a running {parent} sandbox", pip)
        # The same install from a wheel already in the sandbox: the rest is the download (and
        # the index look-up).
        sbx.commands.run(f"pip download -q --no-deps -d /tmp/wheels {BENCH_PIP}", timeout=300)
        offline = []
        for _ in range(max(1, n // 5)):
            t0 = time.perf_counter()
            r = sbx.commands.run(f"sudo pip install --no-index --find-links /tmp/wheels -q {BENCH_PIP}",
                                 timeout=300)
            offline.append(time.perf_counter() - t0)
            assert r.exit_code == 0, r.stderr
            sbx.commands.run(f"sudo pip uninstall -y -q {BENCH_PIP.split('==')[0]}", timeout=120)
        summary("template: that pip install from a local wheel (no download)", offline,
                {"download_share_p50": round(1 - statistics.median(offline) / statistics.median(pip), 2)})
    finally:
        sbx.kill()

    summary("template unchanged rebuild (cache hits)", [timed_build() for _ in range(n)])

    def create_first(tpl):
        t0 = time.perf_counter()
        s = Sandbox.create(tpl, timeout=120)
        try:
            out = s.commands.run("echo ok").stdout.strip()
            dt = time.perf_counter() - t0
            assert out == "ok", out
            return dt
        finally:
            s.kill()

    create_first(name), create_first("base")  # warm the host's caches for both
    custom, base = [], []
    for _ in range(n):  # interleaved, so drift in the host's load hits both alike
        custom.append(create_first(name))
        base.append(create_first("base"))
    extra = {"warm_pools": pools} if pools else {}
    b = summary("sdk create -> first command (base)", base, extra)
    c = summary("sdk create -> first command (freshly built template)", custom,
                {"ratio_p50": round(statistics.median(custom) / statistics.median(base), 2), **extra})
    return b, c


def bench_volume(n, mib=32):
    """Sequential write (fsync'd) and cold read throughput in the guest: a mounted volume
    against the sandbox's root disk, interleaved in one sandbox so load drift hits both."""
    import uuid

    from e2b import Sandbox, Volume

    vol = Volume.create(f"bench-{uuid.uuid4().hex[:8]}")
    sbx = Sandbox.create("base", timeout=3600, volume_mounts={"/vol": vol})
    try:
        def run(path, op):
            # One 1 MiB-block dd; the guest's page cache is dropped before a read.
            cmd = {
                "write": f"dd if=/dev/zero of={path} bs=1M count={mib} conv=fsync 2>/dev/null",
                "read": f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if={path} of=/dev/null bs=1M 2>/dev/null",
            }[op]
            t0 = time.perf_counter()
            r = sbx.commands.run(cmd, user="root", timeout=600)
            dt = time.perf_counter() - t0
            assert r.exit_code == 0, r.stderr
            return dt

        run("/vol/f", "write"), run("/root/f", "write")  # warm up both paths
        res = {k: [] for k in ("vol_write", "disk_write", "vol_read", "disk_read")}
        for _ in range(n):
            res["vol_write"].append(run("/vol/f", "write"))
            res["disk_write"].append(run("/root/f", "write"))
            res["vol_read"].append(run("/vol/f", "read"))
            res["disk_read"].append(run("/root/f", "read"))
        for op in ("write", "read"):
            v, d = res[f"vol_{op}"], res[f"disk_{op}"]
            mbs = lambda xs: round(mib / statistics.median(xs), 1)  # noqa: E731
            summary(f"volume {op} {mib} MiB (mounted volume)", v, {"mib_per_s_p50": mbs(v)})
            summary(f"volume {op} {mib} MiB (root disk)", d,
                    {"mib_per_s_p50": mbs(d), "volume_vs_disk_p50": round(statistics.median(v) / statistics.median(d), 2)})
    finally:
        sbx.kill()
        Volume.destroy(vol.volume_id)


DESKTOP = "desktop"
# The page the click test opens: the button covers the window, and a click toggles the page's
# background (the button is transparent) between two saturated colours that page_colour() tells
# apart; the title follows, for a person watching.
DESKTOP_PAGE = """<!doctype html><html><head><title>alcove-bench a</title>
<style>html,body{margin:0;height:100%;background:#c80000}
button{width:100%;height:100%;border:0;background:transparent;font-size:40px}</style>
<script>var on = false;
function toggle() {
  on = !on;
  document.body.style.background = on ? "#0000c8" : "#c80000";
  document.title = "alcove-bench " + (on ? "b" : "a");
}</script>
</head><body><button onclick="toggle()">press</button></body></html>
"""


def page_colour(px):
    """Which of the page's two colours a screenshot pixel shows (None: neither)."""
    r, g, b = px
    if g < 60 and r > 150 and b < 60:
        return "a"
    if g < 60 and b > 150 and r < 60:
        return "b"
    return None


def png_pixel(data, xy):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(bytes(data))).convert("RGB").getpixel(xy)


def qemu_pid(sandbox_id):
    """The host pid of the sandbox's QEMU. Its command line names the sandbox's directory, named
    for the sandbox id, or, for a VM the warm pool made, for that VM's own id: then the
    directory's record.json names the sandbox it became."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if not argv or "qemu-system" not in argv[0]:
            continue
        if any(sandbox_id in a for a in argv):
            return int(d)
        if "-pidfile" in argv[:-1]:
            record = os.path.join(os.path.dirname(argv[argv.index("-pidfile") + 1]), "record.json")
            try:
                with open(record) as f:
                    r = json.load(f)
            except (OSError, ValueError):
                continue
            if r.get("id") == sandbox_id and r.get("pid") == int(d):
                return int(d)
    return None


def desktop_memory(sbx, name, idle_s=20):
    """Host and guest memory of a desktop sandbox left idle for `idle_s` seconds (once the warm
    pool is full, so no filler runs meanwhile)."""
    wait_for_pool(DESKTOP)
    time.sleep(idle_s)
    row = {"name": name, "idle_s": idle_s}
    pid = qemu_pid(sbx.sandbox_id)
    if pid is None:
        row["error"] = "no QEMU process found for the sandbox"
    else:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line)
                  if v.strip().endswith("kB")}
        row.update({"host_qemu_pss_mib": round(kb["Pss"] / 1024, 1),
                    "host_qemu_rss_mib": round(kb["Rss"] / 1024, 1),
                    "host_qemu_private_mib": round((kb["Private_Clean"] + kb["Private_Dirty"]) / 1024, 1)})
    # free -m: "Mem: total used free shared buff/cache available"
    mem = next(line.split() for line in sbx.commands.run("free -m").stdout.splitlines()
               if line.startswith("Mem:"))
    row.update({"guest_total_mib": int(mem[1]), "guest_used_mib": int(mem[2]),
                "guest_buff_cache_mib": int(mem[5])})
    # The other VMs of the template (the warm pool's) map the same template memory file: PSS
    # splits those shared pages between them.
    p = warm_pool().get(DESKTOP)
    if p is not None:
        row["warm_pool_ready"] = p["ready"]
    print(json.dumps(row), flush=True)
    return row


def desktop_first_screenshot():
    from e2b_desktop import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create(DESKTOP, timeout=900)
    try:
        created = time.perf_counter() - t0
        shot = sbx.screenshot()
        dt = time.perf_counter() - t0
        assert len(shot) > 1000, len(shot)
        return dt, created
    finally:
        sbx.kill()


def desktop_creates(n, hold=0):
    """n creates -> first screenshot, each with the pool full first; with `hold`, that many
    sandboxes are created (from the pool, with the plain SDK) just before, so the timed create
    restores a VM itself. Failures are counted, not raised."""
    from e2b import Sandbox as Plain

    before = wait_for_pool(DESKTOP)
    xs, creates, errors = [], [], []
    for _ in range(n):
        wait_for_pool(DESKTOP)
        held = [Plain.create(DESKTOP, timeout=600) for _ in range(hold)]
        try:
            dt, created = desktop_first_screenshot()
            xs.append(dt)
            creates.append(created)
        except Exception as e:  # reported, not raised: a timed-out desktop start is a result
            errors.append(repr(e)[:300])
        finally:
            for h in held:
                h.kill()
    # Of which Sandbox.create() itself (the API's create, then the SDK starting Xvfb and XFCE,
    # which the template keeps running: the wrappers return at once).
    extra = {"create_p50_ms": round(statistics.median(creates) * 1000, 1) if creates else None,
             "ok": len(xs), "failed": len(errors), **pool_hits(DESKTOP, before)}
    if errors:
        extra["errors"] = errors[:3]
    return xs or [float("nan")], extra


def wait_until(check, timeout, interval=1.0):
    deadline = time.monotonic() + timeout
    while True:
        r = check()
        if r:
            return r
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {check.__name__}")
        time.sleep(interval)


def bench_desktop(n):
    from e2b_desktop import Sandbox

    pool = warm_pool().get(DESKTOP)
    if pool is not None:
        summary("e2b-desktop create -> first screenshot, pool ready", *desktop_creates(n))
        # Without a pool: the pool's VMs are taken first, so the create restores a VM (while the
        # pool starts refilling, at the lowest CPU weight).
        summary("e2b-desktop create -> first screenshot, pool taken (the create restores a VM)",
                *desktop_creates(n, hold=pool["target"]))
    else:
        summary("e2b-desktop create -> first screenshot, no warm pool", *desktop_creates(n))

    wait_for_pool(DESKTOP)
    sbx = Sandbox.create(DESKTOP, timeout=1800)
    try:
        size = None
        sbx.screenshot()
        wait_for_pool(DESKTOP)  # the pool's refill done: the series sees an otherwise quiet host
        xs = []
        for _ in range(n):
            t0 = time.perf_counter()
            shot = sbx.screenshot()
            xs.append(time.perf_counter() - t0)
            size = len(shot)
        summary("e2b-desktop screenshot() round trip (1024x768 PNG)", xs, {"png_bytes": size})
        # What a screen recording (5 fps, the default) costs the desktop: the same round trip
        # while one runs, and the MP4's growth.
        recs = f"/alcove/v1/sandboxes/{sbx.sandbox_id}/recordings"
        rec = alcove_api("POST", recs, {"fps": 5}, timeout=180)
        ys = []
        for _ in range(n):
            t0 = time.perf_counter()
            sbx.screenshot()
            ys.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        done = alcove_api("POST", f"{recs}/{rec['recordingID']}/stop", timeout=180)
        stop_s = time.perf_counter() - t0
        summary("e2b-desktop screenshot() round trip while recording the screen at 5 fps", ys,
                {"mp4_bytes": done["sizeBytes"], "recorded_s": done["durationSeconds"],
                 "stop_ms": round(stop_s * 1000, 1), "state": done["state"]})
        desktop_memory(sbx, "idle desktop memory (XFCE, no window open)")

        # A local page in the browser; a click anywhere on it toggles its colour.
        path = "/home/user/alcove-bench.html"
        sbx.files.write(path, DESKTOP_PAGE)
        t0 = time.perf_counter()
        sbx.open(path)

        def page_window():
            out = sbx.commands.run("xdotool search --onlyvisible --name alcove-bench || true").stdout.split()
            return out[0] if out else None

        wid = wait_until(page_window, timeout=600)
        geo = dict(kv.split("=") for kv in
                   sbx.commands.run(f"xdotool getwindowgeometry --shell {wid}").stdout.split())
        # Clicks in the middle of the page (below the browser's toolbar), at two points in turn:
        # `xdotool mousemove --sync` to where the pointer already is waits for a move that never
        # comes (measured on its own below). The pixel watched is to their left, clear of the
        # mouse pointer the screenshot draws.
        x = int(geo["X"]) + int(geo["WIDTH"]) // 2
        y = int(geo["Y"]) + int(geo["HEIGHT"]) // 2 + 40
        points = [(x, y), (x + 40, y)]
        probe = (x - 80, y)

        def page_drawn():
            return page_colour(png_pixel(sbx.screenshot(), probe)) is not None

        wait_until(page_drawn, timeout=300)
        print(json.dumps({"name": "e2b-desktop open(local page) -> page drawn in a screenshot",
                          "secs": round(time.perf_counter() - t0, 1)}), flush=True)

        clicks, sdk_clicks, shots, errors = [], [], [], []
        for i in range(n):
            colour = page_colour(png_pixel(sbx.screenshot(), probe))
            if colour is None:
                errors.append("the page was not visible before the click")
                continue
            t0 = time.perf_counter()
            sbx.left_click(*points[i % 2])
            sdk_clicks.append(time.perf_counter() - t0)
            k = 0
            while True:
                k += 1
                if page_colour(png_pixel(sbx.screenshot(), probe)) not in (colour, None):
                    clicks.append(time.perf_counter() - t0)
                    shots.append(k)
                    break
                if time.perf_counter() - t0 > 120:
                    errors.append(f"no change {k} screenshots after the click")
                    break
        # left_click_p50_ms: the SDK call itself (xdotool mousemove --sync, then click);
        # screenshots_p50: screenshots taken after it, the last one showing the change.
        extra = {"ok": len(clicks), "failed": len(errors),
                 "left_click_p50_ms": round(statistics.median(sdk_clicks) * 1000, 1) if sdk_clicks else None,
                 "screenshots_p50": statistics.median(shots) if shots else None}
        if errors:
            extra["errors"] = errors[:3]
        summary("e2b-desktop left_click -> change visible in a screenshot", clicks or [float("nan")], extra)

        # The SDK call alone, at the point the pointer is already on (an agent clicking the same
        # button twice): e2b-desktop moves the mouse with `xdotool mousemove --sync` first.
        same = []
        for _ in range(min(n, 2)):
            sbx.move_mouse(*points[1])  # away, then back: each a real move
            sbx.move_mouse(*points[0])
            t0 = time.perf_counter()
            sbx.left_click(*points[0])
            same.append(time.perf_counter() - t0)
        summary("e2b-desktop left_click(x, y) call where the pointer already is", same)
        desktop_memory(sbx, "idle desktop memory (XFCE, Chromium showing the page)")
    finally:
        sbx.kill()


def bench_mcp(n):
    from bench_mcp import bench_mcp as run

    run(n)


def bench_cluster(n):
    from bench_cluster import bench_cluster as run

    run(n)


def bench_drain(n):
    from bench_cluster import bench_drain as run

    run(n)


def bench_moves(n):
    from bench_cluster import bench_moves as run

    run(n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("modes", nargs="*", default=["create", "burst", "code", "chart"])
    ap.add_argument("-n", type=int, default=20, help="sequential iterations")
    ap.add_argument("--burst", type=int, default=20, help="concurrent creates")
    ap.add_argument("--workers", type=int, default=4, help="clients of the sustained mode")
    ap.add_argument("--density", type=int, default=200, help="sandboxes the density mode keeps")
    args = ap.parse_args()
    for m in args.modes:
        {"create": lambda: bench_create(args.n), "burst": lambda: bench_burst(args.burst),
         "code": lambda: bench_code(args.n), "chart": lambda: bench_chart(args.n), "net": lambda: bench_net(args.n),
         "egress": lambda: bench_egress(args.n), "volume": lambda: bench_volume(args.n),
         "js": lambda: bench_js(args.n), "sequential": lambda: bench_sequential(args.n),
         "template": lambda: bench_template(args.n), "mcp": lambda: bench_mcp(args.n),
         "desktop": lambda: bench_desktop(args.n), "cluster": lambda: bench_cluster(args.n),
         "sustained": lambda: bench_sustained(args.workers),
         "density": lambda: bench_density(args.density), "drain": lambda: bench_drain(args.n),
         "moves": lambda: bench_moves(args.n)}[m]()


if __name__ == "__main__":
    main()
