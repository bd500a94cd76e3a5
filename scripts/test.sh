#!/usr/bin/env bash
# Sets up everything and runs the whole test suite: formatting, lints, unit tests, then end-to-end
# tests on real microVMs restored from the built templates.
set -euo pipefail
cd "$(dirname "$0")/.."
export ALCOVE_AGENT_BIN="$PWD/target/release/alcove-agent"
# The default templates and the desktop (test_desktop.py), which the quick start leaves to be
# built on first use.
ALCOVE_TEMPLATES="${ALCOVE_TEMPLATES:-base code-interpreter-v1 minimal mcp-gateway desktop}" ./scripts/build.sh
echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "[test] unit and integration tests" >&2
cargo test --locked --release --workspace
echo "[test] the store and the API on Postgres (a private postgresql-15)" >&2
# (The binaries the step above built: `cargo test -p` would rebuild every dependency.)
scripts/with-postgres.sh scripts/test-packages.sh alcove-store alcove-api
echo "[test] the cluster's blob store on S3 (a private moto S3 server)" >&2
scripts/with-s3.sh scripts/test-packages.sh alcove-cluster
echo "[test] tests that need root (network namespaces, acting as other users)" >&2
cargo test --locked --release --workspace --exclude alcove-node -- --ignored
echo "[test] end-to-end tests on microVMs" >&2
cargo test --locked --release -p alcove-node --test e2e -- --include-ignored --test-threads=2
echo "[test] template builds in builder microVMs" >&2
cargo test --locked --release -p alcove-node --test build -- --include-ignored --test-threads=1
echo "[test] cluster deployment manifests and docs/cluster.md against the binary's --help" >&2
ALCOVE_BIN="$PWD/target/release/alcove" tests/deploy/run.sh
echo "[test] official E2B SDK suites (Python e2b, JS e2b) and the adversarial suite against alcove server" >&2
ALCOVE_BIN="$PWD/target/release/alcove" tests/sdk/run.sh
echo "[test] all passed" >&2
