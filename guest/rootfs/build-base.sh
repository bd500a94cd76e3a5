#!/usr/bin/env bash
# Builds the base guest root file system as a tarball with mmdebstrap (Debian bookworm, minbase plus
# packages.txt, a non-root user `user` with passwordless sudo, as in E2B's sandboxes).
# /etc/profile reads the uid from bash's $EUID when it can instead of forking `id -u`: the SDKs run
# every command through a login shell, and that fork was a quarter of its start-up under TCG.
# Output: $ALCOVE_CACHE/rootfs/<key>/base.tar, <key> hashing this script, packages.txt and the mirror.
# Prints the tarball path on stdout; progress goes to stderr. Needs root (scripts/setup-host.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ALCOVE_CACHE:-$HOME/.cache/alcove}
mirror=${ALCOVE_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
pkgs=$(sed -e 's/#.*//' "$here/packages.txt" | tr -s ' \n' ',' | sed -e 's/^,//' -e 's/,$//')
key=$( (cat "$here/build-base.sh" "$here/packages.txt"; echo "$mirror") | sha256sum | cut -c1-16)
out="$cache/rootfs/$key"
if [ -s "$out/base.tar" ]; then
  echo "$out/base.tar"
  exit 0
fi
mkdir -p "$out"
echo "[rootfs] mmdebstrap bookworm (minbase + $pkgs) from $mirror" >&2
start=$(date +%s)
mmdebstrap --variant=minbase --format=tar --include="$pkgs" \
  --aptopt='Acquire::Retries "3"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --customize-hook='chroot "$1" useradd --create-home --uid 1000 --shell /bin/bash --user-group user' \
  --customize-hook='echo "user ALL=(ALL:ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/user" && chmod 0440 "$1/etc/sudoers.d/user"' \
  --customize-hook='printf "[global]\nbreak-system-packages = true\n" > "$1/etc/pip.conf"' \
  --customize-hook='echo alcove > "$1/etc/hostname"; printf "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n" > "$1/etc/hosts"' \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  --customize-hook='sed -i "s/\"\$(id -u)\"/\"\${EUID:-\$(id -u)}\"/g" "$1/etc/profile"' \
  bookworm "$out/base.tar.tmp" "$mirror" 2>&1 | sed -u 's/^/[rootfs] /' >&2
mv "$out/base.tar.tmp" "$out/base.tar"
echo "[rootfs] built in $(( $(date +%s) - start )) s, $(du -h "$out/base.tar" | cut -f1)" >&2
echo "$out/base.tar"
