#!/usr/bin/env bash
# One command: set everything up, then run lint, type checks and the whole test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# Two test workers on two cores, one thread each: torch would otherwise oversubscribe the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest -n "${PRX_TEST_WORKERS:-2}" "$@"
