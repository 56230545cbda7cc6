"""The CLI rows proposed for cli.COMMANDS work: --help, a real run through ``lmlab.cli.main``, one-line errors."""

from __future__ import annotations

import json

import pytest

from lmlab import cli

ROWS = [
    cli.Leaf("compress bitstack", "lmlab.compress.bitstack:main", "lmlab.compress.bitstack:BitStackConfig",
             "BitStack: decompose a model into sorted ~1-bit residual blocks (one artifact, any size)", ("model",)),
    cli.Leaf("compress load", "lmlab.compress.bitstack:load_main", "lmlab.compress.bitstack:LoadConfig",
             "load a BitStack at memory budgets: exact bytes, bits/byte, samples, HF export", ("stack",)),
    cli.Leaf("compress bitstack-sizes", "lmlab.compress.bitstack:sizes_main", "lmlab.compress.bitstack:SizesConfig",
             "print a BitStack's size range (min, max, number of sizes, step sizes)", ("stack",)),
    cli.Leaf("compress rankk", "lmlab.compress.rankk:main", "lmlab.compress.rankk:RankKConfig",
             "data-free joint rank-k compression of linears sharing an input", ("model",)),
    cli.Leaf("compress quant", "lmlab.compress.quant:main", "lmlab.compress.quant:QuantConfig",
             "RTN / GPTQ weight-only quantisation baselines", ("model",)),
]


@pytest.fixture
def commands(monkeypatch):
    have = {c.words for c in cli.COMMANDS}
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [r for r in ROWS if r.words not in have])


@pytest.mark.parametrize("words", [r.words for r in ROWS])
def test_help(commands, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(words.split() + ["--help"])
    assert e.value.code == 0
    assert "usage: lmlab " + words in capsys.readouterr().out


def test_cli_load_and_errors(commands, small_stack, text_file, tmp_path, capsys):
    from lmlab.compress.bitstack import read_order

    sizes = read_order(small_stack)["sizes"]["average"]
    rc = cli.main(["compress", "load", str(small_stack), "--max-memory", f"{sizes[4]}", "--eval", "none",
                   "--samples", "0", "--out", str(tmp_path / "run")])
    assert rc == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert res[0]["bytes"] == sizes[4]
    assert cli.main(["compress", "bitstack-sizes", str(small_stack)]) == 0
    assert f"{sizes[0]:,} B" in capsys.readouterr().out
    for argv, msg in [
        (["compress", "load", str(small_stack), "--max-memory", "1KiB"], "below this stack's minimum"),
        (["compress", "load", str(tmp_path / "nope")], "not found"),
        (["compress", "load", str(small_stack), "--max-memory", "huge"], "cannot parse"),
        (["compress", "bitstack", "ref:mamba", "--data-free"], "no decomposable"),
        (["compress", "bitstack", "ref:nope"], "unknown reference model"),
        (["compress", "quant", "ref:dense", "--bits", "0"], "bits"),
    ]:
        capsys.readouterr()
        assert cli.main(argv + ["--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err.strip()
        # one error line (transformers' own weight-loading bar may precede it), no traceback
        assert "Traceback" not in err and msg in err.splitlines()[-1], (argv, err)
        assert err.splitlines()[-1].startswith("lmlab compress"), err
        assert not (tmp_path / "x").exists()
