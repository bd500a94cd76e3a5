#!/usr/bin/env bash
# Installs the Debian packages Alcove needs on the host (Debian 12 bookworm, run as root).
# Idempotent: a second run installs nothing and takes about a second.
set -euo pipefail

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup-host.sh must run as root (it installs Debian packages)" >&2
  exit 1
fi

# QEMU 10 comes from bookworm-backports: bookworm's QEMU 7.2 conflicts with the qemu-utils 10 these
# machines ship, and 7.2 lacks the `file:` migration URI that snapshots use.
src=/etc/apt/sources.list.d/alcove-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uri=${uri:-http://deb.debian.org/debian}
  log "adding bookworm-backports ($uri)"
  cat >"$src" <<EOS
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
  apt_updated=0
fi

need=()
for p in qemu-system-x86 mmdebstrap e2fsprogs busybox-static flex bison bc libelf-dev libssl-dev \
         linux-source-6.1 build-essential cpio xz-utils iproute2 nftables python3-venv socat curl \
         patchelf docker-registry apache2-utils openssl; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  log "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
# docker-registry is for tests, which start private registries on free ports: not its service.
if [ -d /run/systemd/system ] && systemctl is-enabled docker-registry >/dev/null 2>&1; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi
qemu-system-x86_64 --version | head -1 >&2
