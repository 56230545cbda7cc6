"""The ``lmlab`` command tree: help, version, errors as one line, flags/positionals/overrides, every leaf's help.

Leaves are taken from ``cli.COMMANDS``; a leaf whose module is not written yet is skipped with the reason.
The generic leaf machinery is exercised in-process on a throwaway leaf from ``tests/_cli_fixture.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from lmlab import __version__, cli
from lmlab.config import resolve, to_dict

HERE = Path(__file__).resolve().parent


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, timeout=timeout)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process, as the interpreter would end it: (exit code, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse exits; a string code is printed to stderr with status 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            rc = 1
        else:
            rc = e.code or 0
    out, err = capsys.readouterr()
    return rc, out, err


def import_or_skip(spec: str):
    """``module:attr`` of a leaf; skip when the module does not exist yet (others are writing it)."""
    mod, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and (mod == e.name or mod.startswith(e.name + ".")):
            pytest.skip(f"{mod} is not written yet")
        raise
    assert hasattr(module, attr), f"{mod} has no {attr}"
    return getattr(module, attr)


LEAVES = [pytest.param(leaf, id=leaf.words.replace(" ", "-")) for leaf in cli.COMMANDS]


# ---------------------------------------------------------------------------------------------------------------
# subprocesses: the real entry points (none of these import torch, so they are fast)


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from lmlab.cli import main\n"
        "rcs = [main(['--help']), main([]), main(['zoo', '--help'])]\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('RESULT', rcs, heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "RESULT [0, 0, 0] []"


def test_module_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: lmlab")
    for word in {leaf.words.split()[0] for leaf in cli.COMMANDS} | {"config"}:
        assert f"\n  {word} " in r.stdout, word


def test_unknown_command_exits_2_with_error_line():
    r = run_cli("frobnicate")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines()[0] == "lmlab: error: unknown command 'frobnicate'"


def test_console_script_version():
    exe = Path(sys.executable).parent / "lmlab"
    if not exe.is_file():
        pytest.skip(f"no console script next to {sys.executable}")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout.strip() == f"lmlab {__version__}"


# ---------------------------------------------------------------------------------------------------------------
# the real command tree, in-process


def test_version_in_process(capsys):
    assert call(["--version"], capsys)[:2] == (0, f"lmlab {__version__}\n")
    assert call(["-V"], capsys)[:2] == (0, f"lmlab {__version__}\n")


def test_group_help_lists_children(capsys):
    groups = {leaf.words.split()[0] for leaf in cli.COMMANDS if len(leaf.words.split()) > 1}
    assert groups, "no command groups in cli.COMMANDS"
    for group in sorted(groups):
        kids = {leaf.words.split()[1] for leaf in cli.COMMANDS if leaf.words.split()[0] == group}
        for argv in ([group], [group, "--help"]):
            rc, out, err = call(argv, capsys)
            assert rc == 0 and err == ""
            assert out.startswith(f"usage: lmlab {group} <command>")
            for kid in kids:
                assert f"\n  {kid} " in out, (group, kid)


def test_unknown_subcommand_and_option(capsys):
    group = next(leaf.words.split()[0] for leaf in cli.COMMANDS if len(leaf.words.split()) > 1)
    rc, out, err = call([group, "nope"], capsys)
    assert rc == 2 and out == ""
    assert err.splitlines()[0] == f"lmlab: error: unknown command '{group} nope'"
    rc, _, err = call(["--frob"], capsys)
    assert rc == 2 and err.splitlines()[0] == "lmlab: error: unknown option '--frob'"


def test_config_show_unknown_command(capsys):
    rc, out, err = call(["config", "show", "no", "such"], capsys)
    assert rc == 2
    assert "usage: lmlab config show" in out + err


def test_import_or_skip_skips_only_a_missing_leaf_module(tmp_path, monkeypatch):
    with pytest.raises(pytest.skip.Exception, match="not written yet"):
        import_or_skip("lmlab.no_such_module_yet:Config")
    (tmp_path / "_broken_leaf.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):  # a real import error still fails
        import_or_skip("_broken_leaf:Config")


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_and_positionals_exist(leaf):
    cfg_cls = import_or_skip(leaf.config)
    assert dataclasses.is_dataclass(cfg_cls)
    assert callable(import_or_skip(leaf.target))
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    assert set(leaf.positional) <= names, f"positional {leaf.positional} not fields of {cfg_cls.__name__}"


@pytest.mark.parametrize("leaf", LEAVES)
def test_config_show_every_leaf_prints_yaml_that_resolves(leaf, capsys, tmp_path):
    cfg_cls = import_or_skip(leaf.config)
    rc, out, err = call(["config", "show", *leaf.words.split()], capsys)
    assert rc == 0, err
    data = yaml.safe_load(out)
    assert data == to_dict(cfg_cls())
    assert any(line.lstrip().startswith("# ") for line in out.splitlines())  # documented
    f = tmp_path / "shown.yaml"
    f.write_text(out)
    assert resolve(cfg_cls, f) == cfg_cls()  # what config show prints is a valid -c file


@pytest.mark.parametrize("leaf", LEAVES)
def test_every_leaf_help(leaf, capsys):
    cfg_cls = import_or_skip(leaf.config)
    rc, out, err = call([*leaf.words.split(), "--help"], capsys)
    assert rc == 0, err
    assert out.startswith(f"usage: lmlab {leaf.words}")
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        if not dataclasses.is_dataclass(hints[f.name]):
            assert "--" + f.name.replace("_", "-") in out, f.name


# ---------------------------------------------------------------------------------------------------------------
# generic leaf machinery on a throwaway leaf


@pytest.fixture
def fx(monkeypatch, tmp_path):
    """Replace the command tree by the fixture leaves; run from an empty folder; yield that folder."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setattr(cli, "COMMANDS", [
        cli.Leaf("fx", "_cli_fixture:main", "_cli_fixture:FixtureConfig", "fixture leaf", ("name",)),
        cli.Leaf("grp fxlist", "_cli_fixture:list_main", "_cli_fixture:ListConfig", "list leaf", ("runs",)),
    ])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["cfg"]


def test_fixture_run_prints_run_dir_with_results(fx, capsys):
    out = fx / "r1"
    rc, stdout, err = call(["fx", "--out", str(out)], capsys)
    assert rc == 0, err
    assert stdout.strip() == str(out)
    assert json.loads((out / "meta.json").read_text())["status"] == "complete"
    assert results(out)["name"] == "anon"


def test_fixture_default_out_is_under_runs(fx, capsys):
    rc, stdout, err = call(["fx"], capsys)
    assert rc == 0, err
    run = Path(stdout.strip())
    assert run.parent == Path("runs") and run.name.startswith("fixture-")
    assert (fx / run / "results.json").is_file()


def test_flags_positionals_and_overrides_map_to_fields(fx, capsys):
    out = fx / "r"
    rc, _, err = call(["fx", "bob", "section.k=9", "tags=x,y", "--lr", "0.5", "--no-use-bias", "--max-steps",
                       "7", "--seed", "4", "--out", str(out)], capsys)
    assert rc == 0, err
    got = results(out)
    assert got["name"] == "bob"
    assert got["lr"] == 0.5 and got["max_steps"] == 7 and got["use_bias"] is False and got["seed"] == 4
    assert got["section"] == {"k": 9} and got["tags"] == ["x", "y"]


def test_documented_argument_order_positional_flags_then_overrides(fx, capsys):
    """``lmlab <words> [POSITIONAL ...] [-c FILE] [--field VALUE ...] [key.sub=value ...]`` (cli docstring)."""
    out = fx / "r"
    rc, _, err = call(["fx", "bob", "--lr", "0.5", "section.k=9", "--out", str(out)], capsys)
    assert rc == 0, err
    got = results(out)
    assert (got["name"], got["lr"], got["section"]["k"]) == ("bob", 0.5, 9)


def test_flag_values_parse_like_overrides(fx, capsys):
    rc, _, err = call(["fx", "--name", "#1", "--tags", "p,q", "--lr", "1e-2", "--out", "r"], capsys)
    assert rc == 0, err
    got = results(fx / "r")
    assert (got["name"], got["tags"], got["lr"]) == ("#1", ["p", "q"], 0.01)


def test_resolution_order_file_flags_overrides(fx, capsys):
    cfg_file = fx / "c.yaml"
    cfg_file.write_text("lr: 0.1\nmax_steps: 5\nuse_bias: false\nname: filed\n")
    rc, _, err = call(["fx", "-c", str(cfg_file), "--lr", "0.2", "--use-bias", "--out", "a"], capsys)
    assert rc == 0, err
    got = results(fx / "a")
    assert (got["lr"], got["max_steps"], got["use_bias"], got["name"]) == (0.2, 5, True, "filed")
    rc, _, err = call(["fx", "-c", str(cfg_file), "--lr", "0.2", "lr=0.3", "--out", "b"], capsys)
    assert rc == 0, err
    assert results(fx / "b")["lr"] == 0.3


def test_list_positional_takes_all_words(fx, capsys):
    rc, out, err = call(["grp", "fxlist", "a", "b", "c"], capsys)
    assert (rc, out, err) == (0, "a|b|c\n", "")


def test_fixture_leaf_help_shows_flags_and_docs(fx, capsys):
    rc, out, _ = call(["fx", "--help"], capsys)
    assert rc == 0
    for text in ("usage: lmlab fx", "NAME", "--max-steps", "--use-bias", "--no-use-bias", "--out", "--seed",
                 "Steps (flag --max-steps).", "-c FILE"):
        assert text in out, text
    assert "--section" not in out  # nested sections are set with section.k=...


def test_fixture_config_show(fx, capsys):
    rc, out, _ = call(["config", "show", "fx"], capsys)
    assert rc == 0
    assert "# Learning rate." in out
    assert yaml.safe_load(out) == to_dict(importlib.import_module("_cli_fixture").FixtureConfig())


BAD_INPUTS = {
    "malformed-yaml": (["-c", "{bad}"], "line 2"),
    "missing-config-file": (["-c", "nope.yaml"], "not found"),
    "unknown-override": (["nope=1"], "'nope'"),
    "unknown-nested-override": (["section.kk=1"], "'section.kk'"),
    "unknown-flag": (["--nope", "1"], "--nope"),
    "type-error": (["--max-steps", "abc"], "max_steps"),
    "bad-device": (["--device", "tpu"], "device must be"),
    "extra-positional": (["bob", "extra"], "extra"),
    "unwritable-out": (["--out", "{file}/run"], "not a writable directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_no_run_dir(fx, capsys, case):
    argv, needle = BAD_INPUTS[case]
    (fx / "bad.yaml").write_text("lr: 0.1\nname: a: b\nmax_steps: 3\n")
    (fx / "file").write_text("not a folder")
    argv = [a.replace("{bad}", "bad.yaml").replace("{file}", "file") for a in argv]
    if "--out" not in argv:
        argv += ["--out", "run"]
    rc, out, err = call(["fx", *argv], capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lmlab ") and needle in lines[0], lines[0]
    assert out == ""
    assert sorted(p.name for p in fx.iterdir()) == ["bad.yaml", "file"]  # no run dir, no runs/
    assert (fx / "file").read_text() == "not a folder"
