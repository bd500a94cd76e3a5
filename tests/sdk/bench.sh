#!/usr/bin/env bash
# SDK-driven benchmarks (tests/sdk/bench/bench.py) against an `alcove server` started here with a
# fresh data directory. Prints one JSON line per measurement (p50/p95/p99).
#
#   tests/sdk/bench.sh                    all modes: create burst code chart
#   tests/sdk/bench.sh create -n 30       one mode, 30 iterations
#   tests/sdk/bench.sh sequential -n 40   back-to-back creates from an idle pool
#   tests/sdk/bench.sh js -n 5            first JavaScript cell (Deno kernel start) vs Python
#   ALCOVE_WARM_POOL=base=4 tests/sdk/bench.sh cluster -n 20   through a cluster node vs single host
#   tests/sdk/bench.sh sustained --workers 4  creates for 5 minutes (ALCOVE_BENCH_SECONDS)
#   tests/sdk/bench.sh burst --burst 100      100 concurrent creates
#   tests/sdk/bench.sh drain -n 5             a node drained of 5 sandboxes (bench/bench_cluster.py)
#   tests/sdk/bench.sh moves -n 5             snapshots and templates moving between nodes
#   tests/sdk/bench.sh density --density 200  idle `minimal` sandboxes alive at once (--max-vms and
#                                             the team's running limit raised to fit)
#   tests/sdk/bench.sh mcp -n 50          run_command via `alcove mcp` vs the SDK (bench/bench_mcp.py)
#   tests/sdk/bench.sh egress -n 50       HTTPS through a secret-header rule (TLS intercepted) vs not
#   tests/sdk/bench.sh volume -n 5        dd throughput in the guest: a mounted volume vs the root disk
#   tests/sdk/bench.sh desktop -n 5       e2b-desktop: create -> first screenshot, screenshot round
#                                         trip, click -> change visible, idle memory (PSS)
#   ALCOVE_WARM_POOL="" tests/sdk/bench.sh template -n 10   custom templates (docs/benchmarks.md)
# Environment: ALCOVE_BIN (default target/release/alcove); ALCOVE_WARM_POOL (default
# base=20,code-interpreter-v1=2: enough for a burst of 20, plus desktop=2 when the desktop mode
# runs, or only that when it runs alone; `""` measures creates without a pool).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${ALCOVE_BIN:-$root/target/release/alcove}"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
data="$(mktemp -d "${TMPDIR:-/tmp}/alcove-bench.XXXXXX")"
# `net` mode: a host address the egress guard trusts (TEST-NET-2 on a veth), as in tests/sdk/run.sh.
ip link show alcove-inet >/dev/null 2>&1 || ip link add alcove-inet type veth peer name alcove-inet1
[[ $(ip -4 -o addr show dev alcove-inet) == *"inet 198.51.100.2/"* ]] || ip addr add 198.51.100.2/32 dev alcove-inet
ip link set alcove-inet up && ip link set alcove-inet1 up
# `egress` mode: the test internet's DNS zone (served by bench.py) and its CA, as in tests/sdk/run.sh.
if [[ " $* " == *" egress "* ]]; then
    "$here/test-internet-tls.sh" "$data/tls"
    export ALCOVE_DNS_UPSTREAM=198.51.100.2:5353 ALCOVE_EGRESS_CA="$data/tls/ca.pem" ALCOVE_BENCH_TLS="$data/tls"
fi
# `desktop` mode: a small pool of desktop VMs (2 GiB each; creates are measured one at a time),
# and none of the others' when it runs alone, so their filling does not share the cores with it.
pool="base=20,code-interpreter-v1=2"
if [[ " $* " == *" desktop "* ]]; then
    others=""
    for a in "$@"; do
        if [[ $a =~ ^(create|burst|code|chart|net|egress|template|mcp|volume|js|sequential|cluster|drain|moves|density|sustained)$ ]]; then others=1; fi
    done
    pool="${others:+$pool,}desktop=2"
fi
# `density` mode: room for the sandboxes it keeps (the defaults are 40 VMs per 24 GiB host, each
# counted at 512 MiB, and 100 running per team), and a warm pool of one `minimal` VM only.
extra=()
if [[ " $* " == *" density "* ]]; then
    want=200
    for ((i = 1; i < $#; i++)); do [[ ${!i} == --density ]] && { j=$((i + 1)); want=${!j}; }; done
    export ALCOVE_MAX_VMS="${ALCOVE_MAX_VMS:-$((want + 10))}"
    extra=(--max-sandboxes "$((want + 10))")
    pool="minimal=1"
fi
ALCOVE_WARM_POOL="${ALCOVE_WARM_POOL-$pool}" \
ALCOVE_EGRESS_TRUSTED=198.51.100.2/31 "$bin" server --listen "127.0.0.1:$port" --data-dir "$data/state" "${extra[@]}" >"$data/server.log" 2>&1 &
server_pid=$!
cleanup() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    pkill -9 -f "$data/state" 2>/dev/null || true
    # The server log outlives the run, for the cause of any failure the figures count.
    cp "$data/server.log" "${TMPDIR:-/tmp}/alcove-bench-server.log" 2>/dev/null || true
    rm -rf "$data"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && [[ -s "$data/state/api-key" ]] && break
    sleep 0.1
done
export E2B_API_URL="http://127.0.0.1:$port" E2B_SANDBOX_URL="http://127.0.0.1:$port" E2B_VOLUME_API_URL="http://127.0.0.1:$port"
# The `mcp` mode spawns `alcove mcp` (stdio) from the same binary.
export ALCOVE_BIN="$bin"
E2B_API_KEY="$(cat "$data/state/api-key")"
export E2B_API_KEY
venv="$root/tests/.venv"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/python/requirements.txt"
"$venv/bin/python" "$here/bench/bench.py" "$@"
