#!/usr/bin/env bash
# Builds the guest kernel (PVH vmlinux) from Debian's linux-source-6.1 and our committed `config`.
# Output: $ALCOVE_CACHE/kernel/<key>/vmlinux, where <key> hashes the config, this script and the
# Debian source package version, so an unchanged recipe is a cache hit and prints the path at once.
# Prints the vmlinux path on stdout; progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ALCOVE_CACHE:-$HOME/.cache/alcove}
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( (cat "$here/config" "$here/build.sh"; echo "$srcver") | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -s "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi
echo "[kernel] building guest kernel $key from linux-source-6.1 $srcver (about 7 min on 2 cores)" >&2
work="$cache/kernel/build-$key"
rm -rf "$work"
mkdir -p "$work"
tar -xf /usr/src/linux-source-6.1.tar.xz -C "$work"
cd "$work/linux-source-6.1"
cp "$here/config" .config
make -s olddefconfig
start=$(date +%s)
# Progress: one line per 200 compiled objects, so a long build is visibly alive.
make -j"$(nproc)" vmlinux 2>&1 | awk '/^  CC/ {n++; if (n % 200 == 0) {printf "[kernel] %d objects compiled\n", n > "/dev/stderr"}} /error|Error/ {print > "/dev/stderr"}'
[ -s vmlinux ] || { echo "[kernel] build failed: no vmlinux" >&2; exit 1; }
mkdir -p "$out.tmp"
strip --strip-debug -o "$out.tmp/vmlinux" vmlinux
cp .config "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
cd /
rm -rf "$work"
echo "[kernel] built in $(( $(date +%s) - start )) s" >&2
echo "$out/vmlinux"
