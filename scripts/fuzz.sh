#!/usr/bin/env bash
# The long run of the property-based fuzz tests (docs/fuzzing.md): every parser that takes
# untrusted bytes, PROPTEST_CASES cases per property (100,000 unless set). Plain `cargo test`
# runs the same properties with 256 cases. Needs no root. A failure prints the minimal input and
# proptest saves its seed under the crate's proptest-regressions/: commit that file with the fix.
#
#   scripts/fuzz.sh                     # all of them, 100,000 cases each (about an hour on 2 cores)
#   PROPTEST_CASES=5000 scripts/fuzz.sh # shorter
#   scripts/fuzz.sh alcove-net          # one crate
set -euo pipefail
cd "$(dirname "$0")/.."

export PROPTEST_CASES="${PROPTEST_CASES:-100000}"
# a failing case is shrunk for at most this long
export PROPTEST_MAX_SHRINK_TIME="${PROPTEST_MAX_SHRINK_TIME:-60000}"

# crate -> the test target holding its properties (`tests/fuzz.rs` or a `fuzz` module)
targets=(
  "alcove-net --test fuzz"
  "alcove-envd-proto --test fuzz"
  "alcove-agent-client --test fuzz"
  "alcove-guest-contract --test fuzz"
  "alcove-image --test fuzz"
  "alcove-interpreter --lib fuzz::"
)

for t in "${targets[@]}"; do
  read -r crate rest <<<"$t"
  if [[ $# -gt 0 && ! " $* " == *" $crate "* ]]; then
    continue
  fi
  echo "== $crate: $PROPTEST_CASES cases per property"
  # release: the same code paths, about ten times the cases per minute
  # shellcheck disable=SC2086
  cargo test --release --locked -p "$crate" $rest -- --test-threads "$(nproc)"
done
