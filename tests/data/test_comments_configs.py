"""configs/data/comments_*.yaml resolve against their command's config class (before and after the CLI rows exist)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmlab.config import resolve, to_dict
from lmlab.data import comments as C

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {"density": C.DensityConfig, "generate": C.GenerateConfig, "filter": C.FilterConfig,
           "tune": C.TuneConfig, "loop": C.LoopConfig, "eval": C.EvalConfig}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "data").glob("comments*.yaml")), ids=lambda p: p.name)
def test_comment_configs_resolve(path):
    first = path.read_text().splitlines()[0]
    words = first.split(" -c ")[0].removeprefix("# lmlab ").split()
    assert words[:2] == ["data", "comments"] and first.endswith(f"-c configs/data/{path.name}")
    cfg = resolve(CLASSES[words[2]], path)
    got = to_dict(cfg)
    for k, v in yaml.safe_load(path.read_text()).items():
        assert got[k] == v, k
