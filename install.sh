#!/usr/bin/env bash
# Install lmlab into ./.venv.  Usage: ./install.sh [EXTRAS]   e.g. ./install.sh dev
#
# CPU machines: torch is pinned to 2.13.0 (constraints-cpu.txt), whose CPU wheel this machine kind holds
# locally; an unpinned torch would resolve to a multi-GB CUDA build. GPU users: install the CUDA torch you
# want into the venv first and run with LMLAB_TORCH=keep, which leaves the installed torch alone.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "${LMLAB_TORCH:-pin}" = "keep" ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" -e ".${extras:+[$extras]}"
else
  "${pip[@]}" -c constraints-cpu.txt "torch==2.13.0"
  "${pip[@]}" -c constraints-cpu.txt -e ".${extras:+[$extras]}"
fi
.venv/bin/lmlab --version
