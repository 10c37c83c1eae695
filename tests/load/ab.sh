#!/usr/bin/env bash
# A/B two plangate binaries side by side: CPU per request of each, in
# alternating rounds against the same upstream, Redis and Postgres, so that
# the noise of a shared box hits both alike (bench.sh measures one binary
# per run, and its CPU figures drift between runs more than a change of a
# few percent).
#
#   tests/load/bench.sh --rounds 0 --keep       # upstream, Redis, Postgres, key
#   tests/load/ab.sh tests/load/results/<that run> mem|redis BINARY_A BINARY_B [ROUNDS]
#
# mem: Postgres catalog + in-process counters; redis: Postgres catalog +
# Redis counters (as tests/load/profile.sh). STREAM=1: streamed answers.
# Prints, per round and as medians: requests/s and the gateway's CPU
# (user + system) per request, and for redis the redis-server's.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
DIR=$(cd "${1:?results directory of a bench.sh --keep run}" && pwd)
KIND=${2:?mem or redis}
BINS=("${3:?binary A}" "${4:?binary B}")
ROUNDS=${5:-6}
KEY=$(cat "$DIR/key-pg.txt")
HZ=$(getconf CLK_TCK)
REDIS_PID=$(pgrep -f 'redis-server.*16399' | head -1 || true)

cpu_ticks() { # pid: user + system ticks of all its threads
  local s=0 t f
  for t in /proc/"$1"/task/*/stat; do
    f=$(sed 's/.*) //' "$t" 2>/dev/null) || continue
    set -- $f
    s=$((s + ${12} + ${13}))
  done
  echo "$s"
}

PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
for i in 0 1; do
  port=$((18120 + i)) admin=$((18130 + i))
  case "$KIND" in
    mem) sed -e "s/^listen = \"127.0.0.1:18103\"/listen = \"127.0.0.1:$port\"/; s/18113/$admin/" \
           -e "s|^\[storage\]|[storage]\npostgres_url = \"postgres://postgres@127.0.0.1:5432/plangate_bench\"|" \
           "$DIR/mem.toml" >"$DIR/ab-$i.toml" ;;
    redis) sed -e "s/^listen = \"127.0.0.1:18104\"/listen = \"127.0.0.1:$port\"/; s/18114/$admin/" \
           "$DIR/redis.toml" >"$DIR/ab-$i.toml" ;;
    *) echo "unknown kind $KIND" >&2; exit 2 ;;
  esac
  RUST_LOG=warn "${BINS[$i]}" serve --config "$DIR/ab-$i.toml" >"$DIR/ab-$i.log" 2>&1 &
  PIDS+=($!)
done
for i in 0 1; do
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$((18120 + i))") 2>/dev/null && break
    sleep 0.1
  done
done
HDR=()
[ "${STREAM:-}" = 1 ] && HDR=(-H "x-bench-stream: 1")
run() { # index seconds -> "requests/s requests"
  env KEY="$KEY" STREAM="${STREAM:-}" wrk -t2 -c50 -d"$2"s "${HDR[@]}" -s "$ROOT/tests/load/chat.lua" \
    "http://127.0.0.1:$((18120 + $1))/v1/chat/completions" | awk '/^RESULT/ { print $2, $5 }'
}
run 0 3 >/dev/null; run 1 3 >/dev/null # warm up
OUT=$DIR/ab-$KIND.tsv
: >"$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for i in 0 1; do
    c0=$(cpu_ticks "${PIDS[$i]}"); rc0=0; [ -n "$REDIS_PID" ] && rc0=$(cpu_ticks "$REDIS_PID")
    read -r rps reqs <<<"$(run "$i" 10)"
    c1=$(cpu_ticks "${PIDS[$i]}"); rc1=0; [ -n "$REDIS_PID" ] && rc1=$(cpu_ticks "$REDIS_PID")
    us=$(awk -v t=$((c1 - c0)) -v hz="$HZ" -v n="$reqs" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    rus=$(awk -v t=$((rc1 - rc0)) -v hz="$HZ" -v n="$reqs" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$i" "$rps" "$us" "$rus" >>"$OUT"
    printf 'round %s  %s  %9s req/s  %6s us/req gateway  %6s us/req redis-server\n' \
      "$r" "$(basename "${BINS[$i]}")" "$rps" "$us" "$rus"
  done
done
for i in 0 1; do
  awk -F'\t' -v i="$i" -v name="$(basename "${BINS[$i]}")" '$2 == i { r[++n] = $3; c[n] = $4; s[n] = $5 }
    function med(a, n,   j, k, t) { for (j = 1; j <= n; j++) for (k = j + 1; k <= n; k++) if (a[k] < a[j]) { t = a[j]; a[j] = a[k]; a[k] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    END { printf "median %-24s %9.0f req/s  %6.1f us/req gateway  %6.1f us/req redis-server\n", name, med(r, n), med(c, n), med(s, n) }' "$OUT"
done
