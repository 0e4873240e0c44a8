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

# The code reward runs generated programs under bubblewrap, with a seccomp filter built by libseccomp
# (docs/sandbox.md); without them code rewards refuse to run. Installed when missing and this runs as
# root with apt-get; otherwise `sparrow reward code --check` names what is missing.
sandbox_pkgs=""
command -v bwrap >/dev/null 2>&1 || sandbox_pkgs="bubblewrap"
have_seccomp=""
for lib in /usr/lib/*/libseccomp.so.2 /usr/lib64/libseccomp.so.2 /lib/*/libseccomp.so.2; do
  if [ -e "$lib" ]; then have_seccomp=1; fi
done
[ -n "$have_seccomp" ] || sandbox_pkgs="${sandbox_pkgs:+$sandbox_pkgs }libseccomp2"
if [ -n "$sandbox_pkgs" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing $sandbox_pkgs for the code reward's sandbox"
  # shellcheck disable=SC2086 # a word list
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $sandbox_pkgs \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $sandbox_pkgs; }
  } >/dev/null 2>&1 || echo "setup: could not install $sandbox_pkgs: code rewards will refuse to run" >&2
fi

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
if [ "$(cat .venv/.sparrow-stamp 2>/dev/null || true)" != "$stamp" ]; then
  echo "setup: installing sparrow-megatron and its stack into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install --progress-bar off -e ".[all]"
  echo "$stamp" > .venv/.sparrow-stamp
fi
