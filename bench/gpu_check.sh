#!/usr/bin/env bash
# The one script to run when a GPU machine is lent (one H100/H200, torch preinstalled, no package
# index). It prints everything bench/RESULTS.md needs, and stays under ~8 minutes: each step has its
# own timeout, and a failed or timed-out step is reported and skipped, never fatal.
#
# Before (here, with PyPI):   bash bench/fetch_wheels.sh          # diffusers & co. into bench/wheels/
# There (repo root), carrying bench/wheels (git-ignored, so it must be named in the call's carry):
#                             bash bench/gpu_check.sh
#
# Steps, in order of value (the last one is the longest):
#   1. step_throughput 256-px latent, batch 64, eager   (prx step vs bare diffusers step, MFU)
#   2. step_throughput pixel 1024, batch 16, eager
#   3. optimizer_step --full                            (Muon vs torch.optim.Muon vs AdamW on 1.17B)
#   4. step_throughput 256-px latent, batch 64, compiled blocks
# Per-step limits (seconds) can be changed with T_256, T_PIXEL, T_OPTIM, T_COMPILE.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SITE=${PRX_GPU_SITE:-/tmp/prx-site}

run_step() {  # run_step TITLE SECONDS COMMAND...
  local title=$1 limit=$2
  shift 2
  echo
  echo "=== $title (limit ${limit}s): $*"
  local begin=$SECONDS status=0
  timeout --kill-after=10 "$limit" "$@" || status=$?
  if [ "$status" -ne 0 ]; then
    failures=$((failures + 1))
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
      echo "=== $title: TIMED OUT after ${limit}s"
    else
      echo "=== $title: FAILED with status $status"
    fi
  fi
  echo "=== $title: $((SECONDS - begin))s"
}

main() {
  failures=0
  echo "=== gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: unavailable"

  if ! ls bench/wheels/*.whl >/dev/null 2>&1; then
    echo "bench/wheels/ is empty: run 'bash bench/fetch_wheels.sh' here first and carry bench/wheels" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" bench/wheels/*.whl
  export PYTHONPATH="$PWD:$PWD/plugins/prx-muon/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  "$PY" -c 'import sys, torch, diffusers; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, cuda {torch.cuda.is_available()}")'

  run_step "256 latent, batch 64, eager" "${T_256:-120}" \
    "$PY" bench/step_throughput.py --config 256 --batch 64 --warmup 3 --steps 10
  run_step "pixel 1024, batch 16, eager" "${T_PIXEL:-120}" \
    "$PY" bench/step_throughput.py --config pixel1024 --batch 16 --warmup 3 --steps 10
  run_step "optimizer step, PRX-1.2B shapes" "${T_OPTIM:-90}" \
    "$PY" bench/optimizer_step.py --full --warmup 2 --steps 5
  run_step "256 latent, batch 64, compiled blocks" "${T_COMPILE:-150}" \
    "$PY" bench/step_throughput.py --config 256 --batch 64 --compile --warmup 3 --steps 10

  echo
  echo "=== gpu_check done in ${SECONDS}s, $failures step(s) failed or timed out"
}

# Everything to stdout; also to $OUT/gpu_check.log where the device tool provides $OUT.
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  main 2>&1 | tee "$OUT/gpu_check.log"
else
  main 2>&1
fi
