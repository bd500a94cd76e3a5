#!/usr/bin/env bash
# Stops the registry tests/registry/start.sh DIR started (by its pid file) and removes DIR.
set -euo pipefail
dir=${1:?usage: stop.sh DIR}
if [ -f "$dir/registry.pid" ]; then
  kill "$(cat "$dir/registry.pid")" 2>/dev/null || true
fi
rm -rf "$dir"
