#!/usr/bin/env bash
# Starts a private OCI registry (Debian's docker-registry) on a free 127.0.0.1 port with its storage
# in DIR, pushes Alcove's test images to it, and prints `host:port`. Stop it with stop.sh DIR.
#
#   tests/registry/start.sh DIR              alcove-test/busybox-httpd:1, no auth
#   tests/registry/start.sh DIR USER PASS    alcove-test/private:1, htpasswd auth
#
# The test image: busybox (Debian's busybox-static) with Env PATH and GREETING, WorkingDir /www,
# Cmd ["/bin/busybox","httpd","-f","-p","8080","-h","/www"]. The server must be told the registry
# speaks plain HTTP: `alcove server --insecure-registry host:port`.
set -euo pipefail
dir=${1:?usage: start.sh DIR [USER PASS]}
user=${2:-}
pass=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
for bin in docker-registry htpasswd; do
  command -v "$bin" >/dev/null || { echo "start.sh: $bin missing: run scripts/setup-host.sh" >&2; exit 1; }
done
mkdir -p "$dir/data"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
addr="127.0.0.1:$port"
{
  printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s/data\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n' "$dir" "$addr"
  if [ -n "$user" ]; then
    htpasswd -Bbn "$user" "$pass" >"$dir/htpasswd"
    printf 'auth:\n  htpasswd:\n    realm: alcove-test\n    path: %s/htpasswd\n' "$dir"
  fi
} >"$dir/config.yml"
docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
echo $! >"$dir/registry.pid"
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
cargo run -q --manifest-path "$root/Cargo.toml" -p alcove-image --example push-test-images -- "$addr" $user $pass >&2
echo "$addr"
