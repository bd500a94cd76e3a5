"""Runs SDK suite modules against a cluster (cluster.py: Postgres, two control-plane replicas,
three nodes), the modules taking turns between the replicas, each in its own pytest process
configured only by E2B_API_URL and friends, as against a single server.

    python run_on_cluster.py test_commands.py test_files.py …

Exits non-zero when a module fails (or the cluster does not start); prints the cluster's logs
then.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from cluster import Cluster


def main(modules):
    root = tempfile.mkdtemp(prefix="alcove-cluster-")
    failed = []
    c = None
    try:
        c = Cluster(root)
        c.wait_ready()
        for i, module in enumerate(modules):
            replica = c.replicas[i % len(c.replicas)]
            env = dict(os.environ)
            env.update({
                "E2B_API_URL": replica.url,
                "E2B_SANDBOX_URL": replica.url,
                "E2B_VOLUME_API_URL": replica.url,
                "E2B_API_KEY": c.key,
            })
            # Single-server only: restarting that server, damaging its files, its DNS upstream.
            for var in ["ALCOVE_SDK_RESTART_SERVER", "ALCOVE_SDK_DATA_DIR", "ALCOVE_DNS_UPSTREAM",
                        "E2B_DOMAIN"]:
                env.pop(var, None)
            print(f"[cluster] {module} through {replica.name} ({replica.url})", flush=True)
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module],
                               env=env)
            if r.returncode != 0:
                failed.append(module)
    except Exception as e:
        print(f"[cluster] the cluster failed: {e}", flush=True)
        failed.append("(cluster)")
    finally:
        if c is not None:
            c.close()
            if failed:
                c.print_logs()
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"[cluster] failed: {' '.join(failed)}", flush=True)
        return 1
    print(f"[cluster] all {len(modules)} modules passed on the cluster", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
