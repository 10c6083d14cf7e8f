#!/usr/bin/env bash
# Sets up everything prx needs in ./.venv: Python 3.11, torch + torchvision (as a matched pair),
# prx-core with its dev tools, and every plugin package under plugins/ (editable installs).
# Safe to re-run: it skips pip when nothing it installs from has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "prx needs Python 3.11 (aim 3.29 does not run on 3.13+); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=.venv/.prx-setup-stamp
want=$(cat pyproject.toml plugins/*/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setup: installing torch, prx-core and plugins into .venv (first time: a few minutes)" >&2
# torch and torchvision must come as a pair, or torchvision's operators fail to load.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
plugin_args=()
for plugin in plugins/*/; do plugin_args+=(-e "$plugin"); done
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,report]" "${plugin_args[@]}"
echo "$want" > "$stamp"
