#!/usr/bin/env bash
# Regenerates guest/kernel/config from alcove.fragment: tinyconfig + our options + olddefconfig.
# Needs linux-source-6.1 (scripts/setup-host.sh installs it). Run after editing the fragment.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xf /usr/src/linux-source-6.1.tar.xz -C "$work"
cd "$work"/linux-source-6.1
make -s tinyconfig >/dev/null
args=()
while read -r line; do
  line=${line%%#*}
  for opt in $line; do
    case "$opt" in
      -*) args+=(-d "${opt#-}") ;;
      *) args+=(-e "$opt") ;;
    esac
  done
done <"$here/alcove.fragment"
scripts/config "${args[@]}" --set-val NR_CPUS 16
make -s olddefconfig >/dev/null
# A second pass: some options only appear once their parents are on.
scripts/config "${args[@]}" --set-val NR_CPUS 16
make -s olddefconfig >/dev/null
missing=0
while read -r line; do
  line=${line%%#*}
  for opt in $line; do
    case "$opt" in -*) continue ;; esac
    grep -q "^CONFIG_${opt}=y" .config || { echo "not set after olddefconfig: $opt" >&2; missing=1; }
  done
done <"$here/alcove.fragment"
cp .config "$here/config"
exit $missing
