#!/usr/bin/env bash
# Installs host packages, builds the binaries (release) and the default templates (`base`, and
# `code-interpreter-v1` for the e2b-code-interpreter SDKs, `minimal` for exec-only work,
# `mcp-gateway` for `Sandbox.create(mcp=...)`; ALCOVE_TEMPLATES overrides the list).
# Everything is cached: a second run on an unchanged tree takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-host.sh
echo "[build] cargo build --release (alcove, alcove-agent)" >&2
cargo build --release --locked -p alcove -p alcove-agent
for t in ${ALCOVE_TEMPLATES:-base code-interpreter-v1 minimal mcp-gateway}; do
  ./target/release/alcove template build "$t"
done
