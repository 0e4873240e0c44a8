#!/usr/bin/env bash
# Creates .venv312/: Python 3.12 with the GPU image's megatron-core (the Dockerfile's
# MEGATRON_CORE_VERSION; megatron-core >= 0.17 needs Python >= 3.12) and only what the trainer tests of
# scripts/test_py312.sh import: a CPU torch, this package without its heavy extras (no SGLang, MLflow,
# Slurm client), pytest. .venv/ stays on Python 3.11 with megatron-core 0.16.1.
#
# Idempotent like scripts/setup.sh: reinstalls only when this script, pyproject.toml, setup.py or the
# Dockerfile's megatron-core pin changed. Downloads are cached in pip's user cache dir.
#
# Exit status: 0 ready, 1 failure, 3 no Python 3.12 on this machine outside CI (CI=true makes that a
# failure, so CI never passes without having run the 3.12 tests).
set -euo pipefail
cd "$(dirname "$0")/.."

# torch and transformers as SGLang 0.5.23 pins them in .venv and the image, so the environments differ
# in Python and megatron-core only. (A newer transformers also imports the `kernels` distribution, which
# the checkout's kernels/ folder shadows under pytest.) torch: the CPU build from PyTorch's index
# (~200 MB); PyPI's Linux wheel is the CUDA build with several GB of nvidia-* wheels, the fallback.
TORCH_VERSION=2.14.1
TRANSFORMERS_VERSION=5.19.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

find_python312() {
  local candidate
  for candidate in "${SPARROW_PYTHON312:-}" python3.12; do
    # pyenv's shim exists even when 3.12 is not an active version; running it tells.
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
      >/dev/null 2>&1; then
      command -v "$candidate"
      return
    fi
  done
  # pyenv installs that are not on PATH (no `pyenv global 3.12`): the newest 3.12.x.
  for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    if "$candidate" -c 'import sys' >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
}

python_bin=$(find_python312)
if [ -z "$python_bin" ]; then
  msg="no Python 3.12 (tried \$SPARROW_PYTHON312, python3.12 on PATH, pyenv's versions/3.12*)"
  if [ "${CI:-}" = true ]; then
    echo "setup_py312: ERROR: $msg; CI must run the trainer tests under the image's megatron-core" >&2
    exit 1
  fi
  echo "setup_py312: SKIPPED: $msg; the megatron-core of the GPU image is not tested here" >&2
  exit 3
fi

mcore_version=$(sed -n 's/^ARG MEGATRON_CORE_VERSION=//p' Dockerfile)
[ -n "$mcore_version" ] || { echo "setup_py312: no ARG MEGATRON_CORE_VERSION in Dockerfile" >&2; exit 1; }
# A 3.12 install of the package (the train extra) must get the version tested here.
if ! grep -qF "\"megatron-core==$mcore_version; python_version >= '3.12'\"" pyproject.toml; then
  echo "setup_py312: pyproject.toml's megatron-core for Python 3.12 is not the Dockerfile's" \
    "$mcore_version: pin the same version in both" >&2
  exit 1
fi

[ -x .venv312/bin/python ] || "$python_bin" -m venv .venv312
stamp=$( (cat scripts/setup_py312.sh pyproject.toml setup.py; echo "$mcore_version") | sha256sum | cut -c1-16)
if [ "$(cat .venv312/.sparrow-stamp 2>/dev/null || true)" != "$stamp" ]; then
  echo "setup_py312: installing megatron-core $mcore_version, CPU torch and the light deps into .venv312"
  pip312=(.venv312/bin/python -m pip install --progress-bar off)
  "${pip312[@]}" -q --upgrade pip
  if ! "${pip312[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"; then
    echo "setup_py312: no torch from $TORCH_CPU_INDEX: PyPI's (the CUDA build, several GB)" >&2
    "${pip312[@]}" "torch==$TORCH_VERSION"
  fi
  # The package's own dependencies and dev tools from pyproject, plus the train extra's pieces the
  # trainer tests import (peft for LoRA export, psutil); not SGLang, MLflow, Triton or nemo-run.
  "${pip312[@]}" "megatron-core==$mcore_version" "transformers==$TRANSFORMERS_VERSION" -e ".[dev]" \
    peft psutil
  echo "$stamp" >.venv312/.sparrow-stamp
fi
