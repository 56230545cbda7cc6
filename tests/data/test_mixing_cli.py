"""The proposed CLI rows for ``lmlab data mix ...`` work with lmlab.cli's machinery (help from attribute
docstrings, positional arguments, documented default YAML), and match cli.COMMANDS once they are registered."""

from __future__ import annotations

import pytest
import yaml

from lmlab import cli
from lmlab.config import dump_yaml, from_dict

ROWS = [
    cli.Leaf("data mix fit", "lmlab.data.mixing:fit_main", "lmlab.data.mixing:FitConfig",
             "fit data mixing laws to a table of runs (mixture -> losses)", ("data",)),
    cli.Leaf("data mix predict", "lmlab.data.mixing:predict_main", "lmlab.data.mixing:PredictConfig",
             "predict validation losses of mixtures with a fitted law", ("law",)),
    cli.Leaf("data mix optimize", "lmlab.data.mixing:optimize_main", "lmlab.data.mixing:OptimizeConfig",
             "the mixture minimising the predicted loss (convex, with availability caps)", ("law",)),
    cli.Leaf("data mix run", "lmlab.data.mixing:run_main", "lmlab.data.mixing:RunConfig",
             "nested pipeline: proxy runs -> step/size laws -> mixing law -> optimum -> verification"),
    cli.Leaf("data mix continual", "lmlab.data.mixing:continual_main", "lmlab.data.mixing:ContinualConfig",
             "continual pretraining: critical share of original data", ("model",)),
]


@pytest.mark.parametrize("leaf", ROWS, ids=[r.words for r in ROWS])
def test_leaf_help_positional_and_default_yaml(leaf):
    cls = cli._import(leaf.config)
    assert callable(cli._import(leaf.target))
    text = cli._leaf_parser(leaf, cls).format_help()
    assert "--seed" in text and "--out" in text
    for name in leaf.positional:
        values, over = cli._split_positional(leaf, cls, ["X.csv", "seed=3"])
        assert values[name] in ("X.csv", ["X.csv"]) and over == ["seed=3"]
    data = yaml.safe_load(dump_yaml(cls(), with_docs=True))
    assert from_dict(cls, data) == cls()  # the documented default round-trips


def test_rows_match_registry_when_registered():
    registered = {c.words: c for c in cli.COMMANDS if c.words.startswith("data mix")}
    for row in ROWS:
        if row.words in registered:
            assert registered[row.words].target == row.target and registered[row.words].config == row.config
