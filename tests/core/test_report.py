"""report.html from real run dirs (made with start_run): content, escaping, status badges, CLI behaviour."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.config import RunArgs
from lmlab.core.plotting import line_plot
from lmlab.core.report import BADGE_BAD, ReportConfig, main, render_report, write_report
from lmlab.core.runs import start_run, write_json
from lmlab.errors import LmlabError

OK = '<span class="badge ok">'
EVIL = "<script>alert('x')</script> & \"quotes\""
LMLAB = Path(sys.executable).parent / "lmlab"


def _sections(html: str) -> list[str]:
    return re.findall(r'<section class="run[^"]*".*?</section>', html, flags=re.S)


@pytest.fixture()
def runs(tmp_path) -> tuple[Path, Path]:
    ok_dir, bad_dir = tmp_path / "good-run", tmp_path / "bad-run"
    with start_run(RunArgs(out=str(ok_dir), seed=7), "train lm") as run:
        for step in range(5):
            run.log({"step": step, "loss": 3.0 - 0.1 * step})
        line_plot(run.plots / "loss.png", list(range(5)), {"loss": [3.0, 2.9, 2.8, 2.7, 2.6]}, "loss")
        run.write_samples([{"prompt": "2+2=", "completion": EVIL}, {"prompt": "p2", "completion": "c2"}])
        run.finish({
            "val_loss": 2.123456789,
            "eval": {"ppl": 8.3761234, "bpb": 1.5, "domains": {"code": 0.98765}},
            "per_domain": [{"domain": "code", "bpb": 1.23456}, {"domain": "prose", "bpb": 2.5}],
            "curve": list(range(100)),
            "n_params": 12345,
        })
    with pytest.raises(RuntimeError), start_run(RunArgs(out=str(bad_dir)), "compress rankk") as run:
        run.write_samples([{"text": "partial"}])
        raise RuntimeError("exploded <b>here</b>")
    return ok_dir, bad_dir


def test_render_report_contents(runs):
    ok_dir, bad_dir = runs
    html = render_report([ok_dir, bad_dir], title="T <1>", summaries={str(ok_dir): "Loss fell.\n\nSecond para."})
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<title>T &lt;1&gt;</title>" in html
    ok_sec, bad_sec = _sections(html)
    # results: flattened dotted keys, 4 significant digits, list of dicts as a sub-table, long lists truncated
    for key in ("val_loss", "eval.ppl", "eval.bpb", "eval.domains.code", "per_domain", "n_params"):
        assert f"<th>{key}</th>" in ok_sec, key
    assert ">2.123<" in ok_sec and ">8.376<" in ok_sec and ">0.9877<" in ok_sec and "2.123456789" not in ok_sec
    assert "<th>domain</th>" in ok_sec and ">1.235<" in ok_sec
    assert "(100 items)" in ok_sec
    # meta, plot, samples, config, summary
    assert "train lm" in ok_sec and ">7<" in ok_sec  # command and seed
    assert ok_sec.count("data:image/png;base64,") == 1 and "loss.png" in ok_sec
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in ok_sec
    assert "<script>" not in html
    assert "<details><summary>config.yaml</summary>" in ok_sec and "seed: 7" in ok_sec
    assert "<p>Loss fell.</p><p>Second para.</p>" in ok_sec
    assert OK in ok_sec and BADGE_BAD not in ok_sec
    # the failed run is never shown as complete
    assert BADGE_BAD in bad_sec and OK not in bad_sec
    assert "status: failed" in bad_sec and "exploded &lt;b&gt;here&lt;/b&gt;" in bad_sec
    assert "no results.json" in bad_sec
    assert "1 incomplete or failed" in html


def test_running_or_resultless_runs_are_incomplete(tmp_path, runs):
    ok_dir, _ = runs
    running = tmp_path / "running"
    running.mkdir()
    write_json(running / "meta.json", {"command": "x", "status": "running"})
    # results.json present but the status was never set to complete
    write_json(running / "results.json", {"a": 1})
    (sec,) = _sections(render_report([running]))
    assert BADGE_BAD in sec and "status: running" in sec
    # a complete status without results.json is not complete either
    meta = json.loads((ok_dir / "meta.json").read_text())
    nores = tmp_path / "nores"
    nores.mkdir()
    write_json(nores / "meta.json", meta)
    (sec,) = _sections(render_report([nores]))
    assert BADGE_BAD in sec and "no results.json" in sec


def test_extra_sections_and_intro(runs):
    ok_dir, _ = runs
    html = render_report([ok_dir], intro_html="<p id='intro'>hi</p>", sections=[("Overview <x>", "<b>ok</b>")])
    assert "<p id='intro'>hi</p>" in html  # trusted HTML
    assert "<h2>Overview &lt;x&gt;</h2><b>ok</b>" in html


def test_write_report_and_main(tmp_path, runs):
    ok_dir, bad_dir = runs
    out = write_report([ok_dir], tmp_path / "sub" / "r.html", title="x")
    assert out.is_file() and "val_loss" in out.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temp file left
    default = main(ReportConfig(runs=[str(ok_dir), str(bad_dir)]))
    assert default == ok_dir / "report.html" and BADGE_BAD in default.read_text()
    with pytest.raises(LmlabError, match="not found"):
        main(ReportConfig(runs=[str(ok_dir), str(tmp_path / "nope")]))
    with pytest.raises(LmlabError, match="no meta.json"):
        main(ReportConfig(runs=[str(tmp_path / "sub")]))
    with pytest.raises(LmlabError, match="no run directories"):
        main(ReportConfig(runs=[]))


def test_report_module_does_not_import_torch():
    code = "import sys, lmlab.core.report; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_subprocess(tmp_path, runs):
    ok_dir, bad_dir = runs
    out = tmp_path / "r.html"
    proc = subprocess.run([str(LMLAB), "report", str(ok_dir), str(bad_dir), "--out", str(out), "--title", "CLI"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "<title>CLI</title>" in out.read_text()
    assert proc.stdout.strip() == str(out)
    missing = subprocess.run([str(LMLAB), "report", str(tmp_path / "missing")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode != 0
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "run directory not found" in lines[0], missing.stderr
