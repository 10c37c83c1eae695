#!/usr/bin/env bash
# The secrets check of issue 6 over a whole test run: every log written by
# the gateways the tests started (plangate serve processes and in-process
# gateways, collected in PLANGATE_TEST_LOG_DIR by tests/run.sh) must
# contain no API key (pg_ + 43 base62 characters, the only form plangate
# issues) and none of the admin tokens the tests use.
#
# Usage: tests/scan_logs.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: tests/scan_logs.sh DIR}
files=$(find "$dir" -type f -name '*.log' | wc -l)
lines=$(find "$dir" -type f -name '*.log' -exec cat {} + | wc -l)
if [ "$files" -eq 0 ]; then
  echo "scan_logs: no logs in $dir: the tests wrote none (is PLANGATE_TEST_LOG_DIR passed through?)" >&2
  exit 1
fi
# The admin tokens the test harness configures.
mapfile -t tokens < <(grep -hoE 'ADMIN_TOKEN: &str = "[^"]+"' tests/src/*.rs | sed -E 's/.*"(.*)"/\1/')
if [ "${#tokens[@]}" -eq 0 ]; then
  echo "scan_logs: found no admin tokens in tests/src" >&2
  exit 1
fi
leaks=0
if grep -rEoh 'pg_[A-Za-z0-9]{43}' "$dir" >/dev/null; then
  echo "scan_logs: API keys in the logs:" >&2
  grep -rEn 'pg_[A-Za-z0-9]{43}' "$dir" | cut -c1-300 | head -20 >&2
  leaks=1
fi
for t in "${tokens[@]}"; do
  if grep -rFq -- "$t" "$dir"; then
    echo "scan_logs: admin token ${t:0:4}… in the logs:" >&2
    grep -rFn -- "$t" "$dir" | cut -c1-300 | head -20 >&2
    leaks=1
  fi
done
echo "scan_logs: $files logs, $lines lines, ${#tokens[@]} admin tokens and every pg_ key pattern checked: $([ $leaks = 0 ] && echo 'no secret found' || echo LEAKED)" >&2
exit $leaks
