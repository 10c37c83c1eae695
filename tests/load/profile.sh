#!/usr/bin/env bash
# Instruction counts per request (valgrind callgrind), the deterministic
# companion of bench.sh: unlike requests/s on a shared 2-core box, the
# number of instructions a request costs does not depend on what else runs.
#
#   tests/load/bench.sh --rounds 0 --keep          # upstream, Redis, Postgres, key
#   tests/load/profile.sh tests/load/results/<that run> mem|redis|floor [BINARY]
#
# mem:   plangate with the Postgres catalog and in-process counters
# redis: plangate with the Postgres catalog and Redis counters
# floor: examples/bare_proxy (plangate's listener + upstream client only)
#
# STREAM=1 in the environment: streamed answers (the 50-chunk SSE body).
#
# Starts a fresh gateway on port 18109 under callgrind, warms it for 5 s
# (wrk -t1 -c4), zeroes the counters, measures 10 s, and prints Ir per
# request plus the functions that cost the most (tests/load/cgreport.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
DIR=${1:?results directory of a bench.sh --keep run}
KIND=${2:?mem, redis or floor}
BIN=${3:-$ROOT/target/release/plangate}
PORT=18109
command -v valgrind >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
DIR=$(cd "$DIR" && pwd)
KEY=$(cat "$DIR/key-pg.txt")
OUTF=$DIR/callgrind-$KIND.out

case "$KIND" in
  mem)
    sed -e "s/^listen = \"127.0.0.1:18103\"/listen = \"127.0.0.1:$PORT\"/; s/18113/18119/" \
      -e "s|^\[storage\]|[storage]\npostgres_url = \"postgres://postgres@127.0.0.1:5432/plangate_bench\"|" \
      "$DIR/mem.toml" >"$DIR/profile.toml"
    CMD=("$BIN" serve --config "$DIR/profile.toml") ;;
  redis)
    sed -e "s/^listen = \"127.0.0.1:18104\"/listen = \"127.0.0.1:$PORT\"/; s/18114/18119/" \
      "$DIR/redis.toml" >"$DIR/profile.toml"
    CMD=("$BIN" serve --config "$DIR/profile.toml") ;;
  floor)
    CMD=("$ROOT/target/release/examples/bare_proxy" "127.0.0.1:$PORT" "http://127.0.0.1:18101") ;;
  *) echo "unknown kind $KIND" >&2; exit 2 ;;
esac

rm -f "$OUTF" "$OUTF".*
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUTF" "${CMD[@]}" >"$DIR/profile.log" 2>&1 &
VP=$!
trap 'kill $VP 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.5
done
HDR=()
[ "${STREAM:-}" = 1 ] && HDR=(-H "x-bench-stream: 1")
wrk_run() {
  env KEY="$KEY" STREAM="${STREAM:-}" wrk -t1 -c4 -d"$1"s "${HDR[@]}" -s "$ROOT/tests/load/chat.lua" \
    "http://127.0.0.1:$PORT/v1/chat/completions"
}
wrk_run 5 >/dev/null
callgrind_control -z "$VP" >/dev/null
reqs=$(wrk_run 10 | awk '/^RESULT/ { print $5 }')
callgrind_control -d "$VP" >/dev/null
sleep 1
python3 "$ROOT/tests/load/cgreport.py" "$OUTF.1" "$reqs" 25 'plangate|redis::|usage|keys'
