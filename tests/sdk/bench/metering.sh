#!/usr/bin/env bash
# The cost of metering and run traces on command latency (docs/benchmarks.md): two servers
# that differ only in their flags (A_FLAGS, B_FLAGS; by default A meters every second and traces
# sandbox traffic, B meters hourly and does not trace), one sandbox on each, commands
# interleaved. Usage: tests/sdk/bench/metering.sh [N]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
bin="${ALCOVE_BIN:-$root/target/release/alcove}"
data="$(mktemp -d "${TMPDIR:-/tmp}/alcove-bench-metering.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pkill -9 -f "$data/" 2>/dev/null || true
    rm -rf "$data"
}
trap cleanup EXIT
start() { # NAME FLAGS...
    local port name="$1"
    shift
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    ALCOVE_WARM_POOL="" "$bin" server --listen "127.0.0.1:$port" --data-dir "$data/$name" \
        "$@" >"$data/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 300); do
        curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && [[ -s "$data/$name/api-key" ]] && break
        sleep 0.1
    done
    echo "http://127.0.0.1:$port $(cat "$data/$name/api-key")"
}
# shellcheck disable=SC2086 # the flags are words
start a ${A_FLAGS:---meter-interval 1s} >"$data/a.addr"
# shellcheck disable=SC2086
start b ${B_FLAGS:---meter-interval 1h --no-run-traces} >"$data/b.addr"
read -r A_URL A_KEY <"$data/a.addr"
read -r B_URL B_KEY <"$data/b.addr"
export A_URL A_KEY B_URL B_KEY
venv="$root/tests/.venv"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/sdk/python/requirements.txt"
"$venv/bin/python" "$here/bench_metering.py" "${1:-100}"
