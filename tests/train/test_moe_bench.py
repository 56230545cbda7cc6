"""``benchmarks/moe.py --layer-speed-only``: the layer-speed comparison runs end to end (tiny size, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_layer_speed_only_writes_table_and_json(tmp_path):
    out = tmp_path / "layer.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--layer-speed-only", "--device", "cpu",
                        "--layer-sizes", "tiny", "--repeats", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "lm" not in res and [r["top_k"] for r in res["layer"]] == [1, 2]
    for r in res["layer"]:
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert set(r["tok_per_s"]) == {"hf mixtral eager", "lmlab cf1.0", "lmlab cf1.0 +IR+FR", "lmlab dropless"}
        assert all(v > 0 for v in r["tok_per_s"].values())
        assert r["speedup_vs_mixtral"]["hf mixtral eager"] == 1.0
    # dropless top-2 computes exactly what Mixtral computes (same weights)
    assert res["layer"][1]["dropless_vs_mixtral_max_abs_diff"] < 1e-5
    assert "lmlab cf1.0 +IR+FR" in p.stdout and "size (N, d, f, E)" in p.stdout
