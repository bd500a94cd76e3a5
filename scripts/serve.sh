#!/usr/bin/env bash
# Quick start: installs what the host needs, builds the binaries and the default templates, then
# starts the Alcove server on localhost (SQLite in the data dir, no other service). It prints the
# three environment variables that point the E2B SDKs at it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
exec ./target/release/alcove server \
  --listen "${ALCOVE_LISTEN:-127.0.0.1:3000}" \
  --data-dir "${ALCOVE_DATA_DIR:-$HOME/.local/share/alcove}"
