"""A cluster on this host, through the official SDK (`docs/cluster.md`).

This module starts its own cluster: a private Postgres (Debian's postgresql-15), two control-plane
replicas (`alcove server --cluster-listen --database-url`, no VMs of their own) on that database,
and three `alcove node` processes heartbeating to both. Each node has its own data directory, jail
uid range and TLS link listener; they share the templates' cache, as nodes of one image would.
Creates alternate between the replicas, and records are read through the other one.

- Creates spread over the nodes, and each sandbox works: commands, files, pause and resume.
- A template built through the API (`Template.build`, a `COPY` and a `RUN`) is built in a
  builder microVM on one node, which receives the uploaded archive over the link (kept for that
  build only); its sandboxes,
  made through the other replica, go to that node; deleting it removes its files there.
- A network rule's secret is filled in by the egress proxy of the sandbox's node, which asks the
  control plane's store for it over the link (test_secret_egress.py's test internet), and the
  node's egress events reach the control plane's audit log.
- A snapshot's sandboxes and a fork's children go to the node that holds its files.
- Draining a node (asked of one replica; the other places the next creates) pauses its running
  sandboxes and moves every paused one to the blob store; each resumes on another node with its
  files and processes, a fork child too (its disk leaves flattened off the fork's layers). A
  snapshot taken there makes sandboxes elsewhere.
- `kill -9` of one node: within 10 s its running sandboxes are `lost` with a reason that names
  the node, a paused one stays paused and resumes on another node, a snapshot taken there makes
  a sandbox on another node (through the blob store), and creates go on on the others.
- `kill -9` of the replica on duty: SDK calls go on through the other, which takes the
  background duties over (it reaps a sandbox at its end).
- A node that joins without the template (its cache empty, at the same path, in a mount
  namespace of its own) takes it in from the blob store when the nodes that have it take no
  more sandboxes, and runs the sandbox.

Needs root and ALCOVE_BIN, like the rest of the real suite, and postgresql-15 (scripts/test.sh
installs it).
"""

import os
import shutil
import signal
import tempfile
import time
import uuid

import pytest
from e2b import ALL_TRAFFIC, Sandbox, Secret

from cluster import NODES, Cluster, wait_for
from conftest import TEMPLATE

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(request):
    root = tempfile.mkdtemp(prefix="alcove-cluster-")
    failed_before = request.session.testsfailed
    c = Cluster(root)
    started = False
    try:
        c.wait_ready()
        started = True
        yield c
    finally:
        c.close()
        if not started or request.session.testsfailed > failed_before:
            c.print_logs()
        shutil.rmtree(root, ignore_errors=True)


def test_creates_spread_over_the_nodes_and_each_sandbox_works(cluster):
    # Through one replica: each places from the nodes' last reports and its own decisions since,
    # so two replicas placing within one heartbeat may pick the same node.
    sbxs = [Sandbox.create(TEMPLATE, timeout=600, **cluster.sdk(0)) for _ in range(NODES)]
    try:
        where = [cluster.node_of(s.sandbox_id) for s in sbxs]
        assert None not in where, where
        assert len(set(where)) == NODES, f"creates were not spread: {where}"
        for i, s in enumerate(sbxs):
            assert s.commands.run("echo hi from $(hostname)").stdout.strip() == f"hi from {s.sandbox_id}"
            s.files.write("/home/user/note.txt", f"node {where[i]}")
            assert s.files.read("/home/user/note.txt") == f"node {where[i]}"
        s = sbxs[0]
        s.commands.run("echo kept > /home/user/kept.txt")
        s.pause()
        assert cluster.record(s.sandbox_id)["state"] == "paused"
        s.connect()
        assert s.files.read("/home/user/kept.txt").strip() == "kept"
        assert cluster.node_of(s.sandbox_id) == where[0]
    finally:
        for s in sbxs:
            s.kill()


def test_a_template_built_through_the_api_runs_on_its_node(cluster):
    from e2b import Template

    ctx = tempfile.mkdtemp(dir=cluster.root)
    with open(os.path.join(ctx, "hello.txt"), "w") as f:
        f.write("from the build context\n")
    name = f"cluster-built-{uuid.uuid4().hex[:8]}"
    t = (Template(file_context_path=ctx).from_template(TEMPLATE)
         .copy("hello.txt", "/home/user/hello.txt")
         .run_cmd("echo built-$((40+2)) > /home/user/run.txt"))
    logs = []
    info = Template.build(t, name, on_build_logs=logs.append, **cluster.sdk(0))
    msgs = [str(getattr(e, "message", "")) for e in logs]
    on = [m for m in msgs if m.startswith("Building on cluster node ")]
    assert len(on) == 1, msgs
    builder = on[0].rsplit(" ", 1)[1]
    assert builder in cluster.nodes, on
    # Its archive came to that node over the link (the sandboxes below read it), in a
    # directory of the build's own, which went with the build.
    assert os.listdir(os.path.join(cluster.nodes[builder][1], "build-files")) == []
    built = os.path.join(cluster.nodes[builder][1], "templates")
    keys = os.listdir(built)
    assert len(keys) == 1, keys
    # Through the other replica, which learns where the template is from the heartbeats.
    sbxs = [Sandbox.create(name, timeout=300, **cluster.sdk(1)) for _ in range(2)]
    try:
        for s in sbxs:
            assert cluster.node_of(s.sandbox_id) == builder
            assert s.files.read("/home/user/hello.txt") == "from the build context\n"
            assert s.commands.run("cat /home/user/run.txt").stdout.strip() == "built-42"
    finally:
        for s in sbxs:
            s.kill()
    r = cluster.http_b.delete(f"/templates/{info.template_id}")
    assert r.status_code == 204, r.text
    wait_for("the deleted template's files to go from its node",
             lambda: not os.path.exists(os.path.join(built, keys[0])), 30)
    with pytest.raises(Exception):
        Sandbox.create(name, timeout=60, **cluster.sdk(0))


def test_a_network_rule_fills_a_secret_on_the_sandboxs_node(cluster):
    import test_secret_egress as egress

    tls = os.environ.get("ALCOVE_SDK_TEST_TLS")
    if os.environ.get("ALCOVE_DNS_UPSTREAM") != "198.51.100.2:5353" or not tls:
        pytest.skip("the test internet and its CA are set up by tests/sdk/run.sh")
    egress.https_server("198.51.100.2", "a.test", tls)
    name = f"cluster-{uuid.uuid4().hex[:12]}"
    value = f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    Secret.create(name, value, **cluster.sdk(0))
    egress.EXPECTED["auth"] = f"Bearer {value}"
    try:
        # Made through the other replica: the node asks whichever answers.
        sbx = Sandbox.create(TEMPLATE, timeout=300, network={
            "allow_out": ["a.test"], "deny_out": [ALL_TRAFFIC],
            "rules": egress.rule_for("a.test", name)}, **cluster.sdk(1))
        try:
            node = cluster.node_of(sbx.sandbox_id)
            assert node is not None
            url = f"https://a.test:{egress.PORT}/check"
            assert sbx.commands.run(f"curl -sS {url}", timeout=60).stdout == "match"
            assert egress.SEEN["a.test"][-1] == f"Bearer {value}"
            # The node's egress events reach the control plane's audit log.
            def egress_recorded():
                r = cluster.http_b.get(f"/alcove/v1/sandboxes/{sbx.sandbox_id}/events?limit=10000")
                return r.status_code == 200 and any(
                    e["kind"] == "egress" and "a.test" in str(e) for e in r.json())
            wait_for("the node's egress events in the audit log", egress_recorded, 30)
            # The value stays out of the sandbox and the node's files.
            assert value not in sbx.commands.run("env", timeout=30).stdout
            assert egress.files_holding(value, [cluster.nodes[node][1]]) == []
            # A live update without rules ends it (the guest sees a.test's own certificate, and
            # no header is set); one with rules brings it back.
            sbx.update_network({"allow_out": ["a.test"], "deny_out": [ALL_TRAFFIC]})
            with open(f"{tls}/ca.pem") as f:
                sbx.files.write("/tmp/test-ca.pem", f.read())
            out = sbx.commands.run(f"curl -sS --cacert /tmp/test-ca.pem {url}", timeout=60)
            assert out.stdout == "nomatch"
            assert egress.SEEN["a.test"][-1] == ""
            sbx.update_network({"allow_out": ["a.test"], "deny_out": [ALL_TRAFFIC],
                                "rules": egress.rule_for("a.test", name)})
            assert sbx.commands.run(f"curl -sS {url}", timeout=60).stdout == "match"
        finally:
            sbx.kill()
    finally:
        Secret.destroy(name, **cluster.sdk(0))


def test_snapshots_and_forks_stay_on_the_node_with_their_files(cluster):
    src = cluster.create()
    made = []
    try:
        src.files.write("/home/user/cp.txt", "checkpoint")
        home = cluster.node_of(src.sandbox_id)
        snap = src.create_snapshot()
        s = Sandbox.create(snap.snapshot_id, timeout=600, **cluster.sdk())
        made.append(s)
        assert s.files.read("/home/user/cp.txt") == "checkpoint"
        assert cluster.node_of(s.sandbox_id) == home
        kids = src.fork(count=2)
        made.extend(k for k in kids if not isinstance(k, Exception))
        for k in kids:
            assert not isinstance(k, Exception), k
            assert k.files.read("/home/user/cp.txt") == "checkpoint"
            assert cluster.node_of(k.sandbox_id) == home
    finally:
        for s in made:
            s.kill()
        src.kill()


def test_a_drained_nodes_sandboxes_resume_elsewhere_with_their_files_and_processes(cluster):
    sbxs = [cluster.create() for _ in range(NODES + 1)]
    try:
        where = {s.sandbox_id: cluster.node_of(s.sandbox_id) for s in sbxs}
        victim = next(n for n in where.values() if list(where.values()).count(n) >= 2)
        mine = [s for s in sbxs if where[s.sandbox_id] == victim][:2]
        for i, s in enumerate(mine):
            s.files.write("/home/user/moved.txt", f"sandbox {i}")
            s.commands.run("sleep 3600", background=True)
        # A fork child (its disk on the fork's layers) and a snapshot, both on the victim.
        kid = mine[0].fork(count=1)[0]
        assert not isinstance(kid, Exception), kid
        sbxs.append(kid)
        assert cluster.node_of(kid.sandbox_id) == victim
        snap = mine[1].create_snapshot()
        mine[0].pause()  # one paused before the drain, the others still running
        # Asked of the second replica: the first places the creates below.
        r = cluster.http_b.post(f"/alcove/v1/nodes/{victim}/drain")
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["failed"] == [], report
        assert mine[1].sandbox_id in report["paused"], report
        assert {s.sandbox_id for s in mine + [kid]} <= set(report["moved"]), report
        # The first replica hears it from the node's next heartbeat (every second).
        wait_for(f"the first replica to see {victim} draining",
                 lambda: {n["nodeID"]: n for n in cluster.http.get("/alcove/v1/nodes").json()}
                 [victim]["draining"], 5)
        for s in mine:
            assert cluster.record(s.sandbox_id)["state"] == "paused"
            assert cluster.node_of(s.sandbox_id) is None, "the drained node kept its copy"
        for i, s in enumerate(mine):
            s.connect()
            assert cluster.node_of(s.sandbox_id) not in (victim, None)
            assert s.files.read("/home/user/moved.txt") == f"sandbox {i}"
            assert s.commands.run("pgrep -x sleep").stdout.strip(), "the process did not move"
        kid.connect()
        assert cluster.node_of(kid.sandbox_id) not in (victim, None)
        assert kid.files.read("/home/user/moved.txt") == "sandbox 0"
        assert kid.commands.run("pgrep -x sleep").stdout.strip(), "the fork's process did not move"
        kid.kill()
        # The snapshot makes sandboxes elsewhere now.
        s = Sandbox.create(snap.snapshot_id, timeout=600, **cluster.sdk())
        sbxs.append(s)
        assert cluster.node_of(s.sandbox_id) not in (victim, None)
        assert s.files.read("/home/user/moved.txt") == "sandbox 1"
        s.kill()
        # New sandboxes keep off the drained node, through either replica.
        extra = [cluster.create() for _ in range(2)]
        sbxs.extend(extra)
        for s in extra:
            assert cluster.node_of(s.sandbox_id) not in (victim, None)
    finally:
        for s in sbxs:
            s.kill()


def test_a_killed_node_loses_its_sandboxes_within_10_s_and_creates_go_on(cluster):
    sbxs = [cluster.create() for _ in range(NODES + 1)]
    where = {s.sandbox_id: cluster.node_of(s.sandbox_id) for s in sbxs}
    victim = next(n for n in where.values() if list(where.values()).count(n) >= 2)
    proc, _ = cluster.nodes[victim]
    on_victim = [s for s in sbxs if where[s.sandbox_id] == victim]
    # One of its sandboxes is paused: its copy is in the blob store, so it outlives the node.
    kept = on_victim.pop()
    kept.files.write("/home/user/kept.txt", "outlived its node")
    # A snapshot of it: copied to the blob store behind the call.
    snap = kept.create_snapshot()
    manifest = os.path.join(cluster.blobs_dir, "snapshots", snap.snapshot_id, "manifest.json")
    wait_for("the snapshot's copy in the blob store", lambda: os.path.exists(manifest), 120)
    kept.pause()
    others = [s for s in sbxs if s not in on_victim]
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        killed_at = time.time()
        for s in on_victim:
            rec = wait_for(f"{s.sandbox_id} lost",
                           lambda: (r := cluster.record(s.sandbox_id))["state"] == "lost" and r, 15)
            took = time.time() - killed_at
            assert took <= 10, f"reported lost after {took:.1f} s"
            reason = rec.get("reason") or str(rec)
            assert victim in reason and "heartbeat" in reason, rec
        assert cluster.record(kept.sandbox_id)["state"] == "paused"
        kept.connect()
        assert cluster.node_of(kept.sandbox_id) not in (victim, None)
        assert kept.files.read("/home/user/kept.txt") == "outlived its node"
        for s in others:
            assert s.commands.run("echo alive").stdout.strip() == "alive"
        # A create goes on, on another node: from the lost node's snapshot, through the blob
        # store. (The drained node takes none, and the last one's vCPUs are nearly all handed
        # out.)
        s = Sandbox.create(snap.snapshot_id, timeout=600, **cluster.sdk())
        others.append(s)
        assert cluster.node_of(s.sandbox_id) not in (victim, None)
        assert s.files.read("/home/user/kept.txt") == "outlived its node"
        assert s.commands.run("echo new").stdout.strip() == "new"
    finally:
        for s in others:
            s.kill()


def test_a_killed_replica_leaves_the_other_serving_and_on_duty(cluster):
    a, b = cluster.replicas
    via_a = Sandbox.create(TEMPLATE, timeout=600, **cluster.sdk(0))
    # Reaped at its end, 25 s from now: only a replica on duty does that.
    short = Sandbox.create(TEMPLATE, timeout=25, **cluster.sdk(1))
    made = [via_a]
    try:
        via_a.files.write("/home/user/a.txt", "made through a")
        # The first replica started first and holds the duties.
        with open(os.path.join(cluster.root, "control-a.log"), "rb") as f:
            assert b"now runs the background duties" in f.read()
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(30)
        # Its sandbox, through the other replica.
        s = Sandbox.connect(via_a.sandbox_id, **cluster.sdk(1))
        assert s.files.read("/home/user/a.txt") == "made through a"
        assert s.commands.run("echo via b").stdout.strip() == "via b"
        listed = {x.sandbox_id for x in Sandbox.list(**cluster.sdk(1)).next_items()}
        assert {via_a.sandbox_id, short.sandbox_id} <= listed, listed
        new = Sandbox.create(TEMPLATE, timeout=600, **cluster.sdk(1))
        made.append(new)
        assert new.commands.run("echo new").stdout.strip() == "new"
        # The second replica took the duties over: the short sandbox ends at its time.
        wait_for("the short sandbox reaped by the second replica",
                 lambda: cluster.record(short.sandbox_id)["state"] == "killed", 90)
        with open(os.path.join(cluster.root, "control-b.log"), "rb") as f:
            assert b"now runs the background duties" in f.read()
    finally:
        for x in made:
            try:
                Sandbox.kill(x.sandbox_id, **cluster.sdk(1))
            except Exception:
                pass


def test_a_node_without_the_template_takes_it_from_the_blob_store(cluster):
    # Through the second replica: the first was killed above.
    http = cluster.http_b
    nodes = http.get("/alcove/v1/nodes").json()
    # Every node that still takes sandboxes drains: only the newcomer will.
    for n in nodes:
        if n["up"] and not n["draining"]:
            r = http.post(f"/alcove/v1/nodes/{n['nodeID']}/drain")
            assert r.status_code == 200, r.text
    cache = os.environ.get("ALCOVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "alcove")
    fresh = os.path.join(cluster.root, "fresh-cache")
    os.makedirs(fresh)
    # Its own mount namespace: the cache path shows an empty directory to it alone.
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", fresh, cache]
    cluster.start_node("node-new", prefix=wrap, warm=0)
    wait_for("the new node to join",
             lambda: any(n["nodeID"] == "node-new" and n["up"]
                         for n in http.get("/alcove/v1/nodes").json()), 60)
    assert not os.path.exists(os.path.join(fresh, "templates", "by-name", TEMPLATE))
    s = Sandbox.create(TEMPLATE, timeout=600, **cluster.sdk(1))
    try:
        assert cluster.node_of(s.sandbox_id) == "node-new"
        assert s.commands.run("echo on the new node").stdout.strip() == "on the new node"
        # It came through the store, checked, into the new node's own cache.
        stored = os.listdir(os.path.join(cluster.blobs_dir, "templates"))
        assert len(stored) == 1, stored
        with open(os.path.join(fresh, "templates", "by-name", TEMPLATE)) as f:
            assert f.read().strip() == stored[0]
    finally:
        s.kill()
