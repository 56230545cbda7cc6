"""Matplotlib helpers that write PNGs (atomically) into ``run_dir/plots``.

Every helper takes the output ``path`` first (``run.plots / "loss.png"``; a missing ``.png`` suffix is added),
draws one figure in a small consistent style (110 dpi, grid, tight layout) and returns the written path.

Figures are built with the object API (``matplotlib.figure.Figure`` + the Agg canvas), never through
``pyplot``: nothing is registered in pyplot's global figure list and the process-wide backend is left alone,
so these helpers are safe in notebooks, threads and long loops. The PNG is rendered to memory and written with
:func:`lmlab.core.runs.atomic_write` (temp file + rename), so a reader never sees half an image.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmlab.core.runs import atomic_write

log = logging.getLogger(__name__)

DPI = 110
FIGSIZE = (6.4, 4.0)

__all__ = ["line_plot", "bar_plot", "scatter_plot", "heatmap", "loss_curve_from_metrics", "plot_path"]


def plot_path(run_dir: str | Path | Any, name: str) -> Path:
    """``<run_dir>/plots/<name>.png`` (``run_dir`` may be a path or a :class:`~lmlab.core.runs.RunDir`)."""
    base = Path(getattr(run_dir, "path", run_dir))
    return _png(base / "plots" / name)


def _png(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix.lower() == ".png" else p.with_name(p.name + ".png")


def _new(figsize: tuple[float, float] = FIGSIZE) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _style(ax: Any, title: str, xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
           grid: bool = True) -> None:
    if title:
        ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if grid:
        ax.grid(True, which="major", alpha=0.35, linewidth=0.6)
    ax.tick_params(labelsize=8)


def _save(fig: Figure, path: str | Path) -> Path:
    out = _png(path)
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        fig.clear()  # release artists even if saving failed (the figure is not held by pyplot)
    atomic_write(out, buf.getvalue())
    log.debug("plot written to %s", out)
    return out


def _arr(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().float().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


def _legend(ax: Any, n: int) -> None:
    if n > 1:
        ax.legend(fontsize=8, frameon=False)


def line_plot(path: str | Path, xs: Sequence[float] | Mapping[str, Sequence[float]],
              ys_by_label: Mapping[str, Sequence[float]], title: str = "", xlabel: str = "", ylabel: str = "",
              logx: bool = False, logy: bool = False) -> Path:
    """One line per ``ys_by_label`` entry; ``xs`` is shared or a mapping label -> xs. Markers when short."""
    if not ys_by_label:
        raise ValueError("line_plot needs at least one series")
    fig, ax = _new()
    for label, ys in ys_by_label.items():
        x = _arr(xs[label] if isinstance(xs, Mapping) else xs)
        y = _arr(ys)
        if x.shape != y.shape:
            raise ValueError(f"series {label!r}: {x.size} x values but {y.size} y values")
        ax.plot(x, y, label=str(label), linewidth=1.4, marker="o" if y.size <= 30 else None, markersize=3.5)
    _style(ax, title, xlabel, ylabel, logx, logy)
    _legend(ax, len(ys_by_label))
    return _save(fig, path)


def bar_plot(path: str | Path, categories: Sequence[Any],
             values: Sequence[float] | Mapping[str, Sequence[float]], title: str = "", xlabel: str = "",
             ylabel: str = "",
             yerr: Sequence[Any] | Mapping[str, Sequence[Any]] | None = None, logy: bool = False) -> Path:
    """Bars over ``categories``; ``values`` is one series or a mapping series -> values (grouped bars).

    ``yerr`` matches ``values`` (per series): symmetric errors ``(n,)`` or lower/upper errors ``(2, n)``.
    """
    groups: Mapping[str, Sequence[float]] = values if isinstance(values, Mapping) else {"": values}
    errs: Mapping[str, Any] = (yerr if isinstance(yerr, Mapping) else {"": yerr}) if yerr is not None else {}
    cats = [str(c) for c in categories]
    k = len(groups)
    if k == 0:
        raise ValueError("bar_plot needs at least one series")
    fig, ax = _new((max(4.0, min(12.0, 0.5 * len(cats) * max(k, 1) + 2.5)), FIGSIZE[1]))
    width = 0.8 / k
    pos = np.arange(len(cats))
    for i, (label, vals) in enumerate(groups.items()):
        v = _arr(vals)
        if v.size != len(cats):
            raise ValueError(f"series {label!r}: {v.size} values for {len(cats)} categories")
        err = errs.get(label)
        ax.bar(pos + (i - (k - 1) / 2) * width, v, width=width * 0.95, label=str(label) or None,
               yerr=None if err is None else _arr(err), capsize=3 if err is not None else 0)
    ax.set_xticks(pos)
    rotate = max((len(c) for c in cats), default=0) * len(cats) > 60
    ax.set_xticklabels(cats, rotation=35 if rotate else 0, ha="right" if rotate else "center")
    _style(ax, title, xlabel, ylabel, logy=logy)
    ax.grid(False, axis="x")
    _legend(ax, k)
    return _save(fig, path)


def scatter_plot(path: str | Path, xs: Sequence[float] | Mapping[str, Sequence[float]],
                 ys: Sequence[float] | Mapping[str, Sequence[float]], title: str = "", xlabel: str = "",
                 ylabel: str = "", annotate: Sequence[str] | None = None, diagonal: bool = False,
                 fit: bool = False, logx: bool = False, logy: bool = False) -> Path:
    """Scatter of ``ys`` against ``xs`` (sequences, or mappings series -> values with the same keys).

    ``annotate`` labels each point (single series only); ``diagonal`` draws ``y = x``; ``fit`` adds the
    least-squares line per series.
    """
    xmap = xs if isinstance(xs, Mapping) else {"": xs}
    ymap = ys if isinstance(ys, Mapping) else {"": ys}
    if set(xmap) != set(ymap):
        raise ValueError("xs and ys must have the same series keys")
    fig, ax = _new()
    lo, hi = math.inf, -math.inf
    for label in ymap:
        x, y = _arr(xmap[label]), _arr(ymap[label])
        if x.shape != y.shape:
            raise ValueError(f"series {label!r}: {x.size} x values but {y.size} y values")
        ax.scatter(x, y, s=16, alpha=0.8, label=str(label) or None)
        if x.size:
            lo, hi = min(lo, float(np.nanmin(x)), float(np.nanmin(y))), max(hi, float(np.nanmax(x)),
                                                                              float(np.nanmax(y)))
        if fit and x.size >= 2 and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            grid = np.linspace(float(np.min(x)), float(np.max(x)), 50)
            ax.plot(grid, slope * grid + icpt, linewidth=1.0, linestyle="--")
    if annotate is not None:
        if len(ymap) != 1:
            raise ValueError("annotate works with a single series")
        (label,) = ymap
        for txt, x, y in zip(annotate, _arr(xmap[label]), _arr(ymap[label])):
            ax.annotate(str(txt), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if diagonal and math.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle=":")
    _style(ax, title, xlabel, ylabel, logx, logy)
    _legend(ax, len(ymap))
    return _save(fig, path)


def heatmap(path: str | Path, matrix: Any, title: str = "", xlabel: str = "", ylabel: str = "",
            xticklabels: Sequence[Any] | None = None, yticklabels: Sequence[Any] | None = None,
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
            annotate: bool | None = None, colorbar_label: str = "") -> Path:
    """Image of a 2-D ``matrix`` with a colour bar; cells annotated when ``annotate`` (default: <= 12x12)."""
    m = _arr(matrix)
    if m.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {m.shape}")
    rows, cols = m.shape
    fig, ax = _new((max(4.0, min(12.0, 0.45 * cols + 2.5)), max(3.0, min(10.0, 0.4 * rows + 1.8))))
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    if colorbar_label:
        cb.set_label(colorbar_label)
    cb.ax.tick_params(labelsize=8)
    if xticklabels is not None:
        ax.set_xticks(range(cols))
        ax.set_xticklabels([str(t) for t in xticklabels], rotation=45 if cols > 6 else 0,
                           ha="right" if cols > 6 else "center")
    if yticklabels is not None:
        ax.set_yticks(range(rows))
        ax.set_yticklabels([str(t) for t in yticklabels])
    if annotate is None:
        annotate = rows <= 12 and cols <= 12
    if annotate and m.size:
        finite = m[np.isfinite(m)]
        mid = float((np.min(finite) + np.max(finite)) / 2) if finite.size else 0.0
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < mid else "black")
    _style(ax, title, xlabel, ylabel, grid=False)
    return _save(fig, path)


def read_metrics(run_dir: str | Path | Any) -> list[dict[str, Any]]:
    """Records of ``<run_dir>/metrics.jsonl`` (a torn last line from an interrupted run is skipped)."""
    p = Path(getattr(run_dir, "path", run_dir)) / "metrics.jsonl"
    if not p.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: skipping malformed line %d", p, i + 1)
            continue
        if isinstance(rec, dict):
            rows.append(rec)
    return rows


def loss_curve_from_metrics(run_dir: str | Path | Any, key: str | Sequence[str] = "loss", x: str = "step",
                            out: str | Path | None = None, logy: bool = False,
                            title: str = "") -> Path | None:
    """Plot ``key`` (or several keys) against ``x`` from ``metrics.jsonl``; ``None`` if no record has them.

    Records lacking ``x`` or a key (or holding a non-number) are skipped for that key. Default output:
    ``<run_dir>/plots/<key>.png`` (keys joined by ``+``).
    """
    keys = [key] if isinstance(key, str) else list(key)
    rows = read_metrics(run_dir)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for k in keys:
        pts = [(r[x], r[k]) for r in rows if _is_num(r.get(x)) and _is_num(r.get(k))]
        if pts:
            series[k] = ([float(p[0]) for p in pts], [float(p[1]) for p in pts])
    if not series:
        log.warning("no %s-vs-%s records in %s", "/".join(keys), x, Path(getattr(run_dir, "path", run_dir)))
        return None
    dest = out if out is not None else plot_path(run_dir, "+".join(keys))
    return line_plot(dest, {k: v[0] for k, v in series.items()}, {k: v[1] for k, v in series.items()},
                     title=title or f"{', '.join(series)} vs {x}", xlabel=x, ylabel=keys[0] if len(keys) == 1
                     else "value", logy=logy)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
