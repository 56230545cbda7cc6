"""configs/compress/*.yaml resolve against their config dataclasses; the tour section runs end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmlab.config import resolve, to_dict

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {"bitstack": "lmlab.compress.bitstack:BitStackConfig", "rankk": "lmlab.compress.rankk:RankKConfig",
           "quant": "lmlab.compress.quant:QuantConfig"}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "compress").glob("*.yaml")), ids=lambda p: p.name)
def test_compress_configs_resolve(path):
    import importlib

    words = path.read_text().splitlines()[0].split(" -c ")[0].split()
    assert words[:3] == ["#", "lmlab", "compress"], words
    mod, _, cls = CLASSES[words[3]].partition(":")
    cfg = resolve(getattr(importlib.import_module(mod), cls), path)
    data, got = yaml.safe_load(path.read_text()), to_dict(cfg)
    assert all(got[k] == v for k, v in data.items()), path


@pytest.mark.slow
def test_tour_section(ref_zoo, tmp_path):
    from lmlab.compress.bitstack import tour_section
    from lmlab.tour import TourConfig

    path, summary = tour_section(TourConfig(threads=1), tmp_path / "compress")
    res = json.loads((path / "results.json").read_text())
    assert len(res["curve"]) >= 3 and (path / "plots" / "bitstack_curve.png").is_file()
    assert res["curve"][0]["bytes"] < res["curve"][-1]["bytes"]
    samples = [json.loads(x) for x in (path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and samples[0]["budget"] < samples[1]["budget"]
    assert "BitStack of ref:dense" in summary
