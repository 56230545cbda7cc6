"""The proposed ``lmlab interp sae train|eval|dashboard`` leaves (added to cli.COMMANDS by the lead) work."""

from __future__ import annotations

import json

import pytest

from lmlab import cli

LEAVES = [
    cli.Leaf("interp sae train", "lmlab.interp.sae:main_train", "lmlab.interp.sae:SAETrainConfig",
             "train Top-K sparse autoencoders (Llama Scope recipe) on every hook point from one LM pass", ("model",)),
    cli.Leaf("interp sae eval", "lmlab.interp.sae:main_eval", "lmlab.interp.sae:SAEEvalConfig",
             "SAE metrics: L0, explained variance, dead latents, delta CE / KL spliced in, JumpReLU conversion",
             ("sae",)),
    cli.Leaf("interp sae dashboard", "lmlab.interp.dashboard:main", "lmlab.interp.dashboard:SAEDashboardConfig",
             "static HTML feature dashboards (top contexts, logit effects, density) with a searchable index",
             ("sae",)),
]


@pytest.fixture(scope="module")
def sae_text(tmp_path_factory, tiny_corpus):
    """~30 kB of paragraphs (tiny_corpus, repeated) as one text file: enough for a train and a val split."""
    docs = [d.strip() for d in tiny_corpus.texts("train") + tiny_corpus.texts("val") if d.strip()]
    path = tmp_path_factory.mktemp("sae-data") / "text.txt"
    path.write_text("\n\n".join(f"{d} ({i})" for i in range(3) for d in docs) + "\n")
    return path


@pytest.fixture
def commands(monkeypatch):
    have = {c.words for c in cli.COMMANDS}
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [c for c in LEAVES if c.words not in have])


@pytest.mark.parametrize("words", [c.words for c in LEAVES])
def test_help(commands, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*words.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and ("--k" in out or "--tokens" in out)


def test_train_from_the_command_line(commands, ref_zoo, sae_text, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["interp", "sae", "train", "ref:dense", "--hooks", "blocks.*.hook_resid_post", "--k", "4",
                   "--expansion", "2", "--tokens", "2k", "--batch-size", "256", "--data", str(sae_text),
                   "--max-bytes", "200000", "--seq-len", "32", "--buffer-tokens", "1024", "--eval-tokens", "0",
                   "--out", str(out), "-q"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["saes"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}


def test_bad_hook_is_one_line(commands, ref_zoo, sae_text, tmp_path, capsys):
    rc = cli.main(["interp", "sae", "train", "ref:dense", "--hooks", "L9Z", "--data", str(sae_text),
                   "--out", str(tmp_path / "x"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown hook name 'L9Z'" in err and "blocks.0.hook_resid_pre" in err
    rc = cli.main(["interp", "sae", "eval", "--out", str(tmp_path / "y"), "-q"])
    assert rc == 2 and "give at least one SAE" in capsys.readouterr().err


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda c: c.words)
def test_config_show_resolves(commands, leaf, capsys, tmp_path):
    import yaml

    from lmlab.config import resolve, to_dict

    assert cli.main(["config", "show", *leaf.words.split()]) == 0
    out = capsys.readouterr().out
    cls = cli._import(leaf.config)
    assert yaml.safe_load(out) == to_dict(cls())
    (tmp_path / "c.yaml").write_text(out)
    assert resolve(cls, tmp_path / "c.yaml") == cls()
