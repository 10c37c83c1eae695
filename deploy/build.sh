#!/usr/bin/env bash
# The one release build of plangate. deploy/Dockerfile runs this script and
# CI (deploy/check.sh, from .ci/run) runs the very same script, so the image
# recipe is exercised on every CI run without a Docker engine.
#
# Usage: deploy/build.sh [OUT_DIR]   copies the binary to OUT_DIR if given.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p plangate
if [ "$#" -ge 1 ]; then
  mkdir -p "$1"
  cp target/release/plangate "$1/plangate"
fi
