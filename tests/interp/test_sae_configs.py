"""configs/interp/*.yaml resolve against their command's config class (before the CLI rows land, too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmlab.config import resolve, to_dict
from lmlab.interp.dashboard import SAEDashboardConfig
from lmlab.interp.generalization import TransferConfig
from lmlab.interp.geometry import GeometryConfig
from lmlab.interp.sae import SAEEvalConfig, SAETrainConfig

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {"interp sae train": SAETrainConfig, "interp sae eval": SAEEvalConfig,
           "interp sae dashboard": SAEDashboardConfig, "interp sae transfer": TransferConfig,
           "interp sae geometry": GeometryConfig}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "interp").glob("*.yaml")), ids=lambda p: p.name)
def test_interp_config_resolves(path):
    first = path.read_text().splitlines()[0]
    words = first.removeprefix("# lmlab ").split(" -c ")[0]
    assert first.endswith(f"-c configs/interp/{path.name}") and words in CLASSES
    cfg = to_dict(resolve(CLASSES[words], path))
    for k, v in yaml.safe_load(path.read_text()).items():
        assert cfg[k] == v, k
