#!/usr/bin/env bash
# Runs every plangate test against real PostgreSQL and Redis.
#
# Makes sure both are reachable on 127.0.0.1 first: starts them if installed
# but stopped, installs the Debian packages if missing. Also pip-installs the
# openai SDK and the LiteLLM proxy (a real upstream the suite starts itself)
# if missing, and chromium + chromium-driver for the console's browser tests.
# Under this script a test that needs a service and cannot reach
# it FAILS (it never skips).
#
# Usage: ./tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_up; then return; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql postgresql-client
  fi
  local ver
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  # Tests connect as postgres over TCP without a password, as on the
  # machines this project runs on: make a fresh install trust loopback.
  local hba="/etc/postgresql/$ver/main/pg_hba.conf"
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting PostgreSQL $ver"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 1 60); do pg_up && return; sleep 0.5; done
  echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1
}

ensure_redis() {
  if command -v redis-cli >/dev/null && redis_up; then return; fi
  if ! command -v redis-server >/dev/null; then
    apt_install redis-server
  fi
  log "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 60); do redis_up && return; sleep 0.5; done
  echo "Redis did not come up on 127.0.0.1:6379" >&2; exit 1
}

ensure_python_openai() {
  # The SDK end-to-end tests drive the gateway with the official openai
  # and anthropic Python packages.
  if python3 -c 'import openai, anthropic' 2>/dev/null; then return; fi
  if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3 python3-pip
  fi
  log "installing the openai and anthropic Python SDKs"
  python3 -m pip install -q openai anthropic 2>/dev/null ||
    python3 -m pip install -q --break-system-packages openai anthropic
}

python_has_litellm_proxy() {
  # Metadata only (importing litellm's proxy takes ~10 s): litellm and
  # what its [proxy] extra installs.
  python3 - <<'PY' 2>/dev/null
import importlib.metadata as m
for dist in ("litellm", "litellm-proxy-extras", "fastapi", "uvicorn", "pyyaml", "orjson"):
    m.version(dist)
PY
}

ensure_python_litellm() {
  # tests/suite/litellm.rs runs a real LiteLLM proxy (offline, answering
  # with its mock_response) as the gateway's upstream.
  if python_has_litellm_proxy; then return; fi
  if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3 python3-pip
  fi
  log "installing the LiteLLM proxy (pip install 'litellm[proxy]')"
  python3 -m pip install -q 'litellm[proxy]' 2>/dev/null ||
    python3 -m pip install -q --break-system-packages 'litellm[proxy]'
}

ensure_tools() {
  command -v openssl >/dev/null || apt_install openssl
}

ensure_chromium() {
  # tests/suite/console.rs drives the admin console in a headless Chromium
  # through chromedriver (WebDriver over HTTP).
  if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    return
  fi
  apt_install chromium chromium-driver
}

ensure_postgres
ensure_python_openai
ensure_python_litellm
ensure_tools
ensure_chromium
ensure_redis
log "PostgreSQL and Redis are up"
# A 3-master Redis Cluster on loopback for tests/suite/cluster.rs (idempotent).
PLANGATE_TEST_REDIS_CLUSTER="${PLANGATE_TEST_REDIS_CLUSTER:-$(./tests/cluster.sh)}"
export PLANGATE_TEST_REDIS_CLUSTER

export PLANGATE_REQUIRE_SERVICES=1
export PLANGATE_TEST_POSTGRES_URL="${PLANGATE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export PLANGATE_TEST_REDIS_URL="${PLANGATE_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export PROPTEST_CASES="${PROPTEST_CASES:-256}"
# Every gateway the tests start keeps its log here; scanned for secrets last.
PLANGATE_TEST_LOG_DIR="$(mktemp -d -t plangate-test-logs.XXXXXX)"
export PLANGATE_TEST_LOG_DIR

log "cargo build (the binary is exercised by black-box tests)"
cargo build -p plangate --bins

log "cargo test --workspace"
cargo test --workspace --all-targets "$@"

log "cargo test --workspace --doc"
cargo test --workspace --doc

log "scanning the logs of every gateway the tests started for API keys and admin tokens"
./tests/scan_logs.sh "$PLANGATE_TEST_LOG_DIR"
rm -rf "$PLANGATE_TEST_LOG_DIR"
