#!/usr/bin/env bash
# Scale-out throughput on one box: ONE gateway on ONE Redis against TWO
# gateway replicas sharing a 3-master Redis Cluster (tests/cluster.sh),
# same Postgres catalog, same mock upstream (`plangate mock`), same load
# (wrk, 64 connections in all, random API key out of 64 accounts, every
# request admitted). Runs alternate (single, cluster, single, cluster) so
# that a change in background load hits both. Prints requests/s, the key
# distribution over the cluster's masters and each gateway's peak RSS.
#
# Usage: deploy/bench/scaleout.sh [SECONDS_PER_RUN]   (default 15)
# Needs: a release build (deploy/build.sh), wrk, redis-cli, psql, Postgres
# on 127.0.0.1:5432 (trust) and Redis on 127.0.0.1:6379.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-15}"
bin="${PLANGATE_BIN:-target/release/plangate}"
[ -x "$bin" ] || { echo "build first: ./deploy/build.sh" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
db="plangate_bench_$$"
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

nodes=$(./tests/cluster.sh)
cluster_list=$(echo "$nodes" | sed 's/[^,]*/"&"/g')
psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $db" >/dev/null
export PLANGATE_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/$db"
"$bin" migrate >/dev/null

cat > "$work/plans.yaml" <<'EOF'
default_plan: bench
plans:
  bench:
    endpoints:
      "gpt-bench":
        fixed_windows:
          - window: 60s
            limit: 1_000_000_000
          - window: 60s
            limit: 1_000_000_000_000
            unit_type: token
        max_concurrent: 10_000
EOF
"$bin" plans apply "$work/plans.yaml" >/dev/null
: > "$work/keys"
for i in $(seq 1 64); do
  "$bin" accounts create "bench-$$-$i" >/dev/null
  "$bin" keys create "bench-$$-$i" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])' >> "$work/keys"
done

"$bin" mock --listen 127.0.0.1:18700 2>/dev/null & pids+=($!)

config() { # name listen storage-line
  cat > "$work/$1.toml" <<EOF
[server]
listen = "$2"
[storage]
postgres_url = "$PLANGATE_POSTGRES_URL"
$3
store_timeout = "500ms"
on_store_error = "closed"
[plans]
file = "plans.yaml"
watch = false
[[upstreams]]
name = "mock"
url = "http://127.0.0.1:18700"
[[routes]]
path = "/v1/chat/completions"
upstream = "mock"
endpoint = "{model}"
usage.token = ["body:usage.total_tokens"]
EOF
}
config single 127.0.0.1:18701 'redis_url = "redis://127.0.0.1:6379"'
config replica 127.0.0.1:18702 "redis_cluster = [$cluster_list]"
sed 's/18702/18703/' "$work/replica.toml" > "$work/replica2.toml"
declare -A gw
for name in single replica replica2; do
  RUST_LOG=warn "$bin" serve --config "$work/$name.toml" & pids+=($!)
  gw[$name]=$!
done
for port in 18700 18701 18702 18703; do
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    curl -fs "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && break
    sleep 0.1
  done
done

cat > "$work/load.lua" <<'EOF'
local keys = {}
for line in io.lines(os.getenv("KEYS_FILE")) do keys[#keys + 1] = line end
local body = '{"model":"gpt-bench","messages":[{"role":"user","content":"hello"}]}'
function init(args) math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16)) end
function request()
  local k = keys[math.random(#keys)]
  return wrk.format("POST", "/v1/chat/completions",
    {["Authorization"] = "Bearer " .. k, ["Content-Type"] = "application/json"}, body)
end
EOF
export KEYS_FILE="$work/keys"

rps() { sed -n 's/^Requests\/sec: *//p' "$1"; }
non2xx() { local n; n=$(sed -n 's/^ *Non-2xx or 3xx responses: *//p' "$1"); echo "${n:-0}"; }
# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
served() { sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$1"; }
per_cpu() { python3 -c "print(round($1 / max($3 - $2, 0.01)))"; }
run_single() {
  local c0; c0=$(cpu "${gw[single]}")
  wrk -t2 -c64 -d"${secs}s" -s "$work/load.lua" http://127.0.0.1:18701 > "$work/w1" 2>&1
  echo "one gateway, one Redis:            $(rps "$work/w1") req/s (non-2xx: $(non2xx "$work/w1"); $(per_cpu "$(served "$work/w1")" "$c0" "$(cpu "${gw[single]}")") req per gateway CPU-second)"
}
run_cluster() {
  local c2 c3; c2=$(cpu "${gw[replica]}"); c3=$(cpu "${gw[replica2]}")
  wrk -t1 -c32 -d"${secs}s" -s "$work/load.lua" http://127.0.0.1:18702 > "$work/w2" 2>&1 &
  local a=$!
  wrk -t1 -c32 -d"${secs}s" -s "$work/load.lua" http://127.0.0.1:18703 > "$work/w3" 2>&1
  wait "$a"
  local total per
  total=$(python3 -c "print(round($(rps "$work/w2") + $(rps "$work/w3"), 2))")
  per=$(python3 -c "print(round(($(served "$work/w2") + $(served "$work/w3")) / max($(cpu "${gw[replica]}") - $c2 + $(cpu "${gw[replica2]}") - $c3, 0.01)))")
  echo "two gateways, 3-master cluster:    $total req/s ($(rps "$work/w2") + $(rps "$work/w3"); non-2xx: $(non2xx "$work/w2") + $(non2xx "$work/w3"); $per req per gateway CPU-second)"
}
echo "load: wrk, 64 connections, ${secs}s per run, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in 1 2 3; do
  echo "round $round"
  run_single
  run_cluster
done

echo "peak RSS (VmHWM):"
for name in single replica replica2; do
  echo "  $name: $(sed -n 's/^VmHWM: *//p' "/proc/${gw[$name]}/status")"
done
echo "benchmark accounts (hash tags) and counter keys per cluster master:"
for url in ${nodes//,/ }; do
  port=${url##*:}
  redis-cli -p "$port" --scan --pattern 'pg:{bench-'"$$"'-*' > "$work/scan"
  tags=$(sed 's/^[^{]*{\([^}]*\)}.*/\1/' "$work/scan" | sort -u | wc -l)
  echo "  127.0.0.1:$port: $tags accounts, $(wc -l < "$work/scan") keys"
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
