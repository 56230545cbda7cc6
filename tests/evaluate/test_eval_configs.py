"""configs/eval/ YAMLs of the exam/IRT/grading commands resolve against their config dataclasses unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lmlab.config import resolve, to_dict

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {"eval exam": "lmlab.evaluate.exam:ExamConfig",
           "eval matrix": "lmlab.evaluate.exam:MatrixConfig",
           "eval irt fit": "lmlab.evaluate.irt:IrtFitConfig",
           "eval irt diagnose": "lmlab.evaluate.irt:IrtDiagnoseConfig",
           "eval irt report": "lmlab.evaluate.irt:IrtReportConfig",
           "eval grading": "lmlab.evaluate.grading:GradingConfig"}
HEADER = re.compile(r"^# lmlab (?P<words>[a-z ]+?) -c (?P<path>\S+)\s*$")
FILES = [p for p in sorted((ROOT / "configs" / "eval").glob("*.yaml"))
         if (m := HEADER.match(p.read_text().splitlines()[0])) and m["words"] in CLASSES]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_eval_config_resolves(path):
    import importlib

    words = HEADER.match(path.read_text().splitlines()[0])["words"]
    mod, _, cls = CLASSES[words].partition(":")
    cfg = resolve(getattr(importlib.import_module(mod), cls), path)
    data = yaml.safe_load(path.read_text())
    got = to_dict(cfg)
    for k, v in data.items():
        assert got[k] == v, f"{path.name}: {k}"
