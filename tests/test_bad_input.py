"""Bad input through the real entry point (``python -m lmlab`` in a subprocess): one clear error line on stderr,
a non-zero exit, no traceback, and no run directory that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CASES = {
    "missing-model-path": (["eval", "ppl", "/nonexistent/model", "--out", "out"], "model path not found"),
    "empty-corpus-file": (["train", "lm", "data=empty.txt", "optim.steps=1", "--out", "out"], "no text found"),
    "malformed-yaml": (["eval", "ppl", "ref:dense", "-c", "bad.yaml", "--out", "out"], "malformed YAML in bad.yaml"),
    "unknown-config-key": (["eval", "ppl", "ref:dense", "nosuchkey=1", "--out", "out"], "no field 'nosuchkey'"),
    "unwritable-out": (["eval", "ppl", "ref:dense", "data=math", "max_tokens=64", "window=16", "samples=0",
                        "--out", "a_file/out"], "cannot write run directory"),
    "missing-report-dir": (["report", "/nonexistent/run", "--out", "out/report.html"], "/nonexistent/run"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, ref_zoo, tmp_path):
    args, expected = CASES[case]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.yaml").write_text("model: [ref:dense\nwindow: 3\n")
    (tmp_path / "a_file").write_text("a regular file, not a directory\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMLAB_CACHE": os.environ["LMLAB_CACHE"]}
    r = subprocess.run([sys.executable, "-m", "lmlab", *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=180)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("lmlab ") and ": error: " in lines[0], lines[0]
    assert expected in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    # nothing that looks like a finished run
    assert not list(tmp_path.rglob("results.json"))
    for meta in tmp_path.rglob("meta.json"):
        assert json.loads(meta.read_text()).get("status") != "complete", meta
    assert not (tmp_path / "out").exists()
