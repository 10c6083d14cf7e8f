#!/usr/bin/env bash
# Fills bench/wheels/ (git-ignored) with what bench/gpu_check.sh installs on a GPU machine that has
# torch, transformers, safetensors, pluggy, timm, numpy and Pillow but no package index:
#
#   * a wheel of prx-core and of every plugin under plugins/, built from this checkout (pure
#     Python, --no-deps, so plugin entry points are registered there exactly as here);
#   * the third-party wheels that image lacks, at the versions this venv runs, for CPython 3.12 on
#     x86-64 Linux: diffusers and importlib_metadata (+ its lazy-importer and zipp).
#
#   bash bench/fetch_wheels.sh              # here, with PyPI reachable (~10 MB in all)
#   bash bench/fetch_wheels.sh --local-only # only the prx wheels (no download)
#
# Then carry bench/wheels with the call that runs bench/gpu_check.sh (the device tool's `carry`:
# ["bench/wheels"]); the whole tree must stay under the tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${WHEEL_PYTHON_VERSION:-3.12}
THIRD_PARTY=(diffusers importlib_metadata lazy-importer zipp)

mkdir -p bench/wheels
rm -f bench/wheels/*.whl
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# --no-build-isolation: setuptools from this venv, so no index is needed for the build itself.
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w bench/wheels \
  . plugins/*/ 2>"$build/log" || { cat "$build/log" >&2; exit 1; }
rm -rf build plugins/*/build  # setuptools' scratch folders

if [ "${1:-}" != "--local-only" ]; then
  pins=()
  for package in "${THIRD_PARTY[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$package")
    pins+=("$package==$version")
  done
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d bench/wheels "${pins[@]}"
fi
echo "fetch_wheels: $(ls bench/wheels | wc -l) wheels ($(du -sh bench/wheels | cut -f1)) in bench/wheels"
