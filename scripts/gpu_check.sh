#!/usr/bin/env bash
# GPU check: CUDA parity tests, the whole tour on --device cuda, and the MoE layer speed benchmark.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # on a machine with a CUDA torch + transformers installed
#
# Uses the source tree directly (PYTHONPATH=src), so it runs with whatever torch the machine has. Wheels in
# .whl/ (pure-Python extras such as datatrove) are installed into a private --target first when present.
# Writes OUT_DIR/{env.txt,gpu_tests.log,tour.log,tour_summary.json,moe_gpu.json,moe_gpu.log}; exit status 0
# only if every step passed.
set -uo pipefail
OUT_DIR=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lmlab-site .whl/*.whl \
    && export PYTHONPATH=/tmp/lmlab-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LMLAB_CACHE=${LMLAB_CACHE:-/tmp/lmlab-gpu-cache}
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT_DIR/env.txt" 2>&1 || status=1
cat "$OUT_DIR/env.txt"

echo "== CUDA parity tests"
$PY -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT_DIR/gpu_tests.log" || status=1

echo "== MoE layer speed (cuda)"
if [ -f benchmarks/moe.py ]; then
  $PY benchmarks/moe.py --device cuda --layer-speed-only --out "$OUT_DIR/moe_gpu.json" 2>&1 | tee "$OUT_DIR/moe_gpu.log" || status=1
fi

echo "== tour on cuda"
start=$(date +%s)
$PY -m lmlab tour --device cuda --out "$OUT_DIR/tour" 2>&1 | tee "$OUT_DIR/tour.log" || status=1
echo "tour wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT_DIR/tour.log"
# keep the small JSON summaries only (the tour folder holds models and plots)
$PY - "$OUT_DIR" <<'EOF' || status=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for p in sorted((out / "tour").rglob("results.json")):
    try:
        summary[str(p.relative_to(out / "tour"))] = json.loads(p.read_text())
    except ValueError as e:
        summary[str(p)] = f"unreadable: {e}"
(out / "tour_summary.json").write_text(json.dumps(summary, indent=1, default=str)[:15_000_000])
print(f"{len(summary)} results.json files summarised")
EOF
rm -rf "$OUT_DIR/tour"
exit $status
