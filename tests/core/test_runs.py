"""lmlab.core.runs: the run-directory output contract (config/meta/results, failure handling, atomic writes)."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

from lmlab.config import RunArgs, resolve
from lmlab.core.runs import (
    RunDir,
    RunError,
    atomic_write,
    load_tensors,
    read_json,
    save_tensors,
    start_run,
    write_json,
)
from lmlab.errors import LmlabError


@dataclass
class RunCfg(RunArgs):
    lr: float = 0.1
    """Learning rate."""
    steps: int = 3
    """Steps."""


def files(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_start_run_writes_config_meta_then_results(tmp_path):
    out = tmp_path / "run"
    cfg = RunCfg(out=str(out), seed=7, lr=0.5, threads=2)
    with start_run(cfg, "zoo train", extra_meta={"batch_size": 4}) as run:
        assert run.path == out
        assert files(out) == {"config.yaml", "meta.json"}
        meta = read_json(out / "meta.json")
        assert meta["status"] == "running"
        assert meta["command"] == "zoo train"
        assert meta["argv"] == sys.argv
        assert meta["seed"] == 7 and meta["threads"] == 2 and meta["batch_size"] == 4
        assert meta["device"] == "auto" and meta["dtype"] == "auto"
        assert meta["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
        assert meta["versions"]["torch"] == torch.__version__
        assert meta["versions"]["lmlab"] is not None
        start = dt.datetime.fromisoformat(meta["start_time"])
        assert start.tzinfo is not None
        assert "end_time" not in meta
        run.log({"step": 1, "loss": 2.0})
        run.finish({"val_loss": 1.25})
    assert resolve(RunCfg, out / "config.yaml") == cfg  # the saved config reruns the same run
    assert read_json(out / "results.json") == {"val_loss": 1.25}
    meta = read_json(out / "meta.json")
    assert meta["status"] == "complete"
    assert dt.datetime.fromisoformat(meta["end_time"]) >= start
    assert meta["wall_seconds"] >= 0
    assert not [n for n in files(out) if n.endswith(".tmp")]


def test_start_run_finishes_with_empty_results_when_main_forgets(tmp_path):
    with start_run(RunCfg(out=str(tmp_path / "r")), "x") as run:
        run.save_json("summary.json", {"a": 1})
    assert read_json(run / "results.json") == {}
    assert read_json(run / "meta.json")["status"] == "complete"
    assert run.complete


def test_record_device_and_dtype_objects(tmp_path):
    with start_run(RunCfg(out=str(tmp_path / "r")), "x", device=torch.device("cpu"), dtype=torch.bfloat16,
                   threads=3) as run:
        meta = read_json(run / "meta.json")
    assert (meta["device"], meta["dtype"], meta["threads"]) == ("cpu", "bfloat16", 3)


def test_default_run_dir_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with start_run(RunCfg(), "zoo train") as run:
        pass
    assert re.fullmatch(r"runs/zoo-train-\d{8}-\d{6}", run.path.as_posix())
    assert (tmp_path / run.path / "results.json").is_file()


def test_exception_on_fresh_dir_with_nothing_written_removes_it(tmp_path):
    out = tmp_path / "nested" / "run"
    with pytest.raises(ValueError, match="boom"), start_run(RunCfg(out=str(out)), "x") as run:
        run.log({"step": 0, "loss": 1.0})  # metrics alone do not make a run worth keeping
        raise ValueError("boom")
    assert not out.exists()


def test_exception_after_an_artifact_keeps_dir_marked_failed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), start_run(RunCfg(out=str(out)), "x") as run:
        run.save_json("partial.json", {"step": 5})
        raise KeyboardInterrupt
    assert files(out) == {"config.yaml", "meta.json", "partial.json"}
    meta = read_json(out / "meta.json")
    assert meta["status"] == "failed"
    assert meta["error"].startswith("KeyboardInterrupt")
    assert "end_time" in meta
    # an incomplete run may be resumed in place; it then completes
    with start_run(RunCfg(out=str(out)), "x") as run:
        assert (run / "partial.json").is_file()
        run.finish({"ok": True})
    assert read_json(out / "meta.json")["status"] == "complete"


def test_exception_in_existing_dir_is_kept_even_if_empty(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file")
    with pytest.raises(RuntimeError), start_run(RunCfg(out=str(out)), "x"):
        raise RuntimeError("x")
    assert (out / "notes.txt").read_text() == "the user's file"
    assert read_json(out / "meta.json")["status"] == "failed"


def test_complete_run_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    with start_run(RunCfg(out=str(out)), "x") as run:
        run.finish({"v": 1})
    before = (out / "meta.json").read_text()
    with pytest.raises(RunError, match="already holds a complete run"), start_run(RunCfg(out=str(out)), "x"):
        pytest.fail("must not enter the block")
    assert (out / "meta.json").read_text() == before
    assert read_json(out / "results.json") == {"v": 1}
    assert issubclass(RunError, LmlabError)


@pytest.mark.parametrize("under", ["file", "self"])
def test_unwritable_out_raises_run_error(tmp_path, under):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "sub" / "run" if under == "file" else blocker
    with pytest.raises(RunError) as e, start_run(RunCfg(out=str(out)), "x"):
        pytest.fail("must not enter the block")
    msg = str(e.value)
    assert str(out) in msg and "not a writable directory" in msg and "\n" not in msg
    assert blocker.read_text() == "x"


def test_unserialisable_config_leaves_no_dir(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(yaml.YAMLError), start_run(RunCfg(out=str(out), lr=object()), "x"):
        pytest.fail("must not enter the block")
    assert not out.exists()


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "deep" / "results.json"
    atomic_write(p, "first")
    assert p.read_text() == "first"
    atomic_write(p, b"second\x00")
    assert p.read_bytes() == b"second\x00"
    assert files(p.parent) == {"results.json"}
    assert p.stat().st_mode & 0o777 == 0o644
    with pytest.raises(TypeError):
        atomic_write(p, 12345)  # type: ignore[arg-type]  # fails mid-write
    assert p.read_bytes() == b"second\x00"  # the old content survives a failed write intact
    assert files(p.parent) == {"results.json"}


def test_write_json_handles_numpy_and_torch_values(tmp_path):
    p = write_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": np.arange(2),
                                         "d": tmp_path})
    assert read_json(p) == {"a": 1.5, "b": [1, 2], "c": [0, 1], "d": str(tmp_path)}
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_save_load_tensors_round_trip_with_sidecar(tmp_path):
    w = torch.randn(4, 3)
    tensors = {"w": w.t(), "b": torch.arange(5, dtype=torch.int64), "h": torch.randn(2, 2).to(torch.bfloat16)}
    p = save_tensors(tmp_path / "blocks.0.hook_resid_post", tensors, {"layer": 0, "hook": "resid_post"})
    assert p.name == "blocks.0.hook_resid_post.safetensors"  # dots in the stem are kept
    assert read_json(tmp_path / "blocks.0.hook_resid_post.json") == {"layer": 0, "hook": "resid_post"}
    back = load_tensors(p)
    assert set(back) == {"w", "b", "h"}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert files(tmp_path) == {"blocks.0.hook_resid_post.safetensors", "blocks.0.hook_resid_post.json"}
    p2 = save_tensors(tmp_path / "plain.safetensors", {"x": torch.ones(1)})
    assert p2.name == "plain.safetensors" and not (tmp_path / "plain.json").exists()


def test_rundir_log_appends_json_lines(tmp_path):
    run = RunDir(tmp_path)
    run.log({"step": 1, "loss": torch.tensor(2.5)})
    run.log({"step": 2, "loss": np.float64(1.5), "lr": 1e-3})
    again = RunDir(tmp_path)  # a resumed run appends, it does not truncate
    again.log({"step": 3})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == 2.5 and rows[1]["loss"] == 1.5 and rows[1]["lr"] == 1e-3
    assert all(isinstance(r["time"], float) and r["time"] >= 0 for r in rows)


def test_rundir_helpers(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    assert run.plots == tmp_path / "r" / "plots" and run.plots.is_dir()
    p = run.write_samples([{"prompt": "é", "n": 1}, {"prompt": "b", "n": 2}])
    assert [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] == [
        {"prompt": "é", "n": 1}, {"prompt": "b", "n": 2}]
    run.save_tensors("w", {"w": torch.zeros(2)}, {"k": 1})
    assert (run / "w.safetensors").is_file() and read_json(run / "w.json") == {"k": 1}
    assert not run.complete
