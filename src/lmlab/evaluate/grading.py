"""Grader consistency (``lmlab eval grading``): the GAOKAO-Eval ISR with its null, ICC, Krippendorff's alpha.

Seed paper: **GAOKAO-Eval** (arXiv 2412.10056), Eq. 4. Each open answer is scored by several teachers; the
paper's *inconsistency score rate* over a group of scores s_1..s_n (one answer's raters, or a subject x model
group) is::

    ISR = (1/n) Σ_k 1[|s_k - μ| > σ]        μ, σ = mean and SD of the group

and it reports ISR > 32%. ISR is *not* zero under pure measurement noise: for Gaussian scores it is 31.7% in
large groups, 33.3% for groups of 3 with the sample SD (ddof=1) and 50% with the population SD (ddof=0) -- any
disagreement among 3 raters puts at least one score past 1σ. So lmlab always prints ISR next to its null,
simulated at the same group sizes and ddof (:func:`isr_null`).

Standard agreement statistics alongside:

* ICC(2,1) and ICC(2,k) (Shrout & Fleiss 1979, two-way random effects, absolute agreement) on the complete
  answers x raters table: ICC(2,1) = (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE)/n),
  ICC(2,k) = (MSR - MSE) / (MSR + (MSC - MSE)/n);
* Krippendorff's alpha (interval metric; missing ratings allowed): α = 1 - D_o / D_e from the coincidence
  matrix of pairable values;
* mean absolute deviation of each rater from the answer mean (rater severity).

Input: CSV ``item_id, model, rater, score`` (the same file ``eval exam open_scores=`` imports).
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)


def isr(scores: Any, ddof: int = 1) -> float:
    """The paper's ISR of one group: share of scores more than one SD from the group mean."""
    s = np.asarray(scores, float)
    s = s[~np.isnan(s)]
    if len(s) < 2:
        return float("nan")
    sd = s.std(ddof=ddof)
    return float(np.mean(np.abs(s - s.mean()) > sd)) if sd > 0 else 0.0


def isr_pooled(groups: list[Any], ddof: int = 1) -> float:
    """Pooled ISR: flagged scores / all scores over groups (groups of < 2 scores are skipped)."""
    flagged = total = 0
    for g in groups:
        s = np.asarray(g, float)
        s = s[~np.isnan(s)]
        if len(s) < 2:
            continue
        sd = s.std(ddof=ddof)
        flagged += int(np.sum(np.abs(s - s.mean()) > sd)) if sd > 0 else 0
        total += len(s)
    return flagged / total if total else float("nan")


def isr_null(sizes: list[int], ddof: int = 1, n_sim: int = 2000, seed: int = 0) -> dict[str, float]:
    """Pooled ISR of pure Gaussian noise at the same group sizes: mean and 2.5/97.5% quantiles."""
    rng = np.random.default_rng(seed)
    sizes = [n for n in sizes if n >= 2]
    if not sizes:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    sims = np.empty(n_sim)
    by_size: dict[int, int] = defaultdict(int)
    for n in sizes:
        by_size[n] += 1
    total = sum(sizes)
    for t in range(n_sim):
        flagged = 0
        for n, c in by_size.items():
            s = rng.standard_normal((c, n))
            dev = np.abs(s - s.mean(1, keepdims=True))
            flagged += int((dev > s.std(1, ddof=ddof, keepdims=True)).sum())
        sims[t] = flagged / total
    return {"mean": float(sims.mean()), "lo": float(np.percentile(sims, 2.5)), "hi": float(np.percentile(sims, 97.5))}


def icc2(table: Any) -> dict[str, float]:
    """ICC(2,1) and ICC(2,k) (Shrout & Fleiss) of a complete targets x raters table (n, k)."""
    Y = np.asarray(table, float)
    if Y.ndim != 2 or np.isnan(Y).any():
        raise LmlabError("ICC needs a complete targets x raters table (no missing ratings)")
    n, k = Y.shape
    if n < 2 or k < 2:
        raise LmlabError("ICC needs at least 2 targets and 2 raters")
    gm = Y.mean()
    ssr = k * ((Y.mean(1) - gm) ** 2).sum()
    ssc = n * ((Y.mean(0) - gm) ** 2).sum()
    sse = ((Y - gm) ** 2).sum() - ssr - ssc
    msr, msc, mse = ssr / (n - 1), ssc / (k - 1), sse / ((n - 1) * (k - 1))
    return {"icc2_1": float((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)),
            "icc2_k": float((msr - mse) / (msr + (msc - mse) / n)), "n_targets": n, "n_raters": k}


def krippendorff_alpha(units: list[Any], metric: str = "interval") -> float:
    """Krippendorff's alpha over units (each a list of the ratings it received; NaN/None = missing).

    Units with fewer than 2 ratings are not pairable and are ignored. metric: interval | nominal."""
    vals: list[np.ndarray] = []
    for u in units:
        a = np.asarray([np.nan if v is None else v for v in u], float)
        a = a[~np.isnan(a)]
        if len(a) >= 2:
            vals.append(a)
    if not vals:
        return float("nan")
    n = sum(len(a) for a in vals)

    def delta(x, y):
        return (x - y) ** 2 if metric == "interval" else (x != y).astype(float)

    Do = 0.0
    for a in vals:
        Do += delta(a[:, None], a[None, :]).sum() / (len(a) - 1)
    Do /= n
    allv = np.concatenate(vals)
    De = delta(allv[:, None], allv[None, :]).sum() / (n * (n - 1))
    return float(1 - Do / De) if De > 0 else float("nan")


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        need = {"item_id", "model", "rater", "score"}
        if not rd.fieldnames or not need <= set(rd.fieldnames):
            raise LmlabError(f"{path}: need columns {sorted(need)}, got {rd.fieldnames}")
        for ln, r in enumerate(rd, 2):
            try:
                rows.append({"item_id": r["item_id"], "model": r["model"], "rater": r["rater"],
                             "score": float(r["score"]), "subject": r.get("subject") or ""})
            except ValueError:
                raise LmlabError(f"{path}:{ln}: score must be a number, got {r['score']!r}") from None
    if not rows:
        raise LmlabError(f"{path}: no scores")
    return rows


def analyze(rows: list[dict[str, Any]], ddof: int = 1, n_sim: int = 2000, seed: int = 0) -> dict[str, Any]:
    """ISR (+ null) per answer and per (subject, model) group, ICC, alpha, rater severity."""
    by_answer: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in rows:
        by_answer[(r["item_id"], r["model"])][r["rater"]] = r["score"]
    answers = list(by_answer)
    raters = sorted({r["rater"] for r in rows})
    groups = [list(v.values()) for v in by_answer.values()]
    out: dict[str, Any] = {"n_answers": len(answers), "n_raters": len(raters), "ddof": ddof}
    out["isr_per_answer"] = {"isr": isr_pooled(groups, ddof),
                             "null": isr_null([len(g) for g in groups], ddof, n_sim, seed),
                             "group_sizes": sorted({len(g) for g in groups})}
    # paper-style groups: (subject, model) over all their scores
    sm: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        sm[(r["subject"], r["model"])].append(r["score"])
    out["isr_per_subject_model"] = {"isr": isr_pooled(list(sm.values()), ddof),
                                    "null": isr_null([len(g) for g in sm.values()], ddof, min(n_sim, 500), seed)}
    complete = [a for a in answers if all(rt in by_answer[a] for rt in raters)]
    if len(complete) >= 2 and len(raters) >= 2:
        table = np.array([[by_answer[a][rt] for rt in raters] for a in complete])
        out["icc"] = icc2(table)
    else:
        out["icc"] = {"note": "fewer than 2 answers rated by every rater"}
    out["krippendorff_alpha_interval"] = krippendorff_alpha(groups)
    sev = {}
    for rt in raters:
        d = [by_answer[a][rt] - np.mean(list(by_answer[a].values())) for a in answers if rt in by_answer[a]]
        sev[rt] = {"mean_dev": float(np.mean(d)), "mean_abs_dev": float(np.mean(np.abs(d))), "n": len(d)}
    out["raters"] = sev
    return out


@dataclass
class GradingConfig(RunArgs):
    """Grader consistency of human / LLM-judge scores: ISR with its null, ICC(2,1)/(2,k), Krippendorff alpha."""

    scores: str = ""
    """CSV with columns item_id, model, rater, score (optional: subject)."""
    ddof: int = 1
    """SD convention for ISR (the paper's is unstated: 1 = sample SD, 0 = population SD)."""
    n_sim: int = 2000
    """Simulations for the ISR null."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ddof not in (0, 1):
            raise ConfigError("ddof must be 0 or 1")
        if self.n_sim < 10:
            raise ConfigError("n_sim must be >= 10")


def main(cfg: GradingConfig) -> Path:
    from lmlab.core.plotting import bar_plot
    from lmlab.core.runs import start_run

    if not cfg.scores:
        raise ConfigError("give a scores CSV (item_id, model, rater, score)")
    rows = read_scores(cfg.scores)
    res = analyze(rows, cfg.ddof, cfg.n_sim, cfg.seed)
    with start_run(cfg, "eval-grading") as run:
        isr_a = res["isr_per_answer"]
        bar_plot(run.plots / "isr_vs_null.png", ["observed ISR", "null mean", "null 97.5%"],
                 {"ISR": [isr_a["isr"], isr_a["null"]["mean"], isr_a["null"]["hi"]]},
                 title="ISR per answer vs its Gaussian-noise null", ylabel="share of scores beyond 1 SD")
        run.finish(res)
    return run.path
