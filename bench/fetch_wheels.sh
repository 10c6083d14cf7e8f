#!/usr/bin/env bash
# Downloads, into bench/wheels/ (git-ignored), the wheels bench/gpu_check.sh installs on a GPU
# machine whose image has torch but not diffusers and cannot reach a package index: diffusers and
# importlib_metadata (+ its lazy-importer and zipp), at the versions this venv runs, for CPython 3.12
# on x86-64 Linux (the GPU image's Python). All four are pure-Python wheels; everything else they
# need (huggingface-hub >= 1.32, safetensors >= 0.8, numpy, Pillow, regex, requests, filelock,
# packaging, pluggy, tqdm) is in that image.
#
#   bash bench/fetch_wheels.sh        # here, with PyPI reachable; then run bench/gpu_check.sh there
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${WHEEL_PYTHON_VERSION:-3.12}
PACKAGES=(diffusers importlib_metadata lazy-importer zipp)

pins=()
for package in "${PACKAGES[@]}"; do
  version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$package")
  pins+=("$package==$version")
done

mkdir -p bench/wheels
rm -f bench/wheels/*.whl
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d bench/wheels "${pins[@]}"
echo "fetch_wheels: $(ls bench/wheels | tr '\n' ' ')($(du -sh bench/wheels | cut -f1))"
