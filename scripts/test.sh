#!/usr/bin/env bash
# The README's test command: install with the dev extras, lint, run the default test suite.
# pytest's exit 5 (no tests collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
./install.sh dev || exit 1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
