#!/usr/bin/env bash
# CI proof of the deployment recipes, without a Docker engine or a cluster:
#  1. deploy/Dockerfile builds with deploy/build.sh and copies only files
#     that exist;
#  2. docker-compose.yml and k8s/ are structurally consistent
#     (check_deploy.py; needs PyYAML, installed with pip if missing);
#  3. deploy/build.sh — the Dockerfile's exact build — produces a binary
#     that runs, and that accepts the container and ConfigMap configs;
#  4. the systemd unit passes `systemd-analyze verify` (where available).
#
# Usage: deploy/check.sh [--no-build]   (--no-build: skip step 3's release
# build and use target/debug/plangate, for quick local runs)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\n==> deploy: %s\n' "$*" >&2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

log "Dockerfile recipe"
grep -qx 'RUN --mount=type=cache,target=/usr/local/cargo/registry \\' deploy/Dockerfile
grep -qx '    ./deploy/build.sh /out' deploy/Dockerfile || {
  echo "deploy/Dockerfile must build with ./deploy/build.sh (the command CI runs)" >&2; exit 1; }
if grep -n 'cargo ' deploy/Dockerfile | grep -v '^[0-9]*:#' | grep -v 'cargo/registry'; then
  echo "deploy/Dockerfile runs cargo directly; put the command in deploy/build.sh" >&2; exit 1
fi
# Every COPY source (but --from= stages) must exist in the build context.
while read -r src; do
  [ -e "$src" ] || { echo "deploy/Dockerfile copies missing $src" >&2; exit 1; }
done < <(awk '/^COPY / && !/--from=/ { for (i = 2; i < NF; i++) print $i }' deploy/Dockerfile)

log "compose and Kubernetes manifests"
if ! python3 -c 'import yaml' 2>/dev/null; then
  python3 -m pip install --quiet pyyaml 2>/dev/null || true
fi
if python3 -c 'import yaml' 2>/dev/null; then
  python3 deploy/check_deploy.py deploy "$tmp/k8s"
else
  echo "*** SKIPPING the compose/k8s structure check: PyYAML is not installed and pip could not install it" >&2
fi

if [ "${1:-}" = --no-build ]; then
  bin=target/debug/plangate
  cargo build -p plangate --bins
else
  log "release build exactly as deploy/Dockerfile does it (deploy/build.sh)"
  start=$(date +%s)
  ./deploy/build.sh "$tmp/out"
  log "deploy/build.sh took $(( $(date +%s) - start ))s"
  bin="$tmp/out/plangate"
fi
"$bin" --version

log "the image's config and the k8s ConfigMap pass check-config"
export PLANGATE_ADMIN_TOKEN=check PLANGATE_METRICS_TOKEN=check-metrics PLANGATE_POSTGRES_URL=postgres://u:p@postgres:5432/plangate \
  PLANGATE_REDIS_URL=redis://garnet:6379 PLANGATE_UPSTREAM_URL=http://upstream:8000
mkdir -p "$tmp/image"
cp deploy/plangate.toml config/plans.yaml "$tmp/image/"
"$bin" check-config --config "$tmp/image/plangate.toml"
if [ -f "$tmp/k8s/plangate.toml" ]; then
  "$bin" check-config --config "$tmp/k8s/plangate.toml"
fi

log "systemd unit"
if command -v systemd-analyze >/dev/null; then
  # verify insists that ExecStart exists: point it at the binary just built.
  sed "s#/usr/local/bin/plangate#$(realpath "$bin")#" deploy/systemd/plangate.service \
    > "$tmp/plangate.service"
  out=$(systemd-analyze verify "$tmp/plangate.service" 2>&1 || true)
  if [ -n "$out" ]; then echo "$out" >&2; exit 1; fi
else
  echo "*** SKIPPING systemd-analyze verify: systemd-analyze is not installed" >&2
fi
log "ok"
