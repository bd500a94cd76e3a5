"""A cluster on this host for the SDK suites: a private Postgres (Debian's postgresql-15), two
control-plane replicas (`alcove server --cluster-listen --database-url`) on it, and three
`alcove node` processes heartbeating to both, sharing one blob store directory
(`docs/cluster.md`). Used by test_cluster.py and run_on_cluster.py.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import httpx
from e2b import Sandbox

from conftest import TEMPLATE

NODES = 3
PG_BIN = "/usr/lib/postgresql/15/bin"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(what, check, timeout):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.time() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.2)


class Postgres:
    """A private Postgres: a fresh cluster in a temporary directory, on 127.0.0.1 only, trust
    auth, run as the `postgres` user (it refuses root)."""

    def __init__(self):
        assert os.path.exists(f"{PG_BIN}/initdb"), \
            "postgresql-15 is missing (scripts/test.sh installs it: apt-get install postgresql-15)"
        self.dir = tempfile.mkdtemp(prefix="alcove-pg-")
        self.owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.owner:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.run(f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--no-sync")
        self.run(f"{PG_BIN}/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "postgres.log"),
                 "-w", "-t", "60", "-o",
                 f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off", "start")
        self.run(f"{PG_BIN}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q",
                 "-v", "ON_ERROR_STOP=1", "-c", "CREATE ROLE alcove LOGIN",
                 "-c", "CREATE DATABASE alcove OWNER alcove")
        self.url = f"postgres://alcove@127.0.0.1:{self.port}/alcove"

    def run(self, *cmd):
        r = subprocess.run(self.owner + list(cmd), capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd[0]}: {r.stdout}{r.stderr}"

    def stop(self):
        subprocess.run(self.owner + [f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class Replica:
    """One control-plane replica: its API port, its cluster listener, its data directory."""

    def __init__(self, cluster, name):
        self.name = name
        self.port = free_port()
        self.cluster_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = os.path.join(cluster.root, name)
        self.log = open(os.path.join(cluster.root, f"{name}.log"), "ab")
        self.proc = subprocess.Popen(
            [cluster.bin, "server", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.data,
             "--cluster-listen", f"127.0.0.1:{self.cluster_port}", "--blob-store", cluster.blobs,
             "--database-url", cluster.pg.url],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def healthy(self):
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


class Cluster:
    def __init__(self, root):
        self.root = root
        self.bin = os.environ["ALCOVE_BIN"]
        self.pg = Postgres()
        # The blob store: a directory all of them share, as a bucket would be.
        self.blobs_dir = os.path.join(root, "blobs")
        self.blobs = "file://" + self.blobs_dir
        a = Replica(self, "control-a")
        # The first replica makes the cluster token, the secrets and upload keys and the first
        # API key; the second gets copies of the keys, as replicas of one deployment share them.
        wait_for("the first replica's API key", lambda: os.path.exists(os.path.join(a.data, "api-key")), 120)
        b_data = os.path.join(root, "control-b")
        os.makedirs(b_data, mode=0o700)
        for f in ["cluster.token", "secrets.key", "upload.key"]:
            if os.path.exists(os.path.join(a.data, f)):
                shutil.copy2(os.path.join(a.data, f), os.path.join(b_data, f))
        b = Replica(self, "control-b")
        self.replicas = [a, b]
        self.url = a.url
        self.data = a.data
        self.token = os.path.join(a.data, "cluster.token")
        self.nodes = {}
        for i in range(NODES):
            self.start_node(f"node-{i}")
        wait_for("the API of both replicas", lambda: a.healthy() and b.healthy(), 120)
        with open(os.path.join(a.data, "api-key")) as f:
            self.key = f.read().strip()
        self.http = httpx.Client(base_url=a.url, headers={"X-API-KEY": self.key}, timeout=120)
        self.http_b = httpx.Client(base_url=b.url, headers={"X-API-KEY": self.key}, timeout=120)
        self.turn = 0

    def start_node(self, name, prefix=(), warm=1):
        """Starts node `name`; `prefix` goes before its command line (a wrapper that runs it)."""
        data = os.path.join(self.root, name)
        log = open(os.path.join(self.root, f"{name}.log"), "ab")
        proc = subprocess.Popen(
            [*prefix, self.bin, "node", "--server",
             ",".join(f"http://127.0.0.1:{r.cluster_port}" for r in self.replicas),
             "--token-file", self.token, "--listen", "127.0.0.1:0", "--node-id", name,
             # The jail's default uid range, as the main suite's server: a uid owned by a running
             # process is never handed out again, whichever Alcove process runs it, and the
             # shared templates keep one group.
             "--data-dir", data, "--blob-store", self.blobs, "--warm-pool", f"{TEMPLATE}={warm}", "--max-vms", "12"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.nodes[name] = (proc, data)

    def sdk(self, replica=None):
        """The SDK's settings for one replica; by default the replicas take turns."""
        if replica is None:
            replica = self.turn % len(self.replicas)
            self.turn += 1
        url = self.replicas[replica].url
        return {"api_key": self.key, "api_url": url, "sandbox_url": url}

    def create(self, template=TEMPLATE, **kw):
        return Sandbox.create(template, timeout=600, **self.sdk(), **kw)

    def node_of(self, sandbox_id):
        """The running node whose data directory holds the sandbox's record (a node killed with
        -9 leaves its records behind)."""
        for name, (proc, data) in self.nodes.items():
            if proc.poll() is not None:
                continue
            base = os.path.join(data, "sandboxes")
            for d in os.listdir(base) if os.path.isdir(base) else []:
                try:
                    with open(os.path.join(base, d, "record.json")) as f:
                        if f'"{sandbox_id}"' in f.read():
                            return name
                except OSError:
                    continue
        return None

    def record(self, sandbox_id):
        """The sandbox's record, read through the second replica (the first made most)."""
        r = self.http_b.get(f"/alcove/v1/sandboxes/{sandbox_id}")
        r.raise_for_status()
        return r.json()

    def close(self):
        procs = [p for p, _ in self.nodes.values()] + [r.proc for r in self.replicas]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        # A node killed with -9 leaves its VMs; they must not outlive the test.
        subprocess.run(["pkill", "-9", "-f", self.root], check=False)
        self.pg.stop()

    def wait_ready(self):
        """Every node up with its warm VM (before anything counts where creates go)."""
        wait_for(f"{NODES} nodes with a warm VM",
                 lambda: sum(p.get("ready", 0) for p in self.http.get("/alcove/v1/warm-pool").json()
                             if p.get("templateID") == TEMPLATE) >= NODES,
                 300)

    def print_logs(self):
        for name in ["control-a", "control-b", *self.nodes]:
            try:
                with open(os.path.join(self.root, f"{name}.log"), "rb") as f:
                    print(f"--- {name} log (tail) ---")
                    print(f.read()[-4000:].decode(errors="replace"))
            except OSError:
                pass
