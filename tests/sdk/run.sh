#!/usr/bin/env bash
# Runs the official E2B SDK suites (Python e2b==2.63.0, JS e2b@2.51.0, both unmodified) against
# an Alcove server started here on a free port with a fresh data directory.
#
#   tests/sdk/run.sh            real server: `alcove server` (needs the node backend wired in)
#   tests/sdk/run.sh --fake     control API only, against the fake-backend dev server
#                               (crates/api/examples/fake_server.rs): no VMs needed
#
# Environment: ALCOVE_BIN (default target/debug/alcove), SUITES ("python js security cluster" by
# default; `security` is the adversarial suite in tests/security/, real server only; `cluster`
# runs $CLUSTER_MODULES of the Python suite again, against a cluster of two control-plane
# replicas on a private Postgres and three nodes (python/run_on_cluster.py), real only), PYTEST_ARGS /
# NODE_TEST_ARGS / SECURITY_PYTEST_ARGS for extra arguments. The SDKs are configured only through
# E2B_API_URL, E2B_SANDBOX_URL, E2B_VOLUME_API_URL (the volume content API, on the same listener)
# and E2B_API_KEY. For the persistence tests the suites also get
# ALCOVE_SDK_RESTART_SERVER (a script that restarts the server on the same port and data
# directory, as an operator would) and ALCOVE_SDK_DATA_DIR (the server's data directory, where
# the tests damage a saved state on purpose). The real server also serves TLS for
# `alcove.localhost:<port>` with a certificate of `alcove tls init` (ALCOVE_SDK_TLS_CERT and
# ALCOVE_SDK_TLS_CA name it, for test_tls.py and test_desktop.py's browser, which is Debian's
# Chromium, installed here, driven by playwright-core from the JS suite's packages).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
mode=real
[[ "${1:-}" == "--fake" ]] && mode=fake
suites="${SUITES:-python js security cluster}"
# The Python suite's modules that also run against a cluster: sandboxes, commands, files, PTYs,
# the code interpreter, pause/resume and snapshots, ports. (Volumes are refused on a cluster;
# test_cluster.py covers template builds and secrets in network rules there; the rest reads the
# single server's own files.)
cluster_modules="${CLUSTER_MODULES:-test_commands.py test_files.py test_pty.py test_code_interpreter.py test_persistence.py test_control.py test_ports.py}"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
data="$(mktemp -d "${TMPDIR:-/tmp}/alcove-sdk.XXXXXX")"
log="$data/server.log"

if [[ $mode == fake ]]; then
    cargo build --quiet --manifest-path "$root/Cargo.toml" -p alcove-api --example fake_server
    server=("$root/target/debug/examples/fake_server" "127.0.0.1:$port" "$data/state")
else
    bin="${ALCOVE_BIN:-$root/target/debug/alcove}"
    [[ -n "${ALCOVE_BIN:-}" ]] || cargo build --quiet --manifest-path "$root/Cargo.toml" -p alcove
    server=("$bin" server --listen "127.0.0.1:$port" --data-dir "$data/state")
    # Metering (test_metering.py): a short tick, and spend warnings POSTed to a receiver the
    # test starts on this port with this secret.
    if [[ "$("$bin" server --help 2>/dev/null)" == *--meter-interval* ]]; then
        webhook_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
        webhook_secret="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
        server+=(--meter-interval 2s --webhook-url "http://127.0.0.1:$webhook_port/hook"
            --webhook-secret "$webhook_secret")
        export ALCOVE_SDK_WEBHOOK_PORT="$webhook_port" ALCOVE_SDK_WEBHOOK_SECRET="$webhook_secret"
    fi
    # The OCI test (test_templates.py): the local registry with the test image, started before
    # the server so the server can be told that this plain-HTTP registry is allowed.
    if [[ -f "$root/tests/registry/start.sh" ]] &&
        # The help is read whole before grep looks: `grep -q` leaving early would end the
        # pipe with SIGPIPE, and pipefail would make that "no such flag".
        [[ "$("$bin" server --help 2>/dev/null)" == *--insecure-registry* ]]; then
        # start.sh DIR starts the registry in the background, pushes the images, prints host:port.
        if reg="$(bash "$root/tests/registry/start.sh" "$data/registry" 2>"$data/registry.err" | tail -n1)" &&
            [[ -n "$reg" ]]; then
            server+=(--insecure-registry "$reg")
            export ALCOVE_SDK_REGISTRY="$reg"
        else
            echo "tests/registry/start.sh failed (the OCI test will fail):" >&2
            cat "$data/registry.err" >&2
        fi
    fi
    # TLS for the API and `<port>-<id>.<domain>` (test_desktop.py opens the stream's https link
    # in a real browser; the SDKs build links from the domain the server reports). The port rides
    # in the domain, and `*.localhost` is loopback for Chromium and the SDKs' resolvers; the
    # suites' own E2B_API_URL and E2B_SANDBOX_URL stay plain HTTP, which loopback still gets.
    if "$bin" tls --help >/dev/null 2>&1; then
        "$bin" tls init --domain "alcove.localhost:$port" --dir "$data/tls" >/dev/null
        server+=(--domain "alcove.localhost:$port" --tls-cert "$data/tls/cert.pem" --tls-key "$data/tls/key.pem")
        export ALCOVE_SDK_TLS_CERT="$data/tls/cert.pem" ALCOVE_SDK_TLS_CA="$data/tls/ca.pem"
        # For tests that route by host name (tests/security/test_tokens.py).
        export ALCOVE_SDK_DOMAIN="alcove.localhost:$port"
    fi
    # The real browser (test_desktop.py): Debian's Chromium, headless, driven by playwright-core.
    if [[ ! -x /usr/lib/chromium/chromium ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; }
    fi
    # Screenshots the browser tests keep (test_dashboard.py).
    export ALCOVE_TEST_ARTIFACTS="${ALCOVE_TEST_ARTIFACTS:-$root/target/test-artifacts}"
    # For the CLI tests (test_cli_client.py): the same binary, as a client of this server.
    export ALCOVE_BIN="$bin"
fi

# The test "internet" (tests/sdk/python/test_network.py): TEST-NET-2 addresses on a veth of this
# host, which the server's egress guard trusts (198.51.100.2-3) or not (198.51.100.1, a "host
# service"), and a DNS zone the tests serve on 198.51.100.2:5353. No outside address is used.
if [[ $mode == real ]]; then
    ip link show alcove-inet >/dev/null 2>&1 ||
        ip link add alcove-inet type veth peer name alcove-inet1
    have="$(ip -4 -o addr show dev alcove-inet)"
    for a in 198.51.100.1 198.51.100.2 198.51.100.3; do
        [[ $have == *"inet $a/"* ]] || ip addr add "$a/32" dev alcove-inet
    done
    ip link set alcove-inet up
    ip link set alcove-inet1 up
    export ALCOVE_EGRESS_TRUSTED=198.51.100.2/31 ALCOVE_DNS_UPSTREAM=198.51.100.2:5353
    # Its HTTPS (tests/sdk/python/test_secret_egress.py): a CA of its own, which the egress proxy
    # trusts for the real hosts behind network rules (--egress-ca), and a certificate for a.test
    # and b.test signed by it.
    tls="$data/test-internet-tls"
    "$here/test-internet-tls.sh" "$tls"
    export ALCOVE_EGRESS_CA="$tls/ca.pem" ALCOVE_SDK_TEST_TLS="$tls"
fi

# The server starts with the soft open-file limit most service managers give (systemd: 1024); it
# must raise its own (tests/security/test_abuse.py holds 10,000 connections open).
(ulimit -Sn 1024 && exec "${server[@]}") >"$log" 2>&1 &
server_pid=$!
echo "$server_pid" >"$data/server.pid"

# Restarts the server in place: SIGTERM, wait for it to go, start it again on the same port and
# data directory (appending to the same log), wait until it answers. Sandboxes live on.
restart="$data/restart-server.sh"
{
    echo '#!/usr/bin/env bash'
    echo 'set -euo pipefail'
    echo "old=\$(cat '$data/server.pid')"
    echo 'kill "$old" 2>/dev/null || true'
    echo 'for _ in $(seq 1 300); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done'
    echo 'ulimit -Sn 1024'
    printf '%q ' "${server[@]}"
    echo ">>'$log' 2>&1 </dev/null &"
    echo "echo \$! >'$data/server.pid'"
    echo "for _ in \$(seq 1 300); do curl -fsS 'http://127.0.0.1:$port/health' >/dev/null 2>&1 && exit 0; sleep 0.1; done"
    echo 'echo "the restarted server did not answer" >&2; exit 1'
} >"$restart"
chmod +x "$restart"
export ALCOVE_SDK_RESTART_SERVER="$restart"
export ALCOVE_SDK_DATA_DIR="$data/state"

cleanup() {
    server_pid="$(cat "$data/server.pid" 2>/dev/null || echo "$server_pid")"
    kill "$server_pid" 2>/dev/null || true
    # Not our child after a restart: wait by polling.
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    wait "$server_pid" 2>/dev/null || true
    # Sandboxes outlive a server by design (a restarted server re-attaches them); a test run's
    # must not outlive the run.
    pkill -9 -f "$data/state" 2>/dev/null || true
    if [[ -d "$data/registry" ]]; then
        bash "$root/tests/registry/stop.sh" "$data/registry" >/dev/null 2>&1 || true
    fi
    rm -rf "$data"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && [[ -s "$data/state/api-key" ]]; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "server exited during startup:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.1
done

export E2B_API_URL="http://127.0.0.1:$port"
export E2B_SANDBOX_URL="http://127.0.0.1:$port"
# Volume.read_file/write_file/...: the SDKs send the volume's token here (their default is
# https://api.<E2B_DOMAIN>).
export E2B_VOLUME_API_URL="http://127.0.0.1:$port"
E2B_API_KEY="$(cat "$data/state/api-key")"
export E2B_API_KEY
echo "server ($mode) on $E2B_API_URL, log $log"

# The Python suites' virtualenv (tests/.venv), with the packages of requirements file $1.
venv="$root/tests/.venv"
python_venv() {
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$1"
}

status=0
for suite in $suites; do
    case "$suite" in
    python)
        python_venv "$here/python/requirements.txt"
        marker=()
        [[ $mode == fake ]] && marker=(-m control)
        # test_desktop.py's browser is a Node script (js/lib/browser.mjs) with the JS suite's
        # packages.
        if [[ $mode != fake && -z ${npm_done:-} ]]; then
            (cd "$here/js" && npm ci --silent --no-audit --no-fund) && npm_done=1
        fi
        (cd "$here/python" && "$venv/bin/python" -m pytest -q "${marker[@]}" ${PYTEST_ARGS:-}) || status=1
        ;;
    js)
        [[ -n ${npm_done:-} ]] || (cd "$here/js" && npm ci --silent --no-audit --no-fund)
        pattern=()
        [[ $mode == fake ]] && pattern=(--test-name-pattern=control)
        (cd "$here/js" && node --test --test-concurrency=4 "${pattern[@]}" ${NODE_TEST_ARGS:-} test/) || status=1
        ;;
    security)
        # The adversarial suite (tests/security/README.md): as an attacker, against this same
        # server (it makes a second team's key with `alcove keys create`); test_chaos.py starts
        # and kills a server of its own.
        if [[ $mode == fake ]]; then
            echo "security: needs a real server, skipped with --fake"
            continue
        fi
        python_venv "$root/tests/security/requirements.txt"
        (cd "$root/tests/security" && "$venv/bin/python" -m pytest -q ${SECURITY_PYTEST_ARGS:-}) || status=1
        ;;
    cluster)
        if [[ $mode == fake ]]; then
            echo "cluster: needs real nodes, skipped with --fake"
            continue
        fi
        python_venv "$here/python/requirements.txt"
        # shellcheck disable=SC2086
        (cd "$here/python" && "$venv/bin/python" run_on_cluster.py $cluster_modules) || status=1
        ;;
    *) echo "unknown suite $suite" >&2; status=1 ;;
    esac
done

if [[ $status != 0 ]]; then
    echo "--- server log (tail) ---" >&2
    tail -n 50 "$log" >&2
fi
exit $status
