"""Plot helpers write real, complete PNGs atomically and leave no temp files or pyplot figures behind."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from lmlab.core.plotting import bar_plot, heatmap, line_plot, loss_curve_from_metrics, plot_path, scatter_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path} is truncated"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def _no_temp_files(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_all_helpers_write_pngs(tmp_path):
    plots = tmp_path / "plots"
    xs = [1, 10, 100, 1000]
    outs = [
        line_plot(plots / "line.png", xs, {"a": [4.0, 3.0, 2.5, 2.2], "b": [4.1, 3.3, 2.9, 2.7]}, "loss", "step",
                  "nats", logx=True),
        line_plot(plots / "line2", {"a": [0, 1], "b": [0, 1, 2]}, {"a": [1, 2], "b": [3, 2, 1]}),
        bar_plot(plots / "bar.png", ["x", "y", "z"], {"m1": [1, 2, 3], "m2": [2, 1, 0.5]},
                 yerr={"m1": [0.1, 0.2, 0.1]}, title="bars"),
        bar_plot(plots / "bar1.png", ["only"], [3.0], logy=True),
        scatter_plot(plots / "scatter.png", np.arange(5), np.arange(5) ** 2, annotate=list("abcde"), fit=True,
                     diagonal=True),
        heatmap(plots / "heat.png", np.arange(12).reshape(3, 4), xticklabels=list("abcd"),
                yticklabels=["r0", "r1", "r2"], colorbar_label="v"),
    ]
    for out in outs:
        assert out.parent == plots and out.suffix == ".png" and out.is_file()
        w, h = _png_size(out)
        assert w > 200 and h > 150
    assert (plots / "line2.png").is_file()  # suffix added
    _no_temp_files(plots)


def test_no_pyplot_figures_leak(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    for i in range(3):
        line_plot(tmp_path / f"p{i}.png", [0, 1], {"s": [0, 1]})
    assert plt.get_fignums() == before


def test_bad_input_raises_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        line_plot(tmp_path / "bad.png", [1, 2, 3], {"s": [1, 2]})
    with pytest.raises(ValueError):
        heatmap(tmp_path / "bad.png", np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_loss_curve_from_metrics(tmp_path):
    lines = [json.dumps({"step": i, "loss": 5.0 / (i + 1), "lr": 1e-3}) for i in range(20)]
    lines.insert(5, json.dumps({"step": 5, "val_loss": 2.0}))  # a record without "loss" is skipped
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo')  # torn last line
    out = loss_curve_from_metrics(tmp_path)
    assert out == plot_path(tmp_path, "loss") == tmp_path / "plots" / "loss.png"
    _png_size(out)
    both = loss_curve_from_metrics(tmp_path, key=["loss", "val_loss"], out=tmp_path / "plots" / "both.png")
    assert both is not None and both.is_file()
    assert loss_curve_from_metrics(tmp_path, key="missing") is None
    assert not (tmp_path / "plots" / "missing.png").exists()
    _no_temp_files(tmp_path / "plots")


def test_failed_write_leaves_no_temp_file(tmp_path):
    """The PNG goes to a temp file that is renamed into place; when the rename fails, the temp file is removed."""
    target = tmp_path / "taken.png"
    target.mkdir()
    (target / "x").write_text("occupied")  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        line_plot(target, [0, 1], {"s": [0, 1]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]
