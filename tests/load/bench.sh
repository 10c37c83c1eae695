#!/usr/bin/env bash
# plangate load benchmark, side by side with nginx (issue 5, docs/PERFORMANCE.md).
#
#   tests/load/bench.sh                 # the core comparison (3 rounds x 4 targets x 10 s)
#   tests/load/bench.sh --scaling       # plus 100k accounts, 10 windows, concurrency, SSE
#   tests/load/bench.sh --latency       # plus fixed-rate latency at half of max load
#   tests/load/bench.sh --all           # everything
#
# Environment: PLANGATE_BIN=path measures that plangate binary instead.
# Options: --rounds N (3)  --duration S (10)  --connections C (50)
#          --threads T (2)  --accounts N (100000)  --no-build  --keep (leave
#          the servers running)  --only "target ..." (subset of targets).
#
# What it does, on this machine, as root:
#   1. installs wrk, nginx-light and redis-server from Debian if missing;
#   2. builds plangate --release once;
#   3. starts an nginx upstream that answers instantly (`return 200` with an
#      OpenAI chat completion carrying `usage`, or a 50-chunk SSE stream when
#      the request has `x-bench-stream: 1`), an nginx proxy_pass with upstream
#      keepalive, a private redis-server (clean INFO commandstats), a fresh
#      Postgres database, and plangate in several configurations;
#      (plus examples/bare_proxy, "hyper-floor": the same listener and upstream
#      client with no gateway logic, the floor plangate cannot go below);
#   4. runs wrk in ALTERNATING rounds over the targets (so drift, noise from
#      other processes and thermal effects hit every target alike) and prints
#      a markdown table: median requests/s, p50, p99, ratio to nginx from the
#      same rounds, plangate RSS (VmRSS) and Redis commands per request.
#
# Results go to tests/load/results/<timestamp>/ (gitignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
ARGS="$*"

ROUNDS=3
DURATION=10
CONNS=50
THREADS=2
ACCOUNTS=100000
BUILD=1
KEEP=0
SCALING=0
LATENCY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --accounts) ACCOUNTS=$2; shift 2 ;;
    --scaling) SCALING=1; shift ;;
    --latency) LATENCY=1; shift ;;
    --all) SCALING=1; LATENCY=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Ports (unusual ones, so a developer's running gateway is not disturbed).
P_UP=18101        # nginx upstream (instant answers)
P_NGINX=18102     # nginx proxy_pass -> upstream, keepalive
P_MEM=18103       # plangate, in-process catalog + counters
P_REDIS=18104     # plangate, Postgres catalog + Redis counters
P_PGMEM=18105     # plangate, Postgres catalog + in-process counters (100k keys)
P_FLOOR=18106     # examples/bare_proxy: plangate's listener + upstream client, no logic
P_REDIS_SRV=16399 # private redis-server
DB=plangate_bench
PG_ADMIN="postgres://postgres@127.0.0.1:5432/postgres"
PG_URL="postgres://postgres@127.0.0.1:5432/$DB"
ADMIN_TOKEN=bench-admin-token

OUT="$ROOT/tests/load/results/$(date +%Y%m%dT%H%M%S)"
mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"
log() { printf '==> %s\n' "$*" >&2; }

# --- 1. tools ---------------------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v redis-server >/dev/null || need+=(redis-server)
command -v psql >/dev/null || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
pg_isready -q -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not answering on 127.0.0.1:5432 (tests/run.sh starts it)" >&2; exit 1; }

# --- 2. build ----------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  log "building plangate --release"
  cargo build --release -q -p plangate --bin plangate --example bare_proxy
fi
# PLANGATE_BIN: measure another build (e.g. an older commit's binary).
PLANGATE="${PLANGATE_BIN:-$ROOT/target/release/plangate}"
[ -x "$PLANGATE" ] || { echo "no $PLANGATE (drop --no-build)" >&2; exit 1; }

# --- 3. servers --------------------------------------------------------------
PIDS=()
cleanup() {
  if [ "$KEEP" = 1 ]; then log "servers left running (--keep): pids ${PIDS[*]:-}"; return; fi
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  [ -f "$OUT/nginx-up.pid" ] && kill "$(cat "$OUT/nginx-up.pid")" 2>/dev/null || true
  [ -f "$OUT/nginx-proxy.pid" ] && kill "$(cat "$OUT/nginx-proxy.pid")" 2>/dev/null || true
}
trap cleanup EXIT

wait_port() { # port [seconds]
  local i
  for i in $(seq 1 $((${2:-20} * 10))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listening on port $1" >&2; return 1
}

# The upstream's answers: an OpenAI chat completion with usage, and a
# 50-chunk SSE stream ending with the include_usage chunk and [DONE].
CHAT_JSON='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-bench","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21},"system_fingerprint":"fp_bench"}'
SSE=""
for i in $(seq 1 50); do
  SSE+='data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-bench","choices":[{"index":0,"delta":{"content":"tok'$i' "},"finish_reason":null}]}\n\n'
done
SSE+='data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-bench","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":50,"total_tokens":62}}\n\ndata: [DONE]\n\n'

nginx_conf() { # name port body-of-server-block [http-extra]
  mkdir -p "$OUT/nginx-$1/logs"
  cat >"$OUT/nginx-$1.conf" <<EOF
worker_processes auto;
pid $OUT/nginx-$1.pid;
error_log $OUT/nginx-$1/error.log warn;
daemon on;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $OUT/nginx-$1;
  proxy_temp_path $OUT/nginx-$1;
  keepalive_requests 1000000;
  ${4:-}
  server {
    listen 127.0.0.1:$2 reuseport backlog=4096;
    $3
  }
}
EOF
  "$NGINX" -p "$OUT/nginx-$1" -c "$OUT/nginx-$1.conf"
}

mkdir -p "$OUT/www"
printf '%b' "$SSE" >"$OUT/www/sse.txt"
log "starting nginx upstream :$P_UP and nginx proxy :$P_NGINX"
nginx_conf up "$P_UP" "
    location /v1/chat/completions {
      # A static file cannot answer a POST, and the stream is too long for
      # a config string: error_page turns the POST into an internal GET.
      error_page 418 =200 /sse.txt;
      if (\$http_x_bench_stream = 1) { return 418; }
      default_type application/json;
      return 200 '$CHAT_JSON';
    }
    location = /sse.txt {
      internal;
      root $OUT/www;
      default_type text/event-stream;
    }"
nginx_conf proxy "$P_NGINX" "
    location / {
      proxy_pass http://bench_up;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering on;
    }" "upstream bench_up { server 127.0.0.1:$P_UP; keepalive 256; }"
wait_port "$P_UP"; wait_port "$P_NGINX"

log "starting a private redis-server :$P_REDIS_SRV"
redis-server --port "$P_REDIS_SRV" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no --loglevel warning >"$OUT/redis-server.log" 2>&1 &
REDIS_PID=$!
PIDS+=($!)
wait_port "$P_REDIS_SRV"
REDIS_CLI=(redis-cli -p "$P_REDIS_SRV")

# Plans: every policy has limits far beyond what a run can use, so every
# request runs the full admission and settlement and none is denied.
BIG=1000000000000
cat >"$OUT/plans.yaml" <<EOF
default_plan: bench
plans:
  bench:
    name: "Bench"
    endpoints:
      "gpt-bench":                  # the issue's policy: 3 windows
        fixed_windows:
          - { window: 60s, limit: $BIG, unit_type: request }
          - { window: 86_400s, limit: $BIG, unit_type: request }
          - { window: 60s, limit: $BIG, unit_type: token }
      "gpt-bench-credits":          # gpt-bench + credits: a deduction at
        fixed_windows:              # admission and a per-unit charge at the end
          - { window: 60s, limit: $BIG, unit_type: request }
          - { window: 86_400s, limit: $BIG, unit_type: request }
          - { window: 60s, limit: $BIG, unit_type: token }
        credits:
          min_balance: 1
          per_request: 1
          per_unit: { token: { credits: 1, per: 1000 } }
      "gpt-bench-spendcap":         # gpt-bench-credits + a spend cap: a window
        fixed_windows:              # on the credits charged (issue 15 item 2)
          - { window: 60s, limit: $BIG, unit_type: request }
          - { window: 86_400s, limit: $BIG, unit_type: request }
          - { window: 60s, limit: $BIG, unit_type: token }
          - { window: 2_592_000s, limit: $BIG, unit_type: credit }
        credits:
          min_balance: 1
          per_request: 1
          per_unit: { token: { credits: 1, per: 1000 } }
      "gpt-bench-1w":
        fixed_windows:
          - { window: 60s, limit: $BIG, unit_type: request }
      "gpt-bench-10w":
        fixed_windows:
          - { window: 1s, limit: $BIG, unit_type: request }
          - { window: 10s, limit: $BIG, unit_type: request }
          - { window: 60s, limit: $BIG, unit_type: request }
          - { window: 3600s, limit: $BIG, unit_type: request }
          - { window: 86_400s, limit: $BIG, unit_type: request }
          - { window: 1s, limit: $BIG, unit_type: token }
          - { window: 10s, limit: $BIG, unit_type: token }
          - { window: 60s, limit: $BIG, unit_type: token }
          - { window: 3600s, limit: $BIG, unit_type: token }
          - { window: 86_400s, limit: $BIG, unit_type: token }
      "gpt-bench-conc":             # 3 windows + a concurrency limit
        fixed_windows:
          - { window: 60s, limit: $BIG, unit_type: request }
          - { window: 86_400s, limit: $BIG, unit_type: request }
          - { window: 60s, limit: $BIG, unit_type: token }
        max_concurrent: 100000
        concurrency_expiry: 60s
  bench-key:                        # a key's own plan (redis-keyplan, issue 15
    endpoints:                      # item 3): two more windows on gpt-bench
      "gpt-bench":
        fixed_windows:
          - { window: 60s, limit: $BIG, unit_type: request }
          - { window: 60s, limit: $BIG, unit_type: token }
EOF

plangate_conf() { # name port admin-port storage-lines
  cat >"$OUT/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$2"
request_timeout = "60s"

[admin]
listen = "127.0.0.1:$3"
token = "$ADMIN_TOKEN"

[storage]
$4
# Above the 50ms default: on a 2-core box shared with wrk, nginx and Redis,
# a Redis reply can wait that long for a CPU, and a 503 would not measure
# the work this benchmark is about. "closed", so such a failure shows up as
# a non-2xx instead of an unmetered 200.
store_timeout = "500ms"
on_store_error = "closed"

[plans]
file = "plans.yaml"
watch = false

[[upstreams]]
name = "up"
url = "http://127.0.0.1:$P_UP"

[[routes]]
path = "/v1/chat/completions"
upstream = "up"
endpoint = "{model}"
usage.token = ["header:x-total-tokens", "body:usage.total_tokens"]
EOF
}

declare -A GW_PID
start_plangate() { # name port
  RUST_LOG="${BENCH_RUST_LOG:-warn}" "$PLANGATE" serve --config "$OUT/$1.toml" >"$OUT/gw-$1.log" 2>&1 &
  GW_PID[$1]=$!
  PIDS+=($!)
  wait_port "$2"
}

log "creating database $DB"
psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
"$PLANGATE" migrate --postgres-url "$PG_URL" >/dev/null
"$PLANGATE" plans apply "$OUT/plans.yaml" --postgres-url "$PG_URL" >/dev/null
"$PLANGATE" accounts create bench-one --postgres-url "$PG_URL" >/dev/null
"$PLANGATE" keys create bench-one --json --postgres-url "$PG_URL" | jq -r .key >"$OUT/key-pg.txt"
# A second key of the same account with a plan of its own (redis-keyplan).
"$PLANGATE" keys create bench-one --plan bench-key --json --postgres-url "$PG_URL" | jq -r .key >"$OUT/key-keyplan.txt"
# Credits for redis-credits (gpt-bench-credits on the same one hot account
# and key): far more than any run spends (2 credits a request).
"$PLANGATE" credits grant bench-one 1000000000000 --postgres-url "$PG_URL" >/dev/null

plangate_conf mem "$P_MEM" 18113 ""
plangate_conf redis "$P_REDIS" 18114 "postgres_url = \"$PG_URL\"
redis_url = \"redis://127.0.0.1:$P_REDIS_SRV\""
log "starting plangate (in-process stores) :$P_MEM and plangate (Redis + Postgres) :$P_REDIS"
start_plangate mem "$P_MEM"
start_plangate redis "$P_REDIS"
# The in-process catalog is empty at start: create the account over the
# admin API (which works on every backend).
curl -sf -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
  -d '{"id":"bench-one"}' "http://127.0.0.1:18113/admin/accounts" >/dev/null
curl -sf -X POST -H "authorization: Bearer $ADMIN_TOKEN" \
  "http://127.0.0.1:18113/admin/accounts/bench-one/keys" | jq -r .key >"$OUT/key-mem.txt"

FLOOR="$ROOT/target/release/examples/bare_proxy"
if [ -x "$FLOOR" ]; then
  log "starting the hyper floor (examples/bare_proxy) :$P_FLOOR"
  "$FLOOR" "127.0.0.1:$P_FLOOR" "http://127.0.0.1:$P_UP" >"$OUT/floor.log" 2>&1 &
  GW_PID[floor]=$!
  PIDS+=($!)
  wait_port "$P_FLOOR"
fi

if [ "$SCALING" = 1 ]; then
  log "inserting $ACCOUNTS accounts with one key each (SQL, hashed like catalog::hash_key)"
  psql -q "$PG_URL" <<EOF
INSERT INTO accounts (id, plan_id, created_at)
  SELECT 'bench-' || i, NULL, now() FROM generate_series(1, $ACCOUNTS) AS i;
INSERT INTO api_keys (id, account_id, key_hash, prefix, created_at)
  SELECT 'key_bench_' || i, 'bench-' || i,
         encode(sha256(convert_to('pg_bench_' || i || '_xxxxxxxxxxxxxxxxxxxxxxxx', 'UTF8')), 'hex'),
         'pg_bench_', now()
  FROM generate_series(1, $ACCOUNTS) AS i;
EOF
  # Shuffled, so consecutive requests hit unrelated cache and Redis entries.
  seq 1 "$ACCOUNTS" | shuf | sed 's/.*/pg_bench_&_xxxxxxxxxxxxxxxxxxxxxxxx/' >"$OUT/keys-100k.txt"
  head -1 "$OUT/keys-100k.txt" >"$OUT/keys-1.txt"
  plangate_conf pgmem "$P_PGMEM" 18115 "postgres_url = \"$PG_URL\""
  log "starting plangate (Postgres catalog + in-process counters) :$P_PGMEM"
  start_plangate pgmem "$P_PGMEM"
fi

# Sanity: each target answers 200 with usage before anything is measured.
check() { # url key [model]
  local code
  code=$(curl -s -o "$OUT/check.out" -w '%{http_code}' -H "authorization: Bearer $2" \
    -H 'content-type: application/json' -d '{"model":"'"${3:-gpt-bench}"'","messages":[]}' "$1")
  if [ "$code" != 200 ] || ! grep -q total_tokens "$OUT/check.out"; then
    echo "sanity check of $1 failed: HTTP $code: $(head -c 300 "$OUT/check.out")" >&2; exit 1
  fi
}
check "http://127.0.0.1:$P_UP/v1/chat/completions" x
check "http://127.0.0.1:$P_NGINX/v1/chat/completions" x
check "http://127.0.0.1:$P_MEM/v1/chat/completions" "$(cat "$OUT/key-mem.txt")"
check "http://127.0.0.1:$P_REDIS/v1/chat/completions" "$(cat "$OUT/key-pg.txt")"
check "http://127.0.0.1:$P_REDIS/v1/chat/completions" "$(cat "$OUT/key-pg.txt")" gpt-bench-credits
curl -s -D - -o /dev/null -H "authorization: Bearer $(cat "$OUT/key-pg.txt")" \
  -H 'content-type: application/json' -d '{"model":"gpt-bench","messages":[]}' \
  "http://127.0.0.1:$P_REDIS/v1/chat/completions" >"$OUT/headers-redis.txt"

# --- 4. measurement -----------------------------------------------------------
# Target table: name | port | gateway process (for RSS) | env for chat.lua.
TARGETS=(
  "direct|$P_UP|nginx-up|KEY=x"
  "nginx|$P_NGINX|nginx-proxy|KEY=x"
  "plangate-mem|$P_MEM|mem|KEY=$(cat "$OUT/key-mem.txt")"
  "plangate-redis|$P_REDIS|redis|KEY=$(cat "$OUT/key-pg.txt")"
  # plangate-redis' plan with credits: every request deducts at admission
  # and charges per unit at the end, all on one hot account (one key).
  "redis-credits|$P_REDIS|redis|KEY=$(cat "$OUT/key-pg.txt") MODEL=gpt-bench-credits"
)
[ -n "${GW_PID[floor]:-}" ] && TARGETS+=("hyper-floor|$P_FLOOR|floor|KEY=x")
# Only when asked for (--only "redis-credits redis-spendcap"): what a spend
# cap adds to the credit path.
[[ " $ONLY " == *" redis-spendcap "* ]] &&
  TARGETS+=("redis-spendcap|$P_REDIS|redis|KEY=$(cat "$OUT/key-pg.txt") MODEL=gpt-bench-spendcap")
# Only when asked for (--only "plangate-redis redis-keyplan"): what a key
# plan adds (gpt-bench's 3 account windows + 2 of the key's own).
[[ " $ONLY " == *" redis-keyplan "* ]] &&
  TARGETS+=("redis-keyplan|$P_REDIS|redis|KEY=$(cat "$OUT/key-keyplan.txt")")
if [ "$SCALING" = 1 ]; then
  TARGETS+=(
    "redis-1key-rotating|$P_REDIS|redis|KEYS_FILE=$OUT/keys-1.txt"
    "redis-100k-accounts|$P_REDIS|redis|KEYS_FILE=$OUT/keys-100k.txt"
    "pgmem-1key-rotating|$P_PGMEM|pgmem|KEYS_FILE=$OUT/keys-1.txt"
    "pgmem-100k-accounts|$P_PGMEM|pgmem|KEYS_FILE=$OUT/keys-100k.txt"
    "mem-1-window|$P_MEM|mem|KEY=$(cat "$OUT/key-mem.txt") MODEL=gpt-bench-1w"
    "mem-10-windows|$P_MEM|mem|KEY=$(cat "$OUT/key-mem.txt") MODEL=gpt-bench-10w"
    "redis-1-window|$P_REDIS|redis|KEY=$(cat "$OUT/key-pg.txt") MODEL=gpt-bench-1w"
    "redis-10-windows|$P_REDIS|redis|KEY=$(cat "$OUT/key-pg.txt") MODEL=gpt-bench-10w"
    "mem-concurrency|$P_MEM|mem|KEY=$(cat "$OUT/key-mem.txt") MODEL=gpt-bench-conc"
    "redis-concurrency|$P_REDIS|redis|KEY=$(cat "$OUT/key-pg.txt") MODEL=gpt-bench-conc"
    "sse-direct|$P_UP|nginx-up|KEY=x STREAM=1"
    "sse-nginx|$P_NGINX|nginx-proxy|KEY=x STREAM=1"
    "sse-plangate-mem|$P_MEM|mem|KEY=$(cat "$OUT/key-mem.txt") STREAM=1"
    "sse-plangate-redis|$P_REDIS|redis|KEY=$(cat "$OUT/key-pg.txt") STREAM=1"
  )
fi

# CPU time (user + system, clock ticks) of every thread of the given pids.
cpu_ticks() {
  local s=0 p t f
  for p in "$@"; do
    for t in /proc/"$p"/task/*/stat; do
      f=$(sed 's/.*) //' "$t" 2>/dev/null) || continue
      set -- $f
      s=$((s + ${12} + ${13}))
    done
  done
  echo "$s"
}
# The processes doing the proxying of a target: nginx workers or the gateway.
pids_of() {
  case "$1" in
    "") ;;
    nginx-up) pgrep -P "$(cat "$OUT/nginx-up.pid")" | xargs ;;
    nginx-proxy) pgrep -P "$(cat "$OUT/nginx-proxy.pid")" | xargs ;;
    *) echo "${GW_PID[$1]}" ;;
  esac
}
HZ=$(getconf CLK_TCK)
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
redis_calls() { # total calls of the scripts (evalsha + eval) and of all commands
  "${REDIS_CLI[@]}" info commandstats | tr -d '\r' | awk -F'[:=,]' '
    /^cmdstat_/ { total += $3; if ($1 ~ /evalsha|eval$/) scripts += $3 }
    END { printf "%d %d\n", scripts, total }'
}

run_wrk() { # label port env... ; prints the RESULT fields
  local label=$1 port=$2 env=$3 conns=${4:-$CONNS} dur=${5:-$DURATION}
  local hdr=()
  case " $env " in *" STREAM=1 "*) hdr=(-H "x-bench-stream: 1") ;; esac
  env $env wrk -t"$THREADS" -c"$conns" -d"${dur}s" --latency "${hdr[@]}" \
    -s "$ROOT/tests/load/chat.lua" "http://127.0.0.1:$port/v1/chat/completions" \
    >"$OUT/wrk-$label.last" 2>&1 || true
  cat "$OUT/wrk-$label.last" >>"$OUT/wrk-$label.log"
  grep '^RESULT' "$OUT/wrk-$label.last" | tail -1 | cut -d' ' -f2- || echo "0 0 0 0 0 0"
}

selected() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

# The Postgres server's processes (its backends serve the gateways' pools
# for the whole run, so their CPU is the catalog's share of a request).
pg_pids() { pgrep -x postgres | xargs; }
pg_xacts() {
  psql -tA "$PG_ADMIN" -c "SELECT xact_commit FROM pg_stat_database WHERE datname = '$DB'"
}
if [ "$SCALING" = 1 ]; then
  # Warm the keys into the gateways' caches: the first use of a key is a
  # Postgres read. Until (nearly) no request reads Postgres any more.
  for gw in redis pgmem; do
    port=$P_REDIS; [ "$gw" = pgmem ] && port=$P_PGMEM
    for i in 1 2 3 4 5 6 7 8; do
      x0=$(pg_xacts)
      read -r _ _ _ reqs _ _ <<<"$(run_wrk "warm-$gw" "$port" "KEYS_FILE=$OUT/keys-100k.txt" "$CONNS" 10)"
      x1=$(pg_xacts)
      log "warming $ACCOUNTS keys on $gw: $reqs requests, $((x1 - x0)) Postgres transactions"
      [ $(((x1 - x0) * 200)) -le "${reqs:-0}" ] && break
    done
  done
fi

printf 'round\ttarget\trps\tp50_us\tp99_us\trequests\tnon2xx\tsock_err\trss_kb\tredis_scripts_per_req\tredis_cmds_per_req\tcpu_us_per_req\tredis_cpu_us_per_req\tpg_xacts_per_req\tpg_cpu_us_per_req\n' >"$RESULTS"
log "measuring: $ROUNDS rounds x ${#TARGETS[@]} targets x ${DURATION}s, $CONNS connections, wrk -t$THREADS"
for round in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    IFS='|' read -r name port gw env <<<"$t"
    selected "$name" || continue
    pids=$(pids_of "$gw")
    before=$(redis_calls); cpu0=$(cpu_ticks $pids); rcpu0=$(cpu_ticks "$REDIS_PID"); pg0=$(pg_xacts); pgp=$(pg_pids); pgc0=$(cpu_ticks $pgp)
    read -r rps p50 p99 reqs non2xx sock <<<"$(run_wrk "$name" "$port" "$env")"
    cpu1=$(cpu_ticks $pids); rcpu1=$(cpu_ticks "$REDIS_PID"); after=$(redis_calls); pg1=$(pg_xacts); pgc1=$(cpu_ticks $pgp)
    sleep 0.5 # let settlements of the last requests land before the next target
    rss=0; per_script=""; per_cmd=""; cpu_us=""; redis_us=""; pg_per=""; pg_cpu=""
    if [ -n "${GW_PID[$gw]:-}" ]; then rss=$(rss_kb "${GW_PID[$gw]}"); fi
    if [ "$reqs" -gt 0 ]; then
      cpu_us=$(awk -v t="$((cpu1 - cpu0))" -v hz="$HZ" -v r="$reqs" 'BEGIN { printf "%.1f", t * 1e6 / hz / r }')
      [ -n "$gw" ] && [ "$gw" != floor ] && [ "$gw" != mem ] && [ "${gw#nginx}" = "$gw" ] &&
        pg_per=$(awk -v a="$((pg1 - pg0))" -v r="$reqs" 'BEGIN { printf "%.4f", a / r }') &&
        pg_cpu=$(awk -v t="$((pgc1 - pgc0))" -v hz="$HZ" -v r="$reqs" 'BEGIN { printf "%.1f", t * 1e6 / hz / r }')
    fi
    if [ "$gw" = redis ] && [ "$reqs" -gt 0 ]; then
      read -r s0 c0 <<<"$before"; read -r s1 c1 <<<"$after"
      per_script=$(awk -v a="$((s1 - s0))" -v r="$reqs" 'BEGIN { printf "%.3f", a / r }')
      per_cmd=$(awk -v a="$((c1 - c0))" -v r="$reqs" 'BEGIN { printf "%.3f", a / r }')
      redis_us=$(awk -v t="$((rcpu1 - rcpu0))" -v hz="$HZ" -v r="$reqs" 'BEGIN { printf "%.1f", t * 1e6 / hz / r }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$p50" "$p99" \
      "$reqs" "$non2xx" "$sock" "$rss" "$per_script" "$per_cmd" "$cpu_us" "$redis_us" "$pg_per" "$pg_cpu" >>"$RESULTS"
    printf '  round %s  %-22s %9s req/s  p50 %6s us  p99 %6s us  cpu %6s us/req  redis %s  pg %s us/req  non-2xx %s  rss %s kB\n' \
      "$round" "$name" "$rps" "$p50" "$p99" "$cpu_us" "$redis_us" "$pg_cpu" "$non2xx" "$rss" >&2
  done
done

# Fixed-rate latency: half of plangate-redis' max throughput, paced with
# wrk's delay() (closed loop: each connection waits DELAY_MS after each
# answer; wrk2 is not packaged in Debian).
if [ "$LATENCY" = 1 ]; then
  max=$(awk -F'\t' '$2 == "plangate-redis" { print $3 }' "$RESULTS" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  rate=$(awk -v m="$max" 'BEGIN { printf "%d", m / 2 }')
  delay=$(awk -v r="$rate" -v c="$CONNS" 'BEGIN { d = c * 1000 / r; if (d < 1) d = 1; printf "%d", d }')
  log "fixed-rate latency runs: target ~$rate req/s ($CONNS connections, ${delay} ms pause each)"
  for round in $(seq 1 "$ROUNDS"); do
    for t in "direct|$P_UP|nginx-up|KEY=x" "nginx|$P_NGINX|nginx-proxy|KEY=x" \
             "plangate-mem|$P_MEM|mem|KEY=$(cat "$OUT/key-mem.txt")" \
             "plangate-redis|$P_REDIS|redis|KEY=$(cat "$OUT/key-pg.txt")"; do
      IFS='|' read -r name port gw env <<<"$t"
      read -r rps p50 p99 reqs non2xx sock <<<"$(run_wrk "halfload-$name" "$port" "$env DELAY_MS=$delay")"
      rss=0; [ -n "${GW_PID[$gw]:-}" ] && rss=$(rss_kb "${GW_PID[$gw]}")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\t\t\t\t\n' "$round" "halfload-$name" "$rps" "$p50" "$p99" \
        "$reqs" "$non2xx" "$sock" "$rss" >>"$RESULTS"
      printf '  round %s  %-22s %9s req/s  p50 %6s us  p99 %6s us\n' "$round" "halfload-$name" "$rps" "$p50" "$p99" >&2
    done
  done
fi

"${REDIS_CLI[@]}" info commandstats | tr -d '\r' >"$OUT/redis-commandstats.txt"
for gw in "${!GW_PID[@]}"; do
  grep -E '^(VmRSS|VmHWM)' "/proc/${GW_PID[$gw]}/status" | sed "s/^/$gw /" >>"$OUT/rss.txt" || true
done

# --- 5. report ---------------------------------------------------------------
{
  echo "## plangate load benchmark — $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(uname -sr)."
  echo "Command: \`tests/load/bench.sh $ARGS\` — $ROUNDS alternating rounds x ${DURATION}s, $CONNS connections, wrk -t$THREADS; median of rounds."
  echo
  python3 "$ROOT/tests/load/report.py" "$RESULTS"
} | tee "$OUT/report.md"
log "results in $OUT"
