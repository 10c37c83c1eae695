#!/usr/bin/env bash
# Runs plangate's property-based fuzz targets far longer than CI does
# (tests/run.sh uses PROPTEST_CASES=256): the targets in gateway/src/fuzz.rs
# (config, plans, SSE/JSON usage meter, duration format) and the
# "never panics" properties next to each parser.
#
# Usage: tests/fuzz.sh [CASES]          default 100000 cases per property
#        FUZZ_TIMEOUT=SECONDS tests/fuzz.sh   stop after this long (default 3600)
#
# A failure prints the minimal failing input; proptest also saves its seed
# under gateway/proptest-regressions/ so every later run (CI included)
# replays it first. Commit that file with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${1:-100000}"
# Shrinking a rare failure can take long; keep it bounded too.
export PROPTEST_MAX_SHRINK_ITERS="${PROPTEST_MAX_SHRINK_ITERS:-100000}"
echo "==> fuzzing with PROPTEST_CASES=$PROPTEST_CASES (timeout ${FUZZ_TIMEOUT:-3600}s)" >&2
start=$(date +%s)
timeout "${FUZZ_TIMEOUT:-3600}" cargo test -p plangate --lib -- --test-threads 2 \
  fuzz:: never_panic arbitrary_text yaml_like toml_like substitution \
  sse_ json_ duration_round_trips parse_never any_unit_name edited_example \
  server::edge::
echo "==> fuzzing passed in $(( $(date +%s) - start ))s" >&2
