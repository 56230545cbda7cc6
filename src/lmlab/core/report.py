"""Static single-file ``report.html`` from run directories (``lmlab report RUN_DIR...``).

The report reads **only artifacts** of the output contract (``config.yaml``, ``meta.json``,
``results.json``, ``metrics.jsonl``, ``plots/*.png``, ``samples.jsonl``); it never imports torch and never
runs a model. Per run it shows the command, a status badge, key metadata (versions, device, dtype, seed, wall
time, git sha), results as a table (nested dicts flattened to dotted keys, floats to 4 significant digits,
small lists of dicts as sub-tables), the last metrics record, every plot embedded as a base64 PNG, the first
few samples and the config in a collapsible ``<details>``.

A run is shown as complete only when ``results.json`` exists and parses *and* ``meta.status == "complete"``;
anything else carries a red ``INCOMPLETE/FAILED`` badge. Every artifact string is HTML-escaped; only the
caller-supplied ``intro_html`` and ``sections`` bodies are trusted HTML. The page is one file with inline CSS:
no external assets, no JavaScript.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.config import ConfigError
from lmlab.core.runs import atomic_write
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

BADGE_BAD = "INCOMPLETE/FAILED"
BADGE_OK = "COMPLETE"
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_CELL_CHARS = 600
MAX_TABLE_ROWS = 40
MAX_TABLE_COLS = 12
MAX_INLINE_LIST = 12


@dataclass
class ReportConfig:
    """``lmlab report``: one static HTML page from run directories (reads artifacts only)."""

    runs: list[str] = field(default_factory=list)
    """Run directories (each holds meta.json)."""
    out: str | None = None
    """Output HTML path; default <first run>/report.html."""
    title: str = "lmlab report"
    """Page title."""
    samples: int = 5
    """Samples shown per run (first lines of samples.jsonl)."""

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ConfigError(f"samples must be >= 0, got {self.samples}")


# ----------------------------------------------------------------------------------------------------------
# reading artifacts


@dataclass
class RunView:
    """What the report knows about one run directory (all read from its files)."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    results: Any = None
    config_text: str | None = None
    last_metrics: dict[str, Any] | None = None
    n_metrics: int = 0
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, base64 data)
    samples: list[Any] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.meta.get("status") or "unknown")

    @property
    def complete(self) -> bool:
        return self.results is not None and self.status == "complete"


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name} unreadable: {e}")
        return None


def read_run(run_dir: str | Path, n_samples: int = 5) -> RunView:
    """Collect a run directory's artifacts into a :class:`RunView` (never raises on malformed files)."""
    path = Path(run_dir)
    view = RunView(path=path)
    meta = _read_json(path / "meta.json", view.problems)
    if isinstance(meta, dict):
        view.meta = meta
    elif meta is None and not (path / "meta.json").is_file():
        view.problems.append("meta.json missing")
    view.results = _read_json(path / "results.json", view.problems)  # missing: shown by the badge
    cfg = path / "config.yaml"
    if cfg.is_file():
        try:
            view.config_text = cfg.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            view.problems.append(f"config.yaml unreadable: {e}")
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from an interrupted run
            if isinstance(rec, dict):
                view.n_metrics += 1
                view.last_metrics = rec
    plots = path / "plots"
    if plots.is_dir():
        for png in sorted(plots.glob("*.png")):
            try:
                data = png.read_bytes()
            except OSError as e:
                view.problems.append(f"{png.name} unreadable: {e}")
                continue
            if len(data) > MAX_IMAGE_BYTES:
                view.problems.append(f"plots/{png.name} not embedded ({len(data) / 1e6:.1f} MB)")
                continue
            view.plots.append((png.name, base64.b64encode(data).decode("ascii")))
    samples = path / "samples.jsonl"
    if samples.is_file() and n_samples > 0:
        with open(samples, encoding="utf-8", errors="replace") as f:
            for line in f:
                if len(view.samples) >= n_samples:
                    break
                if not line.strip():
                    continue
                try:
                    view.samples.append(json.loads(line))
                except json.JSONDecodeError:
                    view.samples.append(line.rstrip("\n"))
    return view


# ----------------------------------------------------------------------------------------------------------
# formatting


def esc(text: Any) -> str:
    """HTML-escape any value's string form (quotes included)."""
    return html.escape(str(text), quote=True)


def fmt_value(v: Any) -> str:
    """Display string of a scalar: floats to 4 significant digits, everything else via ``str``."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list | tuple):
        items = [fmt_value(x) for x in v[:MAX_INLINE_LIST]]
        more = f", … ({len(v)} items)" if len(v) > MAX_INLINE_LIST else ""
        return "[" + ", ".join(items) + more + "]"
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``; lists and scalars are leaves."""
    if not isinstance(obj, Mapping):
        return {prefix or "value": obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _cell(v: Any) -> str:
    s = fmt_value(v)
    if len(s) > MAX_CELL_CHARS:
        s = s[:MAX_CELL_CHARS] + f"… ({len(s)} chars)"
    return esc(s)


def _is_record_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)


def records_table(rows: Sequence[Mapping[str, Any]], max_rows: int = MAX_TABLE_ROWS) -> str:
    """A list of dicts as an HTML table (columns = union of flattened keys, first-seen order)."""
    flat = [flatten(r) for r in rows[:max_rows]]
    cols: list[str] = []
    for r in flat:
        cols.extend(k for k in r if k not in cols)
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r[c]) if c in r else ''}</td>" for c in cols) + "</tr>"
                   for r in flat)
    more = f'<p class="note">… {len(rows) - max_rows} more rows not shown</p>' if len(rows) > max_rows else ""
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}'


def _fits_subtable(v: Any) -> bool:
    if not _is_record_list(v) or len(v) > MAX_TABLE_ROWS:
        return False
    cols: set[str] = set()
    for r in v:
        cols.update(flatten(r))
    return len(cols) <= MAX_TABLE_COLS


def results_table(results: Any) -> str:
    """Results as a key/value table; small lists of dicts become sub-tables."""
    if _is_record_list(results):
        return records_table(results)
    flat = flatten(results) if isinstance(results, Mapping) else {"value": results}
    if not flat:
        return '<p class="note">(empty results)</p>'
    rows = []
    for k, v in flat.items():
        cell = records_table(v) if _fits_subtable(v) else _cell(v)
        rows.append(f"<tr><th>{esc(k)}</th><td>{cell}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


def _kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in pairs if v not in (None, ""))
    return f'<table class="kv">{rows}</table>'


def _wall(meta: Mapping[str, Any]) -> str | None:
    w = meta.get("wall_seconds")
    if isinstance(w, int | float) and not isinstance(w, bool):
        return f"{w:.1f} s" if w < 120 else f"{w / 60:.1f} min"
    return None


def _meta_pairs(meta: Mapping[str, Any]) -> list[tuple[str, Any]]:
    versions = meta.get("versions") if isinstance(meta.get("versions"), Mapping) else {}
    ver = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    sha = meta.get("git_sha")
    argv = meta.get("argv")
    return [
        ("status", meta.get("status")),
        ("error", meta.get("error")),
        ("device", meta.get("device")),
        ("dtype", meta.get("dtype")),
        ("seed", meta.get("seed")),
        ("threads", meta.get("threads")),
        ("wall time", _wall(meta)),
        ("start", meta.get("start_time")),
        ("end", meta.get("end_time")),
        ("git sha", str(sha)[:12] if sha else None),
        ("versions", ver or None),
        ("host", meta.get("host")),
        ("argv", " ".join(str(a) for a in argv) if isinstance(argv, list) else argv),
    ]


def _badge(view: RunView) -> str:
    if view.complete:
        return f'<span class="badge ok">{BADGE_OK}</span>'
    why = f"status: {view.status}" + ("" if view.results is not None else ", no results.json")
    return f'<span class="badge bad">{BADGE_BAD}</span> <span class="why">{esc(why)}</span>'


def _samples_html(samples: list[Any]) -> str:
    if all(isinstance(s, Mapping) for s in samples):
        keys: list[str] = []
        for s in samples:
            keys.extend(str(k) for k in s if str(k) not in keys)
        if len(keys) <= 6:
            return records_table([{str(k): v for k, v in s.items()} for s in samples])
    items = "".join(
        f"<li><pre>{esc(json.dumps(s, ensure_ascii=False, indent=1, default=str)[: 4 * MAX_CELL_CHARS])}"
        "</pre></li>"
        for s in samples)
    return f'<ol class="samples">{items}</ol>'


def _anchor(i: int) -> str:
    return f"run-{i}"


def render_run(view: RunView, anchor: str, summary: str | None = None) -> str:
    """One run's ``<section>``."""
    command = view.meta.get("command") or "?"
    parts = [
        f'<section class="run {"ok" if view.complete else "bad"}" id="{esc(anchor)}">',
        f"<h2>{esc(view.path.name or str(view.path))} {_badge(view)}</h2>",
        f'<p class="cmd"><code>lmlab {esc(command)}</code> &middot; '
        f'<span class="path">{esc(view.path)}</span></p>',
    ]
    if summary:
        paras = [p.strip() for p in str(summary).split("\n\n") if p.strip()]
        parts.append('<div class="summary">' + "".join(f"<p>{esc(p)}</p>" for p in paras) + "</div>")
    if view.problems:
        parts.append('<ul class="problems">' + "".join(f"<li>{esc(p)}</li>" for p in view.problems) + "</ul>")
    parts.append("<h3>Run</h3>" + _kv_table(_meta_pairs(view.meta)))
    if view.results is not None:
        parts.append("<h3>Results</h3>" + results_table(view.results))
    if view.last_metrics:
        parts.append(f"<h3>Last metrics record <small>({view.n_metrics} in metrics.jsonl)</small></h3>"
                     + _kv_table(flatten(view.last_metrics).items()))
    if view.plots:
        figs = "".join(
            f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(name)}</figcaption></figure>"
            for name, data in view.plots)
        parts.append(f'<h3>Plots</h3><div class="plots">{figs}</div>')
    if view.samples:
        parts.append(f"<h3>Samples <small>(first {len(view.samples)})</small></h3>"
                     + _samples_html(view.samples))
    if view.config_text is not None:
        parts.append(f"<details><summary>config.yaml</summary><pre>{esc(view.config_text)}</pre></details>")
    if view.meta:
        meta_text = json.dumps(view.meta, indent=2, ensure_ascii=False, default=str)
        parts.append(f"<details><summary>meta.json</summary><pre>{esc(meta_text)}</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)


CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d232a;background:#f6f7f9;
 margin:0;padding:0 1.5em 3em}
main{max-width:1150px;margin:0 auto}
h1{font-size:1.6em;margin:1em 0 .3em}
h2{font-size:1.25em;margin:0 0 .3em}
h3{font-size:1.02em;margin:1.1em 0 .4em;color:#37424e}
small,.note,.path,.why{color:#66707a;font-weight:normal}
section.run{background:#fff;border:1px solid #d9dde2;border-left:5px solid #2e8b57;border-radius:6px;
 padding:1em 1.3em;margin:1.2em 0}
section.run.bad{border-left-color:#c0392b}
section.extra{background:#fff;border:1px solid #d9dde2;border-radius:6px;padding:1em 1.3em;margin:1.2em 0}
.badge{display:inline-block;font-size:.72em;font-weight:700;letter-spacing:.04em;padding:.15em .55em;
 border-radius:3px;vertical-align:middle;color:#fff}
.badge.ok{background:#2e8b57}.badge.bad{background:#c0392b}
table{border-collapse:collapse;margin:.2em 0;font-size:.92em}
th,td{border:1px solid #e0e3e7;padding:.25em .6em;text-align:left;vertical-align:top;white-space:pre-wrap;
 word-break:break-word}
table.kv th{background:#f2f4f6;font-weight:600;white-space:nowrap}
table.data th{background:#eef1f4}
td table{margin:0}
pre{background:#f4f5f7;border:1px solid #e3e6ea;border-radius:4px;padding:.6em;overflow-x:auto;
 white-space:pre-wrap;word-break:break-word;font-size:.88em;margin:.3em 0}
code{font-size:.95em}
details{margin:.5em 0}summary{cursor:pointer;color:#37424e}
.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;max-width:100%}figure img{max-width:560px;width:100%;border:1px solid #e3e6ea}
figcaption{font-size:.82em;color:#66707a;text-align:center}
.summary{background:#f4f8fb;border-left:3px solid #4a7fb0;padding:.2em .9em;margin:.5em 0}
ul.problems{color:#a0281c}
table.toc td,table.toc th{white-space:nowrap}
ol.samples li pre{margin:.2em 0}
footer{color:#66707a;font-size:.85em;margin-top:2em}
"""


def _resolve_summary(summaries: Mapping[Any, str] | None, path: Path) -> str | None:
    if not summaries:
        return None
    for key in (path, str(path), path.resolve(), str(path.resolve()), path.name):
        if key in summaries:
            return summaries[key]
    resolved = {Path(k).resolve(): v for k, v in summaries.items() if isinstance(k, str | Path)}
    return resolved.get(path.resolve())


def render_report(run_dirs: Iterable[str | Path], title: str = "lmlab report", intro_html: str | None = None,
                  sections: Sequence[tuple[str, str]] | None = None,
                  summaries: Mapping[Any, str] | None = None, n_samples: int = 5) -> str:
    """The report page as a string.

    Args:
        run_dirs: run directories, in page order.
        title: page title (escaped).
        intro_html: trusted HTML placed under the title (not escaped).
        sections: extra ``(heading, trusted HTML body)`` sections placed before the runs.
        summaries: per-run plain-text summary (escaped; blank lines separate paragraphs), keyed by the run dir
            as passed, its resolved path or its folder name.
        n_samples: samples shown per run.
    """
    views = [read_run(p, n_samples=n_samples) for p in run_dirs]
    n_bad = sum(not v.complete for v in views)
    toc_rows = "".join(
        f'<tr><td><a href="#{_anchor(i)}">{esc(v.path.name or v.path)}</a></td>'
        f"<td><code>{esc(v.meta.get('command') or '?')}</code></td><td>{_badge(v)}</td>"
        f"<td>{esc(_wall(v.meta) or '')}</td></tr>"
        for i, v in enumerate(views))
    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="note">{len(views)} run(s), {len(views) - n_bad} complete'
        + (f", <strong>{n_bad} incomplete or failed</strong>" if n_bad else "")
        + f" &middot; generated {esc(generated)}</p>",
    ]
    if intro_html:
        head.append(f'<div class="intro">{intro_html}</div>')
    if views:
        head.append('<table class="toc data"><thead><tr><th>run</th><th>command</th><th>status</th>'
                    f"<th>wall time</th></tr></thead><tbody>{toc_rows}</tbody></table>")
    for heading, body in sections or []:
        head.append(f'<section class="extra"><h2>{esc(heading)}</h2>{body}</section>')
    runs = [render_run(v, _anchor(i), _resolve_summary(summaries, v.path)) for i, v in enumerate(views)]
    tail = ['<footer>lmlab report &middot; built from run artifacts only (config.yaml, meta.json, '
            "results.json, metrics.jsonl, plots/*.png, samples.jsonl)</footer>", "</main></body></html>", ""]
    return "\n".join(head + runs + tail)


def write_report(run_dirs: Iterable[str | Path], out_path: str | Path, title: str = "lmlab report",
                 **kwargs: Any) -> Path:
    """Render and write the report atomically (``kwargs`` go to :func:`render_report`); returns its path."""
    text = render_report(list(run_dirs), title=title, **kwargs)
    out = atomic_write(out_path, text)
    log.info("report written to %s", out)
    return out


def check_run_dirs(runs: Sequence[str | Path]) -> list[Path]:
    """Paths of ``runs`` after checking each is a run directory; :class:`LmlabError` otherwise."""
    if not runs:
        raise LmlabError("no run directories given (usage: lmlab report RUN_DIR...)")
    paths: list[Path] = []
    for r in runs:
        p = Path(r)
        if not p.exists():
            raise LmlabError(f"run directory not found: {p}")
        if not p.is_dir():
            raise LmlabError(f"not a directory: {p}")
        if not (p / "meta.json").is_file():
            raise LmlabError(f"not a run directory (no meta.json): {p}")
        paths.append(p)
    return paths


def main(cfg: ReportConfig) -> Path:
    """``lmlab report``: write the HTML page and return its path."""
    paths = check_run_dirs(cfg.runs)
    out = Path(cfg.out) if cfg.out else paths[0] / "report.html"
    if out.is_dir():
        raise LmlabError(f"--out is a directory, expected an .html file path: {out}")
    try:
        return write_report(paths, out, title=cfg.title, n_samples=cfg.samples)
    except OSError as e:
        raise LmlabError(f"cannot write report {out}: {e.strerror or e}") from None
