"""Every YAML under configs/ names its command in its first line (``# lmlab <words> -c <path>``) and resolves
against that command's config dataclass; the reference recipes equal the ``lmlab zoo train`` defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lmlab import cli
from lmlab.config import ConfigError, resolve, to_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.y*ml"))
HEADER = re.compile(r"^# lmlab (?P<words>[a-z ]+?) -c (?P<path>\S+)\s*$")


def leaf_of(path: Path) -> cli.Leaf:
    """The CLI leaf a config file belongs to, from its first line."""
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    m = HEADER.match(first)
    if not m:
        raise AssertionError(f"{path}: first line must be '# lmlab <command words> -c <path>', got {first!r}")
    leaf = next((c for c in cli.COMMANDS if c.words == m["words"]), None)
    if leaf is None:
        raise AssertionError(f"{path}: unknown command 'lmlab {m['words']}'")
    return leaf


def check_config(path: Path):
    """Resolve ``path`` against its leaf's config class; every value in the file must arrive unchanged."""
    cls = cli._import(leaf_of(path).config)
    cfg = resolve(cls, path)
    data = yaml.safe_load(path.read_text())
    resolved = to_dict(cfg)

    def same(a, b, key):
        if isinstance(a, dict):
            for k, v in a.items():
                same(v, b[k], f"{key}{k}.")
        else:
            assert b == a, f"{path}: {key[:-1]} is {b!r} after resolving, file says {a!r}"

    same(data, resolved, "")
    return cfg


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"zoo/dense.yaml", "zoo/mamba.yaml", "train/lm_tiny.yaml", "eval/ppl.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in CONFIGS])
def test_config_resolves(path):
    check_config(path)
    m = HEADER.match(path.read_text().splitlines()[0])
    assert (ROOT / m["path"]).resolve() == path.resolve(), "the header's -c path must point at the file itself"


@pytest.mark.parametrize("name", ["dense", "mamba"])
def test_reference_recipes_match_defaults(name):
    """configs/zoo/NAME.yaml is the documented recipe: equal to ``lmlab zoo train NAME`` with no options."""
    from lmlab.core.zoo import ZooTrainConfig

    assert check_config(ROOT / "configs" / "zoo" / f"{name}.yaml") == ZooTrainConfig(name=name)


def test_checker_rejects_bad_files(tmp_path):
    """The checks above can fail: an unknown key, a wrong type, an unknown command, a missing header."""
    good = (ROOT / "configs" / "eval" / "ppl.yaml").read_text()
    cases = {
        "unknown_key.yaml": (good + "no_such_key: 1\n", ConfigError, "no_such_key"),
        "nested_unknown.yaml": ((ROOT / "configs" / "train" / "lm_tiny.yaml").read_text()
                                + "  no_such_optim: 1\n", ConfigError, "optim.no_such_optim"),
        "bad_type.yaml": (good.replace("window: 256", "window: wide"), ConfigError, "window"),
        "bad_command.yaml": (good.replace("# lmlab eval ppl", "# lmlab eval nosuch"), AssertionError, "unknown"),
        "no_header.yaml": ("window: 64\n", AssertionError, "first line"),
    }
    for name, (text, exc, match) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(exc, match=match):
            check_config(p)
