#!/usr/bin/env bash
# Runs the test binaries of some workspace packages, as `cargo test --release --workspace` built
# them, without building them again for a narrower feature set (`cargo test -p` would: features
# are resolved for the packages asked for, so the whole dependency tree is rebuilt). Each binary
# runs from its package's directory, as cargo runs it.
#
#   scripts/test-packages.sh alcove-store alcove-api
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }
list=$(mktemp)
trap 'rm -f "$list"' EXIT
cargo test --locked --release --workspace --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, os, sys
wanted = set(sys.argv[1:])
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m.get("profile", {}).get("test"):
        continue
    name = m["package_id"]
    # package_id: "path+file:///…/crates/store#alcove-store@0.1.0" (or "name version (…)")
    pkg = name.split("#")[1].split("@")[0] if "#" in name else name.split()[0]
    if pkg in wanted:
        print(os.path.dirname(m["manifest_path"]), m["executable"])
' "$@" >"$list"
[ -s "$list" ] || { echo "test-packages: no test binaries of $* (did the workspace build?)" >&2; exit 1; }
status=0
while read -r dir exe; do
  echo "[test-packages] $(basename "$exe")" >&2
  (cd "$dir" && "$exe") || status=1
done <"$list"
exit $status
