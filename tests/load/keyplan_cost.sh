#!/usr/bin/env bash
# What key-level limits (issue 15 item 3) cost on the request path, with
# Redis counters: Redis commands per request (INFO commandstats deltas,
# scripts and the commands they run) and gateway CPU per request, for a
# key without a plan of its own and for a key whose plan adds two windows
# (docs/LIMITER.md "Key-level limits, measured").
#
#   tests/load/keyplan_cost.sh [N [ROUNDS]]   # N requests per key (2000), ROUNDS
#                                             # alternating rounds (1; for the CPU figure)
#
# Environment: PLANGATE_BIN (default target/release/plangate, else
# target/debug/plangate), PG_ADMIN (postgres://postgres@127.0.0.1:5432/postgres).
# Starts its own redis-server (port 16499, so its commandstats are its own),
# mock upstream and gateway, and a fresh database it drops at the end.
# Requests are sequential (one curl, one keep-alive connection): the counts
# are exact; the CPU figure is only as quiet as the machine. CALLGRIND=1
# runs the gateway under valgrind's callgrind and reports instructions per
# request instead (exact, whatever the load; slow: use N of a few hundred);
# CALLGRIND_KEEP=DIR keeps each phase's profile for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-2000}
ROUNDS=${2:-1}
BIN=${PLANGATE_BIN:-}
if [ -z "$BIN" ]; then
  BIN=target/release/plangate
  [ -x "$BIN" ] || BIN=${CARGO_TARGET_DIR:-target}/release/plangate
  [ -x "$BIN" ] || BIN=${CARGO_TARGET_DIR:-target}/debug/plangate
fi
PG_ADMIN=${PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}
DB=plangate_keyplan_$$
PG_URL=${PG_ADMIN%/*}/$DB
P_REDIS=16499 P_MOCK=18480 P_GW=18481 P_ADMIN=18482
OUT=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  rm -rf "$OUT"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning >"$OUT/redis.log" 2>&1 &
PIDS+=($!)
"$BIN" mock --listen "127.0.0.1:$P_MOCK" >"$OUT/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$P_REDIS"; wait_port "$P_MOCK"

BIG=1000000000000
cat >"$OUT/plans.yaml" <<YAML
default_plan: bench
plans:
  bench:
    endpoints:
      "gpt-bench":
        fixed_windows:
          - { window: 60s, limit: $BIG, unit_type: request }
          - { window: 86_400s, limit: $BIG, unit_type: request }
          - { window: 60s, limit: $BIG, unit_type: token }
  bench-key:                      # a key's own plan: two more windows
    endpoints:
      "gpt-bench":
        fixed_windows:
          - { window: 60s, limit: $BIG, unit_type: request }
          - { window: 60s, limit: $BIG, unit_type: token }
YAML
cat >"$OUT/plangate.toml" <<TOML
[server]
listen = "127.0.0.1:$P_GW"
[admin]
listen = "127.0.0.1:$P_ADMIN"
token = "keyplan-cost-admin-token"
[storage]
postgres_url = "$PG_URL"
redis_url = "redis://127.0.0.1:$P_REDIS"
store_timeout = "2s"
[plans]
file = "plans.yaml"
watch = false
[[upstreams]]
name = "mock"
url = "http://127.0.0.1:$P_MOCK"
[[routes]]
path = "/v1/chat/completions"
upstream = "mock"
endpoint = "{model}"
usage.token = ["body:usage.total_tokens"]
TOML
"$BIN" migrate --postgres-url "$PG_URL" >/dev/null
"$BIN" plans apply "$OUT/plans.yaml" --postgres-url "$PG_URL" >/dev/null
"$BIN" accounts create acct --postgres-url "$PG_URL" >/dev/null
PLAIN=$("$BIN" keys create acct --json --postgres-url "$PG_URL" | jq -r .key)
KEYED=$("$BIN" keys create acct --plan bench-key --json --postgres-url "$PG_URL" | jq -r .key)
if [ "${CALLGRIND:-0}" = 1 ]; then
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p" \
    "$BIN" serve --config "$OUT/plangate.toml" >"$OUT/gw.log" 2>&1 &
else
  RUST_LOG=warn "$BIN" serve --config "$OUT/plangate.toml" >"$OUT/gw.log" 2>&1 &
fi
GW=$!
PIDS+=($GW)
for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/"$P_GW") 2>/dev/null && break; sleep 0.1; done
wait_port "$P_GW"

cpu_ticks() { local s=0 t f; for t in /proc/"$1"/task/*/stat; do f=$(sed 's/.*) //' "$t" 2>/dev/null) || continue; set -- $f; s=$((s + ${12} + ${13})); done; echo "$s"; }
HZ=$(getconf CLK_TCK)
stats() { redis-cli -p "$P_REDIS" info commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_/ { sub("cmdstat_", "", $1); print $1, $3 }' | sort; }
run() { # label key
  local cfg="$OUT/curl-$1.cfg"
  : >"$cfg"
  for _ in $(seq "$N"); do
    printf 'url = "http://127.0.0.1:%s/v1/chat/completions"\noutput = /dev/null\nwrite-out = "%%{http_code}\\n"\n' "$P_GW" >>"$cfg"
  done
  # Warm up (window counters created, scripts loaded, caches filled).
  curl -s -o /dev/null -H "authorization: Bearer $2" -H 'content-type: application/json' \
    -d '{"model":"gpt-bench","messages":[]}' "http://127.0.0.1:$P_GW/v1/chat/completions"
  sleep 1
  redis-cli -p "$P_REDIS" config resetstat >/dev/null
  [ "${CALLGRIND:-0}" = 1 ] && callgrind_control -z "$GW" >/dev/null
  local c0; c0=$(cpu_ticks "$GW")
  curl -s -K "$cfg" -H "authorization: Bearer $2" -H 'content-type: application/json' \
    -d '{"model":"gpt-bench","messages":[]}' | sort | uniq -c | awk '{ printf "  status %s x %s\n", $2, $1 }'
  sleep 1 # let the outbox writer flush what these requests appended
  local c1; c1=$(cpu_ticks "$GW")
  if [ "${CALLGRIND:-0}" = 1 ]; then
    rm -f "$OUT"/cg.*.[0-9]*
    callgrind_control -d "$GW" >/dev/null
    [ -n "${CALLGRIND_KEEP:-}" ] && cat "$OUT"/cg.*.[0-9]* >"$CALLGRIND_KEEP/$1.$round.callgrind"
    local ir
    ir=$(cat "$OUT"/cg.*.[0-9]* | awk '/^summary:/ { s += $2 } END { print s }')
    awk -v ir="$ir" -v n="$N" -v label="$1" 'BEGIN { printf "%-8s %.0f instructions/req in the gateway (callgrind, every thread)\n", label, ir / n }'
  fi
  stats >"$OUT/stats-$1.txt"
  awk -v n="$N" -v label="$1" -v ticks="$((c1 - c0))" -v hz="$HZ" '
    { total += $2; if ($1 ~ /^eval/) scripts += $2; per[$1] = $2 }
    END {
      printf "%-8s %6.2f script calls/req  %6.2f commands/req (scripts and the commands they run)  gateway CPU %.0f us/req\n", label, scripts / n, total / n, ticks * 1e6 / hz / n
      for (c in per) printf "           %-18s %7.2f /req\n", c, per[c] / n
    }' "$OUT/stats-$1.txt"
}
echo "$N sequential requests per key, $BIN"
for round in $(seq "$ROUNDS"); do
  echo "round $round"
  run plain "$PLAIN"
  run keyplan "$KEYED"
done
