#!/usr/bin/env bash
# Quick start: installs what the host needs, builds the binaries and the default templates, then
# starts the Alcove server on localhost.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
if ./target/release/alcove server --help >/dev/null 2>&1; then
  exec ./target/release/alcove server --listen "${ALCOVE_LISTEN:-127.0.0.1:3000}" --data-dir "${ALCOVE_DATA_DIR:-/var/lib/alcove}"
fi
cat <<EOS
Alcove is built and the base template is ready. Try:
  ./target/release/alcove sandbox create
  ./target/release/alcove sandbox exec <id> 'python3 -c "print(6*7)"'
EOS
