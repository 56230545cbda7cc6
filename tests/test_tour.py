"""``lmlab tour`` on the tiny reference zoo: the foundation section end to end, the report, and section failures
that are recorded without hiding the other sections."""

from __future__ import annotations

import json

import pytest

from lmlab import tour
from lmlab.config import ConfigError, RunArgs
from lmlab.core.models import load_model, n_params
from lmlab.core.runs import start_run
from lmlab.errors import LmlabError


def test_tour_foundation(ref_zoo, tmp_path, tiny_tok):
    report = tour.main(tour.TourConfig(out=str(tmp_path / "tour"), max_tokens=256, device="cpu"))
    root = tmp_path / "tour"
    assert report == root / "report.html"
    html = report.read_text()
    assert "foundation" in html and "data:image/png;base64," in html
    assert "INCOMPLETE/FAILED" not in html
    sections = json.loads((root / "sections.json").read_text())
    assert list(sections) == list(tour.SECTIONS)
    assert sections["foundation"]["status"] == "complete"
    assert "ref:dense" in sections["foundation"]["summary"] and "bits/byte" in sections["foundation"]["summary"]
    res = json.loads((root / "results.json").read_text())
    assert res["sections"] == sections and res["report"] == str(report)
    assert json.loads((root / "meta.json").read_text())["status"] == "complete"
    # the foundation section's own run dir
    f = root / "foundation"
    fres = json.loads((f / "results.json").read_text())
    assert fres["tokenizer"]["vocab_size"] == len(tiny_tok)  # the tiny reference tokenizer from ref_zoo
    assert [d["domain"] for d in fres["domains"]] == ["code", "prose", "math"]
    assert all(d["train_docs"] > 0 and d["val_docs"] > 0 for d in fres["domains"])
    rows = {r["model"]: r for r in fres["models"]}
    assert set(rows) == {"ref:dense", "ref:mamba"}
    for spec, row in rows.items():
        assert row["params"] == n_params(load_model(spec))
        assert all(row[f"{d} bits/byte"] > 0 and row[f"{d} ppl"] > 1 for d in ("code", "prose", "math"))
    assert fres["eval"]["max_tokens_per_domain"] == 256
    assert (f / "plots" / "bits_per_byte.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((f / "samples.jsonl").read_text().splitlines()) == 2 * 3


def test_unknown_section_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown tour section.*'nope'.*foundation"):
        tour.TourConfig(sections=["nope"])


def _ok(cfg, out):
    with start_run(RunArgs(out=str(out)), "tour-ok") as run:
        run.finish({"value": 1})
    return run.path, "ok section ran"


def _boom(cfg, out):
    with start_run(RunArgs(out=str(out)), "tour-boom") as run:
        run.write_samples([{"partial": True}])  # something worth keeping: the failed run dir stays
        raise RuntimeError("section exploded")


def test_failing_section_is_recorded_and_others_run(tmp_path, monkeypatch):
    monkeypatch.setitem(tour.SECTIONS, "boom", _boom)
    monkeypatch.setitem(tour.SECTIONS, "ok", _ok)
    with pytest.raises(LmlabError, match="tour sections failed: boom"):
        tour.main(tour.TourConfig(sections=["boom", "ok"], out=str(tmp_path / "tour")))
    root = tmp_path / "tour"
    sections = json.loads((root / "sections.json").read_text())
    assert sections["boom"]["status"] == "failed" and "section exploded" in sections["boom"]["error"]
    assert sections["ok"]["status"] == "complete" and sections["ok"]["summary"] == "ok section ran"
    assert json.loads((root / "boom" / "meta.json").read_text())["status"] == "failed"
    html = (root / "report.html").read_text()
    assert "INCOMPLETE/FAILED" in html and "ok section ran" in html
    assert not (root / "results.json").exists()  # the tour itself is not complete
    assert json.loads((root / "meta.json").read_text())["status"] == "failed"
