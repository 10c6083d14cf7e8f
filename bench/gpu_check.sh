#!/usr/bin/env bash
# The one script for a short slot on one H100/H200: prx's real training loop on CUDA, then the
# measurements that say where its time and memory go. Under ~6.5 minutes of command time, so a
# rerun fits in the slot. Each step has its own time limit, writes its own file under $OUT (or
# bench/gpu_check_out/ without $OUT) and ends with one "summary ..." line; a failed or timed-out
# step is reported and the next one runs. Steps, in order:
#   1. versions (torch, CUDA, cuDNN, NCCL) and the SDPA kernels that accept PRX's masked inputs
#   2. bench/fit_check.py: prx-run on PRX-1.2B, batch 32, bf16, random data and full-size random
#      towers (no download), 60 steps + checkpoints + grid, then --resume auto: images/s, MFU,
#      peak memory allocated and reserved, checkpoint time, resumed-vs-straight loss difference
#   3. bench/profile_step.py: 3 profiled steps (copies, syncs, attention kernel share, GPU idle)
#   4. bench/sdpa_bench.py: SDPA at PRX shapes (bool mask, no mask, trimmed text, cuDNN)
#   5. bench/pixel_memory.py: pixel 1024 memory with and without activation checkpointing (OOM caught)
#   6. bench/compile_check.py: the compiled step and its recompile count
#   7. bench/optimizer_step.py --full, only if the time left allows
#
# Before (here, with PyPI):  bash bench/fetch_wheels.sh     # prx-core, every plugin, diffusers -> bench/wheels/
# There (repo root), carrying bench/wheels (git-ignored, so name it in the call's carry):
#                            bash bench/gpu_check.sh
# On a machine without CUDA it stops at once with a message and exit status 3.
# Limits per step (seconds) can be changed with T_VERSIONS, T_FIT, T_PROFILE, T_SDPA, T_PIXEL,
# T_COMPILE, T_OPTIM; BUDGET (default 390) is the whole script's.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SITE=${PRX_GPU_SITE:-/tmp/prx-site}
BUDGET=${BUDGET:-390}
RESULTS=${OUT:-bench/gpu_check_out}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds none). This script measures prx on" >&2
  echo "gpu_check: CUDA; run it on the GPU machine (see bench/README.md, 'On a GPU'). Nothing was run." >&2
  exit 3
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: $PY's torch sees no CUDA device (torch.cuda.is_available() is False); nothing was run." >&2
  exit 3
fi
if ! ls bench/wheels/*.whl >/dev/null 2>&1; then
  echo "gpu_check: bench/wheels/ is empty: run 'bash bench/fetch_wheels.sh' where PyPI is reachable and carry bench/wheels" >&2
  exit 2
fi
mkdir -p "$RESULTS"

run_step() {  # run_step NUMBER NAME SECONDS COMMAND...
  local number=$1 name=$2 limit=$3
  shift 3
  local left=$((BUDGET - SECONDS)) file="$RESULTS/${number}_${name}.txt"
  if [ "$left" -lt 15 ]; then
    echo "=== $number $name: skipped (${left}s of the ${BUDGET}s budget left)" | tee "$file"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo
  echo "=== $number $name (limit ${limit}s): $*"
  local begin=$SECONDS status=0
  timeout --kill-after=10 "$limit" "$@" >"$file" 2>&1 || status=$?
  grep -v "^Loading weights\|it/s\]$" "$file" | tail -n 12
  if [ "$status" -ne 0 ]; then
    failures=$((failures + 1))
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
      echo "summary $name: TIMED OUT after ${limit}s" | tee -a "$file"
    else
      echo "summary $name: FAILED with status $status (see $file)" | tee -a "$file"
    fi
  fi
  echo "=== $number $name: $((SECONDS - begin))s"
}

main() {
  failures=0
  echo "=== gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # The wheels (prx-core, every plugin, diffusers) go to a folder of their own: their metadata
  # registers the plugins' entry points. The checkout's sources come first on the path, so the
  # code that runs is this checkout's even when the wheels are older.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" bench/wheels/*.whl
  sources=$(printf '%s:' "$PWD" "$PWD"/plugins/*/src)
  export PYTHONPATH="$sources$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  "$PY" -c 'import prx_core, diffusers; print(f"prx-core {prx_core.__version__}, diffusers {diffusers.__version__}")'

  run_step 1 versions "${T_VERSIONS:-30}" "$PY" bench/gpu_versions.py
  run_step 2 fit_check "${T_FIT:-170}" "$PY" bench/fit_check.py
  run_step 3 profile "${T_PROFILE:-50}" "$PY" bench/profile_step.py
  run_step 4 sdpa "${T_SDPA:-25}" "$PY" bench/sdpa_bench.py
  run_step 5 pixel_memory "${T_PIXEL:-60}" "$PY" bench/pixel_memory.py
  run_step 6 compile "${T_COMPILE:-70}" "$PY" bench/compile_check.py
  if [ $((BUDGET - SECONDS)) -ge 40 ]; then
    run_step 7 optimizer "${T_OPTIM:-35}" "$PY" bench/optimizer_step.py --full --warmup 2 --steps 5
  fi

  echo
  echo "=== summaries"
  cat "$RESULTS"/*.txt | grep "^summary" || true
  echo "=== gpu_check done in ${SECONDS}s, $failures step(s) failed or timed out; files in $RESULTS"
}

main 2>&1 | tee "$RESULTS/00_gpu_check.log"
