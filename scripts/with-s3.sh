#!/usr/bin/env bash
# Runs a command beside a private S3-compatible server: moto's (from PyPI, pinned below, in a
# virtualenv under ~/.cache/alcove keyed by that pin), listening on 127.0.0.1 at a free port, with
# one empty bucket, stopped when the command ends. The command gets the AWS_* variables that
# reach it (endpoint, fake credentials, region, plain http) and ALCOVE_TEST_S3_URL, an s3:// URL
# of the bucket with a prefix, for `--blob-store`.
#
#   scripts/with-s3.sh scripts/test-packages.sh alcove-cluster
set -euo pipefail
MOTO="moto[server]==5.2.6"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/alcove/moto-$(printf '%s' "$MOTO" | sha256sum | cut -c1-16)"
if [ ! -x "$cache/bin/moto_server" ]; then
  echo "[with-s3] installing $MOTO into $cache" >&2
  rm -rf "$cache.tmp"
  python3 -m venv "$cache.tmp"
  "$cache.tmp/bin/pip" install --quiet --disable-pip-version-check "$MOTO"
  rm -rf "$cache"
  mv "$cache.tmp" "$cache"
  # A venv's scripts name its path: made again where it now is.
  sed -i "1s|.*|#!$cache/bin/python3|" "$cache/bin/moto_server"
fi

dir=$(mktemp -d /tmp/alcove-s3.XXXXXX)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$cache/bin/moto_server" -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/', timeout=1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$pid" 2>/dev/null; then cat "$dir/moto.log" >&2; exit 1; fi
  sleep 0.2
done
export AWS_ENDPOINT="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=alcove-test AWS_SECRET_ACCESS_KEY=alcove-test
bucket=alcove-blobs
# A bucket is made by an unsigned PUT: moto does not check signatures.
python3 -c "import urllib.request; urllib.request.urlopen(urllib.request.Request('$AWS_ENDPOINT/$bucket', method='PUT'), timeout=10)"
export ALCOVE_TEST_S3_URL="s3://$bucket/test"
echo "[with-s3] moto S3 on 127.0.0.1:$port, bucket $bucket" >&2
"$@"
