#!/usr/bin/env bash
# Creates .venv/ in the checkout with everything the README's commands need. Idempotent: reinstalls
# only when pyproject.toml or setup.py changed. Downloads are cached in pip's user cache dir.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${SPARROW_PYTHON:-}
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin=$candidate; break; fi
  done
fi
[ -n "$python_bin" ] || { echo "setup: no python3.11/3.12 found" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
if [ "$(cat .venv/.sparrow-stamp 2>/dev/null || true)" != "$stamp" ]; then
  echo "setup: installing sparrow-megatron and its stack into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install --progress-bar off -e ".[all]"
  echo "$stamp" > .venv/.sparrow-stamp
fi
