#!/usr/bin/env bash
# One command: set everything up, then train the CPU quickstart recipe offline (a few minutes).
# Extra arguments go to prx-run, e.g. `scripts/quickstart.sh --run-dir runs/again`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/prx-run recipes/quickstart.toml "$@"
