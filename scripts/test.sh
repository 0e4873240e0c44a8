#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up .venv, lint and format check, then pytest (Python 3.11, megatron-core
# 0.16.1); then, with no arguments, the trainer tests under the GPU image's megatron-core on Python 3.12
# (scripts/test_py312.sh; skipped with a message where 3.12 is absent, a failure in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
if [ "$#" -gt 0 ]; then
  echo "test: arguments select tests of the main suite; scripts/test_py312.sh runs the Python 3.12 ones"
  exit "$status"
fi
# Run even when the main suite failed: CI reports both.
set +e
bash scripts/test_py312.sh
status312=$?
set -e
[ "$status" -ne 0 ] && exit "$status"
exit "$status312"
