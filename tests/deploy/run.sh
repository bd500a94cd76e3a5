#!/usr/bin/env bash
# Checks deploy/kubernetes, deploy/nomad and docs/cluster.md against the alcove binary's --help
# (check.py says what). Needs no root and starts nothing: it only runs `alcove ... --help`.
#   ALCOVE_BIN   the binary (default: target/debug/alcove; `cargo build -p alcove` makes it)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${ALCOVE_BIN:-$root/target/debug/alcove}
if [[ ! -x "$bin" ]]; then
  echo "tests/deploy: no alcove binary at $bin: build it with \`cargo build -p alcove\` or set ALCOVE_BIN" >&2
  exit 1
fi
ALCOVE_BIN=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
export ALCOVE_BIN
venv="$root/tests/.venv"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
exec "$venv/bin/python" "$here/check.py"
