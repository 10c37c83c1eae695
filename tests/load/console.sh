#!/usr/bin/env bash
# Page weight and load time of each console page with 100,000 accounts in
# Postgres (issue 16's figures).
#
# Seeds a fresh database (100,000 accounts with a credit block each,
# 300,000 usage events over 30 days, 3,000 of them on the account shown),
# starts `plangate serve` on it, signs in with curl and fetches every page
# RUNS times: bytes (HTML, then the CSS and JS, cached by the browser) and
# the median and worst time to the last byte. Also prints the plan of the
# accounts search.
#
# Usage: tests/load/console.sh [ACCOUNTS] [RUNS]
#   PLANGATE_BIN (default target/debug/plangate; a release build is faster)
#   PG (default postgres://postgres@127.0.0.1:5432), REDIS (redis://127.0.0.1:6379/9)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-100000}
RUNS=${2:-20}
BIN=${PLANGATE_BIN:-target/debug/plangate}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
REDIS=${REDIS:-redis://127.0.0.1:6379/9}
DB="console_bench_$$"
DIR=$(mktemp -d -t plangate-console-bench.XXXXXX)
TOKEN="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MAIN=$(free_port); ADMIN=$(free_port)
cleanup() {
  [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT
cp config/plans.yaml "$DIR/plans.yaml"
cat >"$DIR/plangate.toml" <<EOF
[server]
listen = "127.0.0.1:$MAIN"
[admin]
listen = "127.0.0.1:$ADMIN"
token = "$TOKEN"
[storage]
postgres_url = "$PG/$DB"
redis_url = "$REDIS"
[plans]
file = "plans.yaml"
[[upstreams]]
name = "mock"
url = "http://127.0.0.1:9"
[[routes]]
path = "/v1/chat/completions"
upstream = "mock"
endpoint = "{model}"
usage.token = ["body:usage.total_tokens"]
[[routes]]
path = "/v1/images/generations"
upstream = "mock"
endpoint = "dall-e-3"
reserve.image = "body:n"
EOF
"$BIN" migrate --config "$DIR/plangate.toml" >/dev/null
echo "seeding $N accounts, $N credit blocks, 300,000 usage events ..." >&2
psql -q -v ON_ERROR_STOP=1 "$PG/$DB" <<EOF
INSERT INTO accounts (id, metadata, created_at)
  SELECT 'cust-' || lpad(i::text, 6, '0'), '{}', now() FROM generate_series(1, $N) i;
INSERT INTO quota_blocks (id, account_id, credits_granted, credits_remaining, expires_at, created_at)
  SELECT 'qb_' || i, 'cust-' || lpad(i::text, 6, '0'), 1000, 1000 - (i % 1000),
         now() + interval '90 days', now()
  FROM generate_series(1, $N) i;
INSERT INTO usage_events (ended_at, started_at, credits, status, degraded, streamed, cut_short,
                          request_id, account_id, key_id, endpoint, route, units)
  SELECT now() - (i % 43200) * interval '1 minute', now() - (i % 43200) * interval '1 minute',
         1, 200, false, false, false, 'req-' || i,
         CASE WHEN i % 100 = 0 THEN 'cust-004242' ELSE 'cust-' || lpad((i % $N + 1)::text, 6, '0') END,
         NULL, CASE WHEN i % 3 = 0 THEN 'gpt-4o' ELSE 'gpt-4o-mini' END, '/v1/chat/completions',
         jsonb_build_object('token', jsonb_build_array(100 + i % 900, 0))
  FROM generate_series(1, 300000) i;
ANALYZE;
EOF
RUST_LOG=warn "$BIN" serve --config "$DIR/plangate.toml" 2>"$DIR/serve.log" &
PID=$!
up=0
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN/healthz" >/dev/null && up=1 && break; sleep 0.1; done
[ $up = 1 ] || { echo "plangate serve did not start:" >&2; cat "$DIR/serve.log" >&2; exit 1; }
UI="http://127.0.0.1:$ADMIN/ui"
JAR="$DIR/jar"
NONCE=$(curl -s -c "$JAR" -b "$JAR" "$UI/login" | grep -o 'name="csrf" value="[0-9a-f]*"' | sed 's/.*value="//;s/"//')
# The token goes in the body from a file, never on a command line.
printf 'csrf=%s&token=%s' "$NONCE" "$TOKEN" >"$DIR/form"
curl -s -c "$JAR" -b "$JAR" --data-binary "@$DIR/form" -o /dev/null "$UI/login"
rm -f "$DIR/form"
css=$(curl -s -b "$JAR" "$UI/static/console.css" | wc -c)
js=$(curl -s -b "$JAR" "$UI/static/console.js" | wc -c)
printf '%-34s %8s %8s %8s\n' page "HTML KB" "p50 ms" "max ms"
for page in "/" "/accounts" "/accounts?q=cust-0424" "/accounts?q=cust-&after=cust-050000" \
            "/accounts/cust-004242" "/accounts/cust-004242/limits" "/plans"; do
  times=()
  for _ in $(seq "$RUNS"); do
    times+=("$(curl -s -b "$JAR" -o "$DIR/page" -w '%{time_total}' "$UI$page")")
  done
  size=$(wc -c <"$DIR/page")
  sorted=$(printf '%s\n' "${times[@]}" | sort -n)
  p50=$(echo "$sorted" | sed -n "$(( (RUNS + 1) / 2 ))p")
  max=$(echo "$sorted" | tail -1)
  awk -v p="$page" -v s="$size" -v a="$p50" -v m="$max" \
    'BEGIN { printf "%-34s %8.1f %8.1f %8.1f\n", p, s / 1024, a * 1000, m * 1000 }'
done
awk -v c="$css" -v j="$js" 'BEGIN { printf "assets (once, cached 1 h): console.css %.1f KB, console.js %.1f KB\n", c / 1024, j / 1024 }'
echo
echo "plan of the accounts search (prefix cust-0424, 51 rows, as catalog/postgres.rs runs it):"
psql -q "$PG/$DB" -c "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON)
  WITH d AS (SELECT id FROM plans WHERE is_default)
  SELECT a.id, a.plan_id, a.metadata, (SELECT id FROM d), a.billing_anchor,
    (SELECT LEAST(COALESCE(SUM(q.credits_remaining), 0), 9223372036854775807)::int8
       FROM quota_blocks q
       WHERE q.account_id = a.id AND (q.expires_at IS NULL OR q.expires_at > now())),
    (SELECT max(u.ended_at) FROM usage_events u WHERE u.account_id = a.id COLLATE \"C\")
  FROM accounts a
  WHERE a.id COLLATE \"C\" >= 'cust-0424' AND a.id COLLATE \"C\" < 'cust-0425'
  ORDER BY a.id COLLATE \"C\" LIMIT 51"
