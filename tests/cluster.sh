#!/usr/bin/env bash
# A 3-master Redis Cluster on loopback for plangate's tests, started only if
# it is not already up (idempotent, safe to run concurrently).
#
#   tests/cluster.sh          start (or check) it; prints the node URLs
#   tests/cluster.sh stop     shut the nodes down
#
# Ports: PLANGATE_CLUSTER_PORTS (default "7301 7302 7303"; cluster bus on
# port + 10000). Node files and logs: PLANGATE_CLUSTER_DIR (default
# /tmp/plangate-redis-cluster). The cluster is private to plangate's tests,
# so resetting it here cannot hurt anyone else's data.
set -euo pipefail
read -r -a ports <<< "${PLANGATE_CLUSTER_PORTS:-7301 7302 7303}"
dir="${PLANGATE_CLUSTER_DIR:-/tmp/plangate-redis-cluster}"
mkdir -p "$dir"
cli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}"; }

if [ "${1:-}" = stop ]; then
  for p in "${ports[@]}"; do cli "$p" shutdown nosave >/dev/null 2>&1 || true; done
  exit 0
fi

# Every node answers, sees the cluster as ok, and there are as many
# masters with slots as nodes.
healthy() {
  local p
  for p in "${ports[@]}"; do
    cli "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  done
  [ "$(cli "${ports[0]}" cluster info | tr -d '\r' | sed -n 's/^cluster_size://p')" = "${#ports[@]}" ]
}

exec 9>"$dir/lock"
flock 9
if ! healthy; then
  for p in "${ports[@]}"; do
    if ! cli "$p" ping >/dev/null 2>&1; then
      redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
        --cluster-config-file "nodes-$p.conf" --cluster-node-timeout 2000 \
        --save "" --appendonly no --daemonize yes --dir "$dir" \
        --logfile "$dir/redis-$p.log" --pidfile "$dir/redis-$p.pid" \
        </dev/null >/dev/null 2>&1 9>&-   # the daemon must not hold the lock
    fi
  done
  for p in "${ports[@]}"; do
    for _ in $(seq 1 50); do cli "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  # Restarted nodes rejoin from their nodes-*.conf; give them a moment.
  for _ in $(seq 1 30); do healthy && break; sleep 0.2; done
  if ! healthy; then
    echo "creating Redis Cluster on ports ${ports[*]}" >&2
    for p in "${ports[@]}"; do
      cli "$p" flushall >/dev/null
      cli "$p" cluster reset hard >/dev/null
    done
    addrs=()
    for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log"
    for _ in $(seq 1 100); do healthy && break; sleep 0.1; done
    healthy || { echo "Redis Cluster on ${ports[*]} did not become healthy" >&2; cat "$dir/create.log" >&2; exit 1; }
  fi
fi
urls=()
for p in "${ports[@]}"; do urls+=("redis://127.0.0.1:$p"); done
(IFS=,; echo "${urls[*]}")
