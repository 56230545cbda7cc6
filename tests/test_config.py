"""lmlab.config: defaults -> YAML file -> overrides, type checks, field docs, documented YAML round trips."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from lmlab.config import (
    ConfigError,
    RunArgs,
    dump_yaml,
    field_docs,
    from_dict,
    load_yaml,
    parse_override,
    resolve,
    to_dict,
)
from lmlab.errors import LmlabError


@dataclass
class Sub:
    """A nested section."""

    k: int = 32
    """Number of active latents."""
    alpha: float = 0.5
    """Mixing weight, spread over
    two source lines."""


@dataclass
class Empty:
    """A section without fields."""


@dataclass
class Cfg(RunArgs):
    """Test config inheriting the common run fields."""

    lr: float = 3e-4
    """Learning rate: AdamW's step size (# not a comment)."""
    steps: int = 10
    """Optimiser steps."""
    name: str = "tiny"
    """Model name."""
    flag: bool = False
    """A switch."""
    tags: list[str] = field(default_factory=lambda: ["code", "prose"])
    """Corpus domains."""
    layers: list[int] = field(default_factory=lambda: [0, 1])
    """Layer indices."""
    limit: int | None = None
    """Optional cap."""
    sub: Sub = field(default_factory=Sub)
    """SAE settings."""
    empty: Empty = field(default_factory=Empty)
    """Nothing inside."""


def write(tmp_path, text: str, name: str = "c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------------------------
# building and resolving


def test_from_dict_builds_nested_dataclasses():
    cfg = from_dict(Cfg, {"lr": 1, "sub": {"k": 8}, "seed": 3})
    assert isinstance(cfg.sub, Sub)
    assert cfg.sub.k == 8 and cfg.sub.alpha == 0.5  # untouched nested field keeps its default
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # YAML int for a float field becomes a float
    assert cfg.seed == 3 and cfg.device == "auto"


def test_resolve_order_defaults_file_extra_overrides(tmp_path):
    assert resolve(Cfg) == Cfg()
    f = write(tmp_path, "lr: 0.1\nsteps: 5\nname: from-file\nsub:\n  k: 4\n")
    cfg = resolve(Cfg, f)
    assert (cfg.lr, cfg.steps, cfg.name, cfg.sub.k) == (0.1, 5, "from-file", 4)
    cfg = resolve(Cfg, f, ["lr=0.3", "sub.alpha=0.25"], extra={"lr": 0.2, "name": "from-flag"})
    assert cfg.lr == 0.3  # override beats flag beats file
    assert cfg.name == "from-flag"  # flag beats file
    assert cfg.steps == 5 and cfg.sub.k == 4  # file beats defaults, and a nested override merges
    assert cfg.sub.alpha == 0.25
    assert cfg.tags == ["code", "prose"]


def test_empty_yaml_file_means_defaults(tmp_path):
    assert resolve(Cfg, write(tmp_path, "# only a comment\n")) == Cfg()


@pytest.mark.parametrize(
    ("text", "attr", "expected"),
    [
        ("lr=1e-3", "lr", 0.001),  # PyYAML reads 1e-3 as a string; the float field still gets a float
        ("lr=2.5E-2", "lr", 0.025),
        ("flag=true", "flag", True),
        ("flag=false", "flag", False),
        ("layers=[0, 1, 5]", "layers", [0, 1, 5]),
        ("layers=3,4", "layers", [3, 4]),
        ("layers=7", "layers", [7]),
        ("tags=code,math", "tags", ["code", "math"]),
        ("tags=[a, b]", "tags", ["a", "b"]),
        ("limit=null", "limit", None),
        ("limit=12", "limit", 12),
        ("name=1.5", "name", "1.5"),
        ("sub.k=64", "sub", Sub(k=64)),
        ("sub-field=1", None, None),  # dashes become underscores, checked below
    ],
)
def test_overrides_parse_yaml_scalars(text, attr, expected):
    if attr is None:
        assert parse_override(text) == ("sub_field", 1)
        return
    cfg = resolve(Cfg, None, [text])
    assert getattr(cfg, attr) == expected
    assert type(getattr(cfg, attr)) is type(expected)


def test_override_value_may_contain_equals():
    assert parse_override("name=a=b") == ("name", "a=b")
    assert resolve(Cfg, None, ["name=a=b"]).name == "a=b"


@pytest.mark.parametrize("text", ["noequals", "=3"])
def test_malformed_override_is_config_error(text):
    with pytest.raises(ConfigError, match="override"):
        resolve(Cfg, None, [text])


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        resolve(Cfg, None, ["lrr=0.1"])
    msg = str(e.value)
    assert "'lrr'" in msg
    for name in ("lr", "steps", "sub", "seed", "device"):  # own and inherited fields are listed
        assert f"'{name}'" in msg
    assert "\n" not in msg


def test_unknown_nested_key_names_full_path_and_section_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve(Cfg, None, ["sub.kk=1"])
    msg = str(e.value)
    assert "'sub.kk'" in msg and "'k'" in msg and "'alpha'" in msg
    assert "'lr'" not in msg  # the nested section's keys, not the top level's
    with pytest.raises(ConfigError, match="sub.kk"):
        resolve(Cfg, write(tmp_path, "sub:\n  kk: 1\n"))


def test_config_error_is_an_lmlab_error():
    assert issubclass(ConfigError, LmlabError)


def test_malformed_yaml_reports_line_number(tmp_path):
    f = write(tmp_path, "lr: 0.1\nsteps: 3\nname: a: b\n")
    with pytest.raises(ConfigError) as e:
        resolve(Cfg, f)
    msg = str(e.value)
    assert "line 3" in msg and str(f) in msg and "malformed YAML" in msg
    f = write(tmp_path, "lr: 0.1\n  steps: 3\n", "d.yaml")
    with pytest.raises(ConfigError, match="line 2"):
        load_yaml(f)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        resolve(Cfg, write(tmp_path, text))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(Cfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path)  # a directory is not a config file
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"lr: \xff\xfe\x00\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_yaml(bad)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("steps=abc", "steps: expected an integer"),
        ("steps=1.5", "steps: expected an integer"),
        ("steps=true", "steps: expected an integer"),
        ("lr=fast", "lr: expected a number"),
        ("flag=maybe", "flag: expected true/false"),
        ("name=[1, 2]", "name: expected a string"),
        ("layers=a,b", "layers: expected an integer"),
        ("limit=abc", "limit: cannot use"),
        ("steps=null", "steps: expected int, got null"),
        ("device=null", "device: expected str, got null"),
        ("sub=5", "sub: is a section"),
        ("sub.k.x=1", "sub.k: expected an integer"),
    ],
)
def test_type_errors_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve(Cfg, None, [override])


def test_override_below_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'limit' is not a section"):
        resolve(Cfg, None, ["limit=3", "limit.x=1"])


def test_override_text_that_looks_like_yaml_syntax_stays_text():
    assert parse_override("name=#1") == ("name", "#1")
    assert parse_override("name=Q: x") == ("name", "Q: x")
    assert parse_override("name=~") == ("name", None)
    assert parse_override("sub={k: 3}") == ("sub", {"k": 3})
    assert resolve(Cfg, None, ["sub={k: 3}"]).sub == Sub(k=3)


def test_type_error_from_file(tmp_path):
    with pytest.raises(ConfigError, match="sub.k: expected an integer"):
        resolve(Cfg, write(tmp_path, "sub:\n  k: many\n"))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"device": "tpu"}, "device must be"),
        ({"device": "gpu:0"}, "device must be"),
        ({"dtype": "int8"}, "dtype must be"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"threads": -2}, "threads must be >= 1"),
    ],
)
def test_runargs_post_init_rejects(kw, match):
    with pytest.raises(ConfigError, match=match):
        RunArgs(**kw)
    key, value = next(iter(kw.items()))
    with pytest.raises(ConfigError, match=match):  # and through resolve, as the CLI calls it
        resolve(Cfg, None, [f"{key}={value}"])


@pytest.mark.parametrize(
    "kw",
    [{"device": "cpu"}, {"device": "cuda:1"}, {"device": "mps"}, {"dtype": "bf16"}, {"dtype": "float16"},
     {"threads": 1}, {"threads": None}],
)
def test_runargs_accepts(kw):
    args = RunArgs(**kw)
    key, value = next(iter(kw.items()))
    assert getattr(args, key) == value


# ---------------------------------------------------------------------------------------------------------------
# docs and YAML dumps


def test_field_docs_reads_attribute_docstrings_including_inherited():
    docs = field_docs(Cfg)
    assert docs["lr"] == "Learning rate: AdamW's step size (# not a comment)."
    assert docs["steps"] == "Optimiser steps."
    assert docs["seed"] == "Seed for python, numpy and torch."  # from RunArgs
    assert docs["device"] == "auto | cpu | cuda | cuda:N | mps."
    assert set(docs) == {f.name for f in dataclasses.fields(Cfg)}
    assert field_docs(Sub) == {"k": "Number of active latents.",
                               "alpha": "Mixing weight, spread over two source lines."}


def test_dump_yaml_round_trips_through_resolve(tmp_path):
    cfg = resolve(Cfg, None, ["lr=1e-3", "tags=a,b", "sub.k=7", "limit=3", "flag=true", "name=x: y", "seed=5"])
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)
    assert resolve(Cfg, write(tmp_path, text)) == cfg
    assert resolve(Cfg, write(tmp_path, dump_yaml(Cfg()), "d.yaml")) == Cfg()


def test_dump_yaml_with_docs_has_comments_and_same_values(tmp_path):
    cfg = resolve(Cfg, None, ["lr=0.01", "sub.alpha=0.1", "name=#hash"])
    text = dump_yaml(cfg, with_docs=True)
    lines = text.splitlines()
    assert "# Learning rate: AdamW's step size (# not a comment)." in lines
    assert "# Seed for python, numpy and torch." in lines
    assert "  # Mixing weight, spread over two source lines." in lines  # nested docs indented with their section
    assert lines.index("# Optimiser steps.") + 1 == lines.index("steps: 10")  # a comment sits above its field
    assert yaml.safe_load(text) == yaml.safe_load(dump_yaml(cfg)) == to_dict(cfg)
    assert resolve(Cfg, write(tmp_path, text)) == cfg


def test_partial_nested_override_keeps_the_fields_own_default():
    """`optim.steps=10` must start from the field's default_factory (e.g. a recipe), not the class defaults."""
    from lmlab.core.pretrain import OptimConfig
    from lmlab.core.zoo import REF_OPTIM, ZooTrainConfig

    cfg = resolve(ZooTrainConfig, None, ["optim.steps=10"])
    assert cfg.optim.steps == 10
    assert cfg.optim.lr == REF_OPTIM.lr and cfg.optim.autocast == REF_OPTIM.autocast
    assert REF_OPTIM.lr != OptimConfig().lr  # the test would be vacuous otherwise
