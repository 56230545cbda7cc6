"""Grader consistency: published ICC and Krippendorff anchors, the ISR null, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmlab.errors import LmlabError
from lmlab.evaluate import grading

# Shrout & Fleiss (1979), Table 2: 6 targets x 4 judges
SF = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]


def test_icc_shrout_fleiss():
    r = grading.icc2(SF)
    assert r["icc2_1"] == pytest.approx(0.29, abs=0.005)
    assert r["icc2_k"] == pytest.approx(0.62, abs=0.005)
    with pytest.raises(LmlabError, match="complete"):
        grading.icc2([[1, np.nan], [2, 3]])


def test_krippendorff_alpha_canonical_example():
    """Krippendorff (2011) reliability data: 4 coders x 12 units with missing values."""
    n = None
    A = [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n]
    B = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3]
    C = [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n]
    D = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]
    units = list(zip(A, B, C, D))
    assert grading.krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=1e-3)
    assert grading.krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=1e-3)


def test_isr_and_its_null():
    assert grading.isr([1, 1, 1]) == 0.0
    assert grading.isr([0, 0, 3]) == pytest.approx(1 / 3)
    n3 = grading.isr_null([3] * 100, ddof=1, n_sim=200)
    assert n3["mean"] == pytest.approx(1 / 3, abs=1e-9)  # any disagreement among 3 raters flags exactly 1
    n3p = grading.isr_null([3] * 100, ddof=0, n_sim=200)
    assert n3p["mean"] == pytest.approx(0.5, abs=0.02)
    big = grading.isr_null([60] * 20, n_sim=200)
    assert big["mean"] == pytest.approx(0.317, abs=0.01)


def test_grading_command(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["item_id,model,rater,score,subject"]
    for i in range(30):
        true = rng.uniform(0, 10)
        for m in ("m1", "m2"):
            for r, bias in (("t1", 0.0), ("t2", 1.0), ("t3", -0.5)):
                lines.append(f"q{i},{m},{r},{true + bias + rng.normal(0, 0.5):.3f},math")
    p = tmp_path / "scores.csv"
    p.write_text("\n".join(lines) + "\n")
    run = grading.main(grading.GradingConfig(scores=str(p), n_sim=200, out=str(tmp_path / "g")))
    res = json.loads((run / "results.json").read_text())
    assert res["n_answers"] == 60 and res["n_raters"] == 3
    assert res["isr_per_answer"]["null"]["mean"] == pytest.approx(1 / 3, abs=1e-6)
    assert res["icc"]["icc2_k"] > 0.9 and res["krippendorff_alpha_interval"] > 0.85
    assert res["raters"]["t2"]["mean_dev"] > 0.5 > res["raters"]["t1"]["mean_dev"]
    assert (run / "plots" / "isr_vs_null.png").is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,model,rater,score\nq1,m,t,abc\n")
    with pytest.raises(LmlabError, match=r"bad.csv:2: score must be a number"):
        grading.read_scores(bad)
