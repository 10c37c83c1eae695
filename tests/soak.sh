#!/usr/bin/env bash
# The soak run of issue 6 (not part of CI): mixed traffic — streaming and
# not, allowed and denied, credits, upstream errors, bad keys, clients
# hanging up mid-request and mid-stream — against a real `plangate serve`
# on a fresh Postgres database and a private redis-server, then checks
# that RSS stayed flat, the in-flight gauge is back to 0, every Redis key
# has a TTL, and credits spent equal the ledger.
#
# Usage: tests/soak.sh [MINUTES] [WORKERS]     (default 10 minutes, 16 clients)
# Needs Postgres on 127.0.0.1:5432 (or PLANGATE_TEST_POSTGRES_URL) and the
# redis-server binary; ./tests/run.sh installs and starts both.
set -euo pipefail
cd "$(dirname "$0")/.."
export PLANGATE_REQUIRE_SERVICES=1
cargo build -p plangate --bins
cargo build -p plangate-tests --bin soak
exec target/debug/soak "${1:-10}" "${2:-16}"
