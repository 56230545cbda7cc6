"""Rasch / IRT analysis of exam response matrices (``lmlab eval irt fit|diagnose|report``).

Seed paper: **GAOKAO-Eval: Does high scores truly reflect strong capabilities in LLMs?** (arXiv 2412.10056).
The paper overlays the Rasch curve on scoring-rate-vs-difficulty plots and reports R² = -0.22 ("semi
difficulty-invariant scoring", "high variance on questions of similar difficulty"). This module *fits* the
measurement model, with standard errors, fit statistics and null baselines.

Model (dichotomous Rasch, 1PL)::

    P(x_vi = 1) = σ(θ_v - b_i),   σ(z) = 1 / (1 + e^-z)        persons v = models (or model x sample), items i

Estimators (all pure NumPy/SciPy functions below; persons x items matrices, NaN = missing):

* **CML** (conditional ML; eRm): ε_i = e^-b_i, γ_r = r-th elementary symmetric function of ε::

      log L_c = -Σ_i s_i b_i - Σ_r n_r log γ_r(ε)
      ∂/∂b_i  = -s_i + Σ_r n_r π_ir,      π_ir = ε_i γ^(i)_{r-1} / γ_r
      ∂²/∂b_i∂b_j = Σ_r n_r (π_ir π_jr - π_ijr),   π_ijr = (ε_i π_jr - ε_j π_ir)/(ε_i - ε_j)   (i≠j)

  Newton on the sum-zero space b_L = -Σ_{i<L} b_i; SE = sqrt(diag(T (T'(-H)T)^-1 T')). ESFs are computed in
  rescaled linear space (row-normalised after every item, log scale carried), so hundreds of items are safe.
  Missing data: one ESF set per missingness pattern. Persons with extreme raw scores carry no information.
* **MML** (marginal ML; ltm::rasch): θ = σ z, z ~ N(0, 1), Gauss-Hermite with 21 nodes (probabilists'; or
  girth's Gauss-Legendre rule on [-4.5, 4.5] with ``quadrature="legendre"``),
  σ free or fixed; identical response patterns collapsed; L-BFGS with analytic gradient, observed-information
  SEs (finite differences of the analytic gradient). Also reported in ltm's parameterisation
  Dffclt = b/σ, Dscrmn = σ. Binomial cells (K samples) use x ~ Binomial(K, σ(θ - b)).
* **JML** (joint ML): alternating Newton steps on θ and b with extremes removed; the (L-1)/L bias correction
  (Wright & Douglas) is reported; a warning for L < 30.
* **PCM** (partial credit, Masters 1982) by CML: P(x_vi = h) ∝ exp(hθ_v - Σ_{k≤h} τ_ik); thresholds τ.

Persons: MLE (SE = 1/sqrt(I)), WLE (Warm 1989: r - Σp + J/(2I) = 0, J = Σ p(1-p)(1-2p); finite at extreme
scores, the default for 0% / 100% models), EAP under MML.

Fit: standardised residual z = (x - p)/sqrt(W), W = p(1-p), C = p(1-p)^4 + (1-p)p^4::

    outfit = mean z²,  infit = Σ(x-p)² / ΣW,  q²_out = Σ C/W² / n² - 1/n,  q²_in = Σ(C - W²) / (ΣW)²
    t = (MS^(1/3) - 1)(3/q) + q/3                                   (Wilson-Hilferty, as eRm)
    l_z = (l0 - E)/sqrt(V),  E = Σ p ln p + (1-p) ln(1-p),  V = Σ p(1-p) ln²(p/(1-p))
    G* = Guttman errors / (r(L - r))

plus person/item separation reliability and Andersen's LR test (median split or any grouping).

Detectors of the paper's two discrepancies, each next to a null reference (parametric bootstrap under the
Rasch model at the fitted θ, same items):

* **D1 difficulty invariance** per model: Spearman/Pearson(b, x) with bootstrap CIs, the slope a_m of
  σ(a_m(θ_m - b_i)) with Wald CI and LR tests a = 1 / a = 0, the paper's R² = 1 - Σ(y-ŷ)²/Σ(y-ȳ)², person fit.
* **D2 variance at similar difficulty**: bins of b, over-dispersion φ = Σ(x-p)² / Σ p(1-p) with a χ² test,
  and the most surprising (model, item) cells by |z|.

Difficulty sources (:data:`DIFFICULTY_SOURCES`): given human difficulty, IRT b from a model population,
Bradley-Terry/Elo from pairwise "which is harder" judgments, and z-scored log mean reasoning tokens.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

LSAT6_COUNTS = [3, 6, 2, 11, 1, 1, 3, 4, 1, 8, 0, 16, 0, 3, 2, 15, 10, 29, 14, 81, 3, 28, 15, 80, 16, 56, 21, 173,
                11, 61, 28, 298]
"""LSAT-6 (Bock & Lieberman 1970): counts of the 32 response patterns 00000..11111 (item 1 = leftmost bit)."""


def lsat6() -> np.ndarray:
    """The LSAT-6 matrix, (1000, 5) of 0/1."""
    rows = []
    for p, c in enumerate(LSAT6_COUNTS):
        bits = [(p >> (4 - k)) & 1 for k in range(5)]
        rows += [bits] * c
    return np.asarray(rows, dtype=float)


# ---------------------------------------------------------------------------------------------------------------
# basics


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float)))


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log σ(z) without overflow: -log(1 + e^-z)."""
    z = np.asarray(z, dtype=float)
    return -np.logaddexp(0.0, -z)


def as_matrix(X: Any) -> np.ndarray:
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise LmlabError(f"response matrix must be 2-D (persons x items), got shape {X.shape}")
    return X


@dataclass
class Extremes:
    """What :func:`drop_extremes` removed (indices into the original matrix)."""

    items_all_max: list[int] = field(default_factory=list)
    items_all_zero: list[int] = field(default_factory=list)
    persons_all_max: list[int] = field(default_factory=list)
    persons_all_zero: list[int] = field(default_factory=list)
    items_empty: list[int] = field(default_factory=list)
    persons_empty: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.__dict__.items()}


def drop_extremes(X: np.ndarray, K: np.ndarray | float = 1.0, items: bool = True, persons: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, Extremes]:
    """Iteratively remove items (and persons) whose observed responses are all 0 or all K.

    Returns (keep_persons bool (N,), keep_items bool (L,), Extremes)."""
    X = as_matrix(X)
    Kb = np.broadcast_to(np.asarray(K, dtype=float), X.shape)
    obs = ~np.isnan(X)
    kp = np.ones(X.shape[0], bool)
    ki = np.ones(X.shape[1], bool)
    ex = Extremes()
    changed = True
    while changed:
        changed = False
        sub = np.where(obs, X, 0.0)
        if items:
            n_obs = (obs & kp[:, None]).sum(0)
            s = (sub * kp[:, None]).sum(0)
            smax = (np.where(obs, Kb, 0.0) * kp[:, None]).sum(0)
            for i in np.flatnonzero(ki):
                if n_obs[i] == 0:
                    ex.items_empty.append(int(i))
                elif s[i] == 0:
                    ex.items_all_zero.append(int(i))
                elif s[i] == smax[i]:
                    ex.items_all_max.append(int(i))
                else:
                    continue
                ki[i] = False
                changed = True
        if persons:
            n_obs = (obs & ki[None, :]).sum(1)
            r = (sub * ki[None, :]).sum(1)
            rmax = (np.where(obs, Kb, 0.0) * ki[None, :]).sum(1)
            for v in np.flatnonzero(kp):
                if n_obs[v] == 0:
                    ex.persons_empty.append(int(v))
                elif r[v] == 0:
                    ex.persons_all_zero.append(int(v))
                elif r[v] == rmax[v]:
                    ex.persons_all_max.append(int(v))
                else:
                    continue
                kp[v] = False
                changed = True
    return kp, ki, ex


# ---------------------------------------------------------------------------------------------------------------
# elementary symmetric functions (rescaled linear space)


def esf(eps: np.ndarray) -> tuple[np.ndarray, float]:
    """γ_0..γ_L of ε (L,): returns (g (L+1,), log_scale) with γ = g · e^log_scale."""
    g = np.zeros(len(eps) + 1)
    g[0] = 1.0
    ls = 0.0
    for k, e in enumerate(eps):
        g[1:k + 2] = g[1:k + 2] + e * g[0:k + 1]
        m = g.max()
        g /= m
        ls += math.log(m)
    return g, ls


def esf_loo(eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out ESFs: row i is γ^(i)_0..γ^(i)_{L-1} (items except i), rescaled per row.

    Returns (G (L, L), log_scale (L,))."""
    L = len(eps)
    G = np.zeros((L, L))
    G[:, 0] = 1.0
    ls = np.zeros(L)
    for k, e in enumerate(eps):
        # rows i < k hold k-1 folded items, rows i > k hold k: update entries 1..k+1 (zeros above stay zero);
        # row k skips item k (restored after the vectorised update)
        n = min(k + 1, L - 1)
        keep_row, keep_ls = G[k].copy(), ls[k]
        G[:, 1:n + 1] += e * G[:, 0:n].copy()
        m = G.max(1)
        G /= m[:, None]
        ls += np.log(m)
        G[k], ls[k] = keep_row, keep_ls
    return G, ls


def _pi_group(eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """π_ir = ε_i γ^(i)_{r-1}/γ_r for r = 0..L (π_i0 = 0) and log γ_r. Returns (P (L, L+1), logγ (L+1,))."""
    L = len(eps)
    g, lg = esf(eps)
    G, lsi = esf_loo(eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        P = np.zeros((L, L + 1))
        P[:, 1:] = eps[:, None] * G * np.exp(lsi - lg)[:, None] / g[None, 1:]
        logg = np.log(g) + lg
    return np.nan_to_num(P), logg


def _pair_sum(eps: np.ndarray, P: np.ndarray, logg: np.ndarray, nr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """S_ij = Σ_r n_r π_ijr (L, L); π_ijr = P(x_i = x_j = 1 | r), π_iir = π_ir.

    Off the diagonal S_ij = (ε_i u_j - ε_j u_i)/(ε_i - ε_j) with u = P n (from γ^(i) - γ^(j) = (ε_j - ε_i) γ^(ij));
    near-tied pairs (equal item scores give equal ε) are computed from γ^(ij) by direct recursion."""
    L = len(eps)
    w = nr[rows]
    u = P[:, rows] @ w  # (L,)
    ei, ej = eps[:, None], eps[None, :]
    d = ei - ej
    tie = np.abs(d) < 1e-6 * np.maximum(ei, ej)
    with np.errstate(divide="ignore", invalid="ignore"):
        S = (ei * u[None, :] - ej * u[:, None]) / d
    if np.triu(tie, 1).any():
        # tie groups (items with equal ε are exchangeable: one γ^(ij) per group, from its first two members)
        order = np.argsort(eps)
        groups: list[list[int]] = [[int(order[0])]]
        for k in order[1:]:
            if abs(eps[k] - eps[groups[-1][0]]) < 1e-6 * max(eps[k], eps[groups[-1][0]]):
                groups[-1].append(int(k))
            else:
                groups.append([int(k)])
        rr = np.asarray(rows)
        ok = rr >= 2
        tied = [g for g in groups if len(g) > 1]
        ii = np.array([g[0] for g in tied])
        jj = np.array([g[1] for g in tied])
        # γ^(ij) for every tie group at once: all rows folded in parallel, rows that exclude item k restored
        G = np.zeros((len(tied), max(L - 1, 1)))
        G[:, 0] = 1.0
        ls = np.zeros(len(tied))
        folded = np.zeros(len(tied), dtype=int)
        for k, e in enumerate(eps):
            skip = (ii == k) | (jj == k)
            top = min(int(folded.max()) + 1, G.shape[1] - 1)
            saved, saved_ls = G[skip].copy(), ls[skip].copy()
            G[:, 1:top + 1] += e * G[:, 0:top].copy()
            mx = G.max(1)
            G /= mx[:, None]
            ls += np.log(mx)
            G[skip], ls[skip] = saved, saved_ls
            folded += ~skip
        for t, grp in enumerate(tied):
            i, j = grp[0], grp[1]
            val = eps[i] * eps[j] * G[t, rr[ok] - 2] * np.exp(ls[t] - logg[rr[ok]])
            idx = np.asarray(grp)
            S[np.ix_(idx, idx)] = float(val @ w[ok])
    S[np.arange(L), np.arange(L)] = u
    return np.nan_to_num(S)


# ---------------------------------------------------------------------------------------------------------------
# CML


@dataclass
class CMLResult:
    b: np.ndarray
    se: np.ndarray
    loglik: float
    iterations: int
    cov: np.ndarray
    n_used: int


def _groups(X: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Missingness patterns: [(person indices, observed item indices)]."""
    obs = ~np.isnan(X)
    keys: dict[bytes, list[int]] = {}
    for v in range(X.shape[0]):
        keys.setdefault(obs[v].tobytes(), []).append(v)
    return [(np.asarray(vs), np.flatnonzero(obs[vs[0]])) for vs in keys.values()]


def _cml_parts(b: np.ndarray, groups: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
               hessian: bool = True, grad_needed: bool = True) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Conditional log-likelihood, gradient and Hessian in b (all items)."""
    L = len(b)
    ll = 0.0
    grad = np.zeros(L)
    H = np.zeros((L, L)) if hessian else None
    for items, nr, s in ((g[1], g[2], g[3]) for g in groups):
        eps = np.exp(-b[items])
        if grad_needed is False:
            g0, lg0 = esf(eps)
            logg0 = np.log(np.maximum(g0, 1e-300)) + lg0
            Lg = len(items)
            rows = np.flatnonzero(nr[1:Lg]) + 1
            ll += -float(s @ b[items]) - float(nr[rows] @ logg0[rows])
            continue
        P, logg = _pi_group(eps)
        Lg = len(items)
        rows = np.flatnonzero(nr[1:Lg]) + 1  # non-extreme raw scores present
        ll += -float(s @ b[items]) - float(nr[rows] @ logg[rows])
        grad[items] += -s + P[:, rows] @ nr[rows]
        if hessian:
            Pr = P[:, rows]
            S = _pair_sum(eps, P, logg, nr, rows)  # Σ_r n_r π_ijr
            H[np.ix_(items, items)] -= S - (Pr * nr[rows]) @ Pr.T
    return ll, grad, H


def _sum0_T(L: int) -> np.ndarray:
    T = np.zeros((L, L - 1))
    T[: L - 1] = np.eye(L - 1)
    T[L - 1] = -1.0
    return T


def cml_fit(X: Any, tol: float = 1e-10, max_iter: int = 100) -> CMLResult:
    """Rasch CML (sum-zero constraint). ``X`` persons x items of 0/1/NaN with no extreme items."""
    X = as_matrix(X)
    if not np.all(np.isin(X[~np.isnan(X)], (0.0, 1.0))):
        raise LmlabError("CML Rasch needs 0/1 responses (use method=pcm for partial credit)")
    L = X.shape[1]
    if L < 2:
        raise LmlabError("CML needs at least 2 items")
    groups = []
    n_used = 0
    for persons, items in _groups(X):
        Xg = X[np.ix_(persons, items)]
        r = Xg.sum(1).astype(int)
        keep = (r > 0) & (r < len(items))
        nr = np.bincount(r[keep], minlength=len(items) + 1).astype(float)
        s = Xg[keep].sum(0)
        n_used += int(keep.sum())
        groups.append((persons, items, nr, s))
    obs_s = np.zeros(L)
    obs_n = np.zeros(L)
    for _, items, nr, s in groups:
        obs_s[items] += s
        obs_n[items] += nr[1:len(items)].sum()
    if np.any(obs_s <= 0) or np.any(obs_s >= obs_n):
        raise LmlabError("CML: some items are extreme among non-extreme persons (drop them first: drop_extremes)")
    p = obs_s / obs_n
    b = np.log((1 - p) / p)
    b -= b.mean()
    T = _sum0_T(L)
    ll_old = -np.inf
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        ll, g, H = _cml_parts(b, groups)
        gb, Hb = T.T @ g, T.T @ H @ T
        step = np.linalg.solve(Hb, gb)
        lam = 1.0
        for _ in range(30):
            b_new = b - lam * (T @ step)
            ll_new = _cml_parts(b_new, groups, hessian=False, grad_needed=False)[0]
            if ll_new >= ll - 1e-12:
                break
            lam /= 2
        b = b_new
        if np.max(np.abs(lam * step)) < tol or abs(ll_new - ll_old) < tol * 1e-2:
            break
        ll_old = ll_new
    ll, g, H = _cml_parts(b, groups)
    Hb = T.T @ H @ T
    cov = T @ np.linalg.inv(-Hb) @ T.T
    return CMLResult(b=b, se=np.sqrt(np.diag(cov)), loglik=ll, iterations=it, cov=cov, n_used=n_used)


def cml_loglik(X: Any, b: np.ndarray) -> float:
    X = as_matrix(X)
    groups = []
    for persons, items in _groups(X):
        Xg = X[np.ix_(persons, items)]
        r = Xg.sum(1).astype(int)
        keep = (r > 0) & (r < len(items))
        groups.append((persons, items, np.bincount(r[keep], minlength=len(items) + 1).astype(float),
                       Xg[keep].sum(0)))
    return _cml_parts(np.asarray(b, float), groups, hessian=False, grad_needed=False)[0]


# ---------------------------------------------------------------------------------------------------------------
# persons


def person_mle(X: Any, b: np.ndarray, K: Any = 1.0, wle: bool = False, tol: float = 1e-10, max_iter: int = 200,
               bound: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Person MLE (or Warm's WLE) given item difficulties b; binomial cells with K trials. NaN = missing.

    MLE of an extreme score is ±inf (use WLE). Returns (theta (N,), se (N,)) with se = 1/sqrt(I)."""
    X = as_matrix(X)
    b = np.asarray(b, float)
    Kb = np.broadcast_to(np.asarray(K, dtype=float), X.shape)
    obs = ~np.isnan(X)
    x = np.where(obs, X, 0.0)
    kk = np.where(obs, Kb, 0.0)
    r = x.sum(1)
    rmax = kk.sum(1)
    lo, hi = np.full(len(r), -bound), np.full(len(r), bound)
    theta = np.log((r + 0.5) / (rmax - r + 0.5)) + np.average(np.broadcast_to(b, X.shape), axis=1,
                                                               weights=np.maximum(kk, 1e-12))
    theta = np.clip(theta, -bound + 1, bound - 1)
    for _ in range(max_iter):
        p = sigmoid(theta[:, None] - b[None, :])
        W = kk * p * (1 - p)
        info = W.sum(1)
        f = r - (kk * p).sum(1)
        if wle:
            J = (W * (1 - 2 * p)).sum(1)
            f = f + J / (2 * info)
            # derivative of J/(2I) is small; Newton with -I as slope, bisection safeguard below
        step = f / np.maximum(info, 1e-12)
        new = theta + step
        # keep a bracket: f is decreasing in theta
        lo = np.where(f > 0, np.maximum(lo, theta), lo)
        hi = np.where(f < 0, np.minimum(hi, theta), hi)
        bad = (new <= lo) | (new >= hi)
        new = np.where(bad, 0.5 * (lo + hi), new)
        if np.max(np.abs(new - theta)) < tol:
            theta = new
            break
        theta = new
    p = sigmoid(theta[:, None] - b[None, :])
    info = (kk * p * (1 - p)).sum(1)
    se = 1 / np.sqrt(np.maximum(info, 1e-300))
    if not wle:
        theta = np.where(r <= 0, -np.inf, np.where(r >= rmax, np.inf, theta))
    return theta, se


# ---------------------------------------------------------------------------------------------------------------
# fit statistics


def wilson_hilferty_t(ms: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (np.cbrt(ms) - 1) * (3 / q) + q / 3


def fit_stats(X: Any, theta: np.ndarray, b: np.ndarray, axis: int = 0) -> dict[str, np.ndarray]:
    """Infit/outfit MNSQ with Wilson-Hilferty t. axis=0: per item (over persons), axis=1: per person.

    Persons with non-finite theta and missing cells are excluded."""
    X = as_matrix(X)
    th = np.asarray(theta, float)
    ok = np.isfinite(th)[:, None] & ~np.isnan(X)
    p = sigmoid(th[:, None] - np.asarray(b, float)[None, :])
    p = np.where(ok, p, 0.5)
    W = p * (1 - p)
    x = np.where(ok, X, 0.0)
    z2 = np.where(ok, (x - p) ** 2 / W, 0.0)
    C = p * (1 - p) ** 4 + (1 - p) * p ** 4
    n = ok.sum(axis)
    Wm = np.where(ok, W, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        outfit = z2.sum(axis) / n
        infit = np.where(ok, (x - p) ** 2, 0.0).sum(axis) / Wm.sum(axis)
        q_out = np.sqrt(np.maximum(np.where(ok, C / W ** 2, 0.0).sum(axis) / n ** 2 - 1 / n, 1e-12))
        q_in = np.sqrt(np.maximum(np.where(ok, C - W ** 2, 0.0).sum(axis) / Wm.sum(axis) ** 2, 1e-12))
    return {"outfit": outfit, "infit": infit, "outfit_t": wilson_hilferty_t(outfit, q_out),
            "infit_t": wilson_hilferty_t(infit, q_in), "n": n}


def person_lz(X: Any, theta: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Standardised log-likelihood person fit l_z (Drasgow et al. 1985); large negative = misfit."""
    X = as_matrix(X)
    ok = ~np.isnan(X) & np.isfinite(np.asarray(theta))[:, None]
    p = np.clip(sigmoid(np.asarray(theta)[:, None] - np.asarray(b)[None, :]), 1e-12, 1 - 1e-12)
    x = np.where(ok, X, 0.0)
    l0 = np.where(ok, x * np.log(p) + (1 - x) * np.log(1 - p), 0).sum(1)
    E = np.where(ok, p * np.log(p) + (1 - p) * np.log(1 - p), 0).sum(1)
    V = np.where(ok, p * (1 - p) * np.log(p / (1 - p)) ** 2, 0).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (l0 - E) / np.sqrt(V)


def guttman_errors(X: Any, b: np.ndarray) -> np.ndarray:
    """Normalised Guttman errors G* = G / (r (L - r)) per person (items ordered by difficulty b)."""
    X = as_matrix(X)
    order = np.argsort(b)  # easiest first
    out = np.full(X.shape[0], np.nan)
    for v in range(X.shape[0]):
        row = X[v, order]
        row = row[~np.isnan(row)]
        L, r = len(row), int(row.sum())
        if 0 < r < L:
            # pairs (easy i, hard j) with x_i = 0, x_j = 1
            zeros_before = np.cumsum(row == 0)
            G = float(zeros_before[row == 1].sum())
            out[v] = G / (r * (L - r))
    return out


def separation_reliability(est: np.ndarray, se: np.ndarray) -> float:
    """(var(est) - mean(se²)) / var(est) over finite estimates."""
    ok = np.isfinite(est) & np.isfinite(se)
    if ok.sum() < 2:
        return float("nan")
    v = float(np.var(est[ok], ddof=1))
    return float((v - np.mean(se[ok] ** 2)) / v) if v > 0 else float("nan")


def andersen_lr(X: Any, groups: np.ndarray | None = None) -> dict[str, Any]:
    """Andersen's LR test: 2(Σ_g log L_c(g) - log L_c); df = (L-1)(G-1). Default split: raw score <= median.

    Items extreme within any group are dropped from all fits (reported)."""
    from scipy.stats import chi2

    X = as_matrix(X)
    r = np.nansum(X, 1)
    L = X.shape[1]
    nonext = (r > 0) & (r < (~np.isnan(X)).sum(1))
    X = X[nonext]
    r = r[nonext]
    if groups is None:
        med = np.median(r)
        groups = np.where(r <= med, 0, 1)
        if len(np.unique(groups)) < 2:  # the median is the top score: split at < median instead
            groups = np.where(r < med, 0, 1)
    else:
        groups = np.asarray(groups)[nonext]
    labels = np.unique(groups)
    keep = np.ones(L, bool)
    for g in labels:
        Xg = X[groups == g]
        s = np.nansum(Xg, 0)
        n = (~np.isnan(Xg)).sum(0)
        keep &= (s > 0) & (s < n)
    if keep.sum() < 2 or len(labels) < 2:
        return {"lr": float("nan"), "df": 0, "p": float("nan"), "dropped_items": np.flatnonzero(~keep).tolist()}
    Xk = X[:, keep]
    total = cml_fit(Xk).loglik
    parts = sum(cml_fit(Xk[groups == g]).loglik for g in labels)
    lr = 2 * (parts - total)
    df = (int(keep.sum()) - 1) * (len(labels) - 1)
    return {"lr": float(lr), "df": df, "p": float(chi2.sf(lr, df)), "dropped_items": np.flatnonzero(~keep).tolist()}


# ---------------------------------------------------------------------------------------------------------------
# MML


def gh_nodes(n: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """Probabilists' Gauss-Hermite nodes z and weights w (Σ w = 1) for E[f(z)], z ~ N(0, 1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / w.sum()


def legendre_nodes(n: int = 41, bounds: tuple[float, float] = (-4.5, 4.5)) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes z on ``bounds`` with weights w ∝ w_legendre · φ(z) (Σ w = 1): girth's quadrature
    (``quadrature_n`` 41, ``quadrature_bounds`` (-4.5, 4.5), N(0, 1) pdf), for like-for-like comparisons."""
    from scipy.special import roots_legendre

    x, wl = roots_legendre(n)
    lo, hi = bounds
    half = (hi - lo) / 2
    z = half * (np.real(x) + 1) + lo
    w = half * wl * np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    return z, w / w.sum()


QUADRATURES = {"gauss-hermite": lambda n, bounds: gh_nodes(n), "legendre": legendre_nodes}
"""MML quadrature rules: Gauss-Hermite (ltm's, the default) or Gauss-Legendre on a bounded range (girth's)."""


@dataclass
class MMLResult:
    b: np.ndarray
    sigma: float
    se_b: np.ndarray
    se_sigma: float
    loglik: float
    ltm_difficulty: np.ndarray
    ltm_discrimination: float
    converged: bool
    theta_eap: np.ndarray
    theta_eap_sd: np.ndarray


def _collapse(X: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique (response, K) rows and their counts; returns (patterns, K_patterns, counts, inverse)."""
    key = np.concatenate([np.nan_to_num(X, nan=-1.0), K], 1)
    uniq, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    L = X.shape[1]
    pat = uniq[:, :L].copy()
    pat[pat < 0] = np.nan
    return pat, uniq[:, L:], cnt.astype(float), inv.ravel()


def _mml_terms(params: np.ndarray, pat: np.ndarray, Kp: np.ndarray, cnt: np.ndarray, z: np.ndarray,
               w: np.ndarray, sigma_fixed: float | None, binom_const: np.ndarray, hessian: bool = False
               ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray | None]:
    """Marginal log-likelihood, gradient, node posteriors (P, Q) and (optionally) the analytic Hessian.

    Parameters: b (L,) and, with σ free, log σ. Hessian by Louis' identity per pattern:
    H = Σ_p c_p [Σ_q post_pq (D_pq + s_pq s_pq') - ḡ_p ḡ_p'], s_pq = ∂ log f(x_p | z_q), D_pq = ∂² log f."""
    L = pat.shape[1]
    b = params[:L]
    free = sigma_fixed is None
    sigma = math.exp(params[L]) if free else sigma_fixed
    obs = ~np.isnan(pat)
    x = np.where(obs, pat, 0.0)
    k = np.where(obs, Kp, 0.0)
    eta = sigma * z[:, None] - b[None, :]  # (Q, L)
    lp, lq = log_sigmoid(eta), log_sigmoid(-eta)
    ll_pq = x @ lp.T + (k - x) @ lq.T + binom_const[:, None]  # (P, Q) log f(x_p | z_q)
    lw = ll_pq + np.log(w)[None, :]
    m = lw.max(1, keepdims=True)
    lik = np.log(np.exp(lw - m).sum(1)) + m[:, 0]
    post = np.exp(lw - lik[:, None])  # (P, Q)
    ll = float(cnt @ lik)
    p = sigmoid(eta)  # (Q, L)
    cp = cnt[:, None] * post  # (P, Q)
    A = cp.T @ k  # (Q, L) Σ_p c post k
    resid_sum = cp.T @ x - A * p  # (Q, L) Σ_p c post (x - k p)
    M = L + int(free)
    g = np.zeros(M)
    g[:L] = -resid_sum.sum(0)
    if free:
        g[L] = float((z[:, None] * resid_sum).sum()) * sigma
    if not hessian:
        return ll, g, post, None
    P_, Q = post.shape
    Kc = float(k.flat[0]) if k.size else 1.0
    if obs.all() and np.all(k == Kc):
        # complete data, constant K: expand Σ_pq w (x - Kp_q)(x - Kp_q)' into (P, L) and (Q, L) products
        wp = cp @ p  # (P, L) Σ_q w_pq p_q
        xc = x * cnt[:, None]
        H = np.zeros((M, M))
        H[:L, :L] = xc.T @ x - Kc * (x.T @ wp + wp.T @ x) + Kc ** 2 * (p * cp.sum(0)[:, None]).T @ p
        gbar = -(x - Kc * (post @ p))  # (P, L)
        if free:
            Ss = sigma * z[None, :] * (x.sum(1)[:, None] - Kc * p.sum(1)[None, :])  # (P, Q) ∂/∂log σ
            wS = cp * Ss
            H[:L, L] = H[L, :L] = -x.T @ wS.sum(1) + Kc * p.T @ wS.sum(0)
            H[L, L] = float((wS * Ss).sum())
            gbar = np.concatenate([gbar, (post * Ss).sum(1, keepdims=True)], 1)
    else:
        R = x[:, None, :] - k[:, None, :] * p[None, :, :]  # (P, Q, L) s_pq for b is -R
        S = -R if not free else np.concatenate([-R, (sigma * z)[None, :, None] * R.sum(2, keepdims=True)], 2)
        Sf = S.reshape(P_ * Q, M)
        H = (Sf * cp.reshape(-1)[:, None]).T @ Sf
        gbar = np.einsum("pq,pqm->pm", post, S)  # (P, M)
    H -= (gbar * cnt[:, None]).T @ gbar
    Wq = A * p * (1 - p)  # (Q, L)
    H[np.arange(L), np.arange(L)] -= Wq.sum(0)
    if free:
        cross = (sigma * z[:, None] * Wq).sum(0)
        H[:L, L] += cross
        H[L, :L] += cross
        H[L, L] += g[L] - sigma ** 2 * float((z[:, None] ** 2 * Wq).sum())
    return ll, g, post, H


def mml_fit(X: Any, K: Any = 1.0, sigma: float | None = None, n_nodes: int = 21, tol: float = 1e-10,
            quadrature: str = "gauss-hermite", bounds: tuple[float, float] = (-4.5, 4.5)) -> MMLResult:
    """Rasch MML with θ ~ N(0, σ²) (σ free, or fixed to ``sigma``); binomial cells with K trials.
    ``quadrature``: ``gauss-hermite`` (ltm's; default) or ``legendre`` on ``bounds`` (girth's rule)."""
    from scipy.special import gammaln

    X = as_matrix(X)
    Kb = np.broadcast_to(np.asarray(K, dtype=float), X.shape).astype(float)
    L = X.shape[1]
    pat, Kp, cnt, inv = _collapse(X, Kb)
    obs = ~np.isnan(pat)
    xx = np.where(obs, pat, 0.0)
    kk = np.where(obs, Kp, 0.0)
    bc = (gammaln(kk + 1) - gammaln(xx + 1) - gammaln(kk - xx + 1)).sum(1)
    if quadrature not in QUADRATURES:
        raise LmlabError(f"unknown quadrature {quadrature!r}; choose from {sorted(QUADRATURES)}")
    z, w = QUADRATURES[quadrature](n_nodes, bounds)
    s = np.nansum(X, 0)
    n = np.where(np.isnan(X), 0.0, Kb).sum(0)
    p0 = np.clip(s / np.maximum(n, 1e-12), 0.02, 0.98)
    x0 = np.log((1 - p0) / p0)
    if sigma is None:
        x0 = np.append(x0, 0.0)

    def terms(prm, hess=False):
        return _mml_terms(prm, pat, Kp, cnt, z, w, sigma, bc, hessian=hess)

    # Newton-Raphson with the analytic Hessian, step halving, Levenberg damping if H is not negative definite
    prm = x0.astype(float)
    ll, g, _, H = terms(prm, True)
    converged = False
    for _ in range(200):
        lam = 0.0
        while True:
            try:
                Hd = H - lam * np.eye(len(prm))
                np.linalg.cholesky(-Hd)
                step = np.linalg.solve(Hd, g)
                break
            except np.linalg.LinAlgError:
                lam = max(2 * lam, 1e-3)
        t = 1.0
        for _ in range(40):
            new = prm - t * step
            ll_new = terms(new)[0]
            if ll_new >= ll - 1e-10:
                break
            t /= 2
        prm = new
        ll, g, _, H = terms(prm, True)
        if np.max(np.abs(g)) < tol or np.max(np.abs(t * step)) < 1e-12:
            converged = np.max(np.abs(g)) < 1e-5
            break
    ll, _, post, H = terms(prm, True)
    peak = float(np.average(post.max(1), weights=cnt))
    if peak > 0.8:  # posteriors narrower than the node spacing: fixed Gauss-Hermite under-resolves them
        warnings.warn(f"MML: {n_nodes} quadrature nodes are too coarse for this test length (mean posterior "
                      f"mass on one node {peak:.2f}); raise nodes, use quadrature='legendre' (41 nodes on [-4.5, 4.5] "
                      "is within 2e-3 of a 401-node fit at 300 items), or use CML", stacklevel=2)
    try:
        cov = np.linalg.inv(-H)
    except np.linalg.LinAlgError:
        cov = np.full(H.shape, np.nan)
    se = np.sqrt(np.abs(np.diag(cov)))
    b = prm[:L]
    sig = sigma if sigma is not None else math.exp(prm[L])
    se_sig = float(se[L] * sig) if sigma is None else 0.0
    theta_nodes = sig * z
    eap = post @ theta_nodes
    eap_sd = np.sqrt(np.maximum(post @ theta_nodes ** 2 - eap ** 2, 0))
    return MMLResult(b=b, sigma=float(sig), se_b=se[:L], se_sigma=se_sig, loglik=ll, ltm_difficulty=b / sig,
                     ltm_discrimination=float(sig), converged=bool(converged),
                     theta_eap=eap[inv], theta_eap_sd=eap_sd[inv])


def _fd_hessian(grad, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    n = len(x)
    H = np.zeros((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        H[:, j] = (grad(x + e) - grad(x - e)) / (2 * h)
    return 0.5 * (H + H.T)


# ---------------------------------------------------------------------------------------------------------------
# JML


@dataclass
class JMLResult:
    b: np.ndarray
    b_corrected: np.ndarray
    theta: np.ndarray
    se_b: np.ndarray
    se_theta: np.ndarray
    iterations: int


def jml_fit(X: Any, K: Any = 1.0, tol: float = 1e-8, max_iter: int = 500) -> JMLResult:
    """Rasch JML (binomial cells with K trials); no extreme rows/columns allowed (use drop_extremes).

    b is centred (Σb = 0); ``b_corrected`` = b (L-1)/L (Wright & Douglas)."""
    X = as_matrix(X)
    N, L = X.shape
    if L < 30:
        warnings.warn(f"JML is biased for short tests (L = {L} < 30); prefer CML or MML", stacklevel=2)
    Kb = np.broadcast_to(np.asarray(K, dtype=float), X.shape)
    obs = ~np.isnan(X)
    x = np.where(obs, X, 0.0)
    k = np.where(obs, Kb, 0.0)
    r, s = x.sum(1), x.sum(0)
    if np.any(r <= 0) or np.any(r >= k.sum(1)) or np.any(s <= 0) or np.any(s >= k.sum(0)):
        raise LmlabError("JML: extreme persons or items present (drop them first: drop_extremes)")
    theta = np.log(r / (k.sum(1) - r))
    b = np.log((k.sum(0) - s) / s)
    b -= b.mean()
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        p = sigmoid(theta[:, None] - b[None, :])
        W = k * p * (1 - p)
        theta = theta + (r - (k * p).sum(1)) / W.sum(1)
        p = sigmoid(theta[:, None] - b[None, :])
        W = k * p * (1 - p)
        db = -(s - (k * p).sum(0)) / W.sum(0)
        b = b + db
        b -= b.mean()
        if np.max(np.abs(db)) < tol:
            break
    p = sigmoid(theta[:, None] - b[None, :])
    W = k * p * (1 - p)
    return JMLResult(b=b, b_corrected=b * (L - 1) / L, theta=theta, se_b=1 / np.sqrt(W.sum(0)),
                     se_theta=1 / np.sqrt(W.sum(1)), iterations=it)


# ---------------------------------------------------------------------------------------------------------------
# PCM by CML


@dataclass
class PCMResult:
    thresholds: list[np.ndarray]
    se: list[np.ndarray]
    location: np.ndarray
    loglik: float


def _pcm_esf(E: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """γ_r of items with category parameters E[i] = (1, ε_i1, .., ε_im) (polynomial product)."""
    g = np.ones(1)
    ls = 0.0
    for e in E:
        g = np.convolve(g, e)
        m = g.max()
        g /= m
        ls += math.log(m)
    return g, ls


def pcm_fit(X: Any, m: Any = None) -> PCMResult:
    """Partial credit model by CML. X persons x items of integer scores 0..m_i (no missing).

    Thresholds τ_ih (h = 1..m_i), log ε_ih = -Σ_{k≤h} τ_ik; identified by Σ τ = 0 (as eRm sum0).
    SEs from the finite-difference observed information of the analytic gradient."""
    from scipy.optimize import minimize

    X = as_matrix(X)
    if np.isnan(X).any():
        raise LmlabError("PCM: missing responses are not supported")
    Xi = X.astype(int)
    L = X.shape[1]
    mm = np.asarray(m if m is not None else Xi.max(0), dtype=int)
    if np.any(mm < 1):
        raise LmlabError("PCM: every item needs at least two observed categories")
    r = Xi.sum(1)
    R = int(mm.sum())
    keep = (r > 0) & (r < R)
    Xk, rk = Xi[keep], r[keep]
    nr = np.bincount(rk, minlength=R + 1).astype(float)
    counts = [np.array([(Xk[:, i] == h).sum() for h in range(mm[i] + 1)], float) for i in range(L)]
    sizes = list(mm)
    offs = np.concatenate([[0], np.cumsum(sizes)])
    n_par = int(offs[-1])

    def unpack(q):
        full = np.concatenate([[0.0], q])  # first threshold fixed at 0, recentred afterwards
        return [full[offs[i]:offs[i + 1]] for i in range(L)]

    def nll(q):
        taus = unpack(q)
        logE = [np.concatenate([[0.0], -np.cumsum(t)]) for t in taus]
        E = [np.exp(le) for le in logE]
        g, ls = _pcm_esf(E)
        logg = np.log(np.maximum(g, 1e-300)) + ls
        ll = sum(float(counts[i] @ logE[i]) for i in range(L)) - float(nr @ logg)
        # gradient wrt log ε_ih: counts_ih - Σ_r n_r P(x_i = h | r)
        grad_le = []
        for i in range(L):
            gi, lsi = _pcm_esf(E[:i] + E[i + 1:])
            Pih = np.zeros(mm[i] + 1)
            for h in range(mm[i] + 1):
                idx = np.arange(h, R + 1)
                vals = np.zeros(R + 1)
                ok = idx - h < len(gi)
                vals[idx[ok]] = E[i][h] * gi[idx[ok] - h] * np.exp(lsi - ls) / np.maximum(g[idx[ok]], 1e-300)
                Pih[h] = nr @ vals
            grad_le.append(counts[i] - Pih)
        # chain: log ε_ih = -Σ_{k≤h} τ_ik -> d/dτ_ik = -Σ_{h≥k} d/dlogε_ih
        gt = np.concatenate([-np.cumsum(gl[1:][::-1])[::-1] for gl in grad_le])
        return -ll, -gt[1:]

    res = minimize(nll, np.zeros(n_par - 1), jac=True, method="L-BFGS-B",
                   options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-9})
    q = res.x
    H = _fd_hessian(lambda v: nll(v)[1], q)
    for _ in range(3):
        gq = nll(q)[1]
        if np.max(np.abs(gq)) < 1e-10:
            break
        q = q - np.linalg.solve(H, gq)
    full = np.concatenate([[0.0], q])
    # recentre (a shift of all τ is a θ shift: conditional likelihood invariant)
    c = full.mean()
    full -= c
    # SEs for the constrained parameters via T transform (τ_1 = -Σ others after centring is a linear map)
    cov_q = np.linalg.inv(H)
    A = np.zeros((n_par, n_par - 1))
    A[1:] = np.eye(n_par - 1)
    A -= A.mean(0, keepdims=True)  # centring map
    cov = A @ cov_q @ A.T
    se = np.sqrt(np.abs(np.diag(cov)))
    taus = [full[offs[i]:offs[i + 1]] for i in range(L)]
    ses = [se[offs[i]:offs[i + 1]] for i in range(L)]
    return PCMResult(thresholds=taus, se=ses, location=np.array([t.mean() for t in taus]), loglik=-nll(q)[0])


# ---------------------------------------------------------------------------------------------------------------
# detectors


def slope_fit(x: np.ndarray, b: np.ndarray, K: Any = 1.0) -> dict[str, float]:
    """Fit x_i ~ Binomial(K_i, σ(a(θ - b_i))) by ML; LR tests of a = 1 and a = 0; Wald 95% CI for a."""
    from scipy.stats import chi2

    x = np.asarray(x, float)
    b = np.asarray(b, float)
    ok = ~np.isnan(x)
    x, b = x[ok], b[ok]
    k = np.broadcast_to(np.asarray(K, float), ok.shape)[ok]

    def ll(eta):
        return float((x * log_sigmoid(eta) + (k - x) * log_sigmoid(-eta)).sum())

    def newton(Z, beta):  # logistic regression eta = Z beta
        for _ in range(100):
            p = sigmoid(Z @ beta)
            g = Z.T @ (x - k * p)
            H = (Z * (k * p * (1 - p))[:, None]).T @ Z + 1e-9 * np.eye(Z.shape[1])
            step = np.linalg.solve(H, g)
            # ridge-free damping for separation
            step = np.clip(step, -5, 5)
            beta = beta + step
            if np.max(np.abs(step)) < 1e-10:
                break
        return beta, H

    # full: eta = α - a b  (α = aθ)
    Z = np.stack([np.ones_like(b), -b], 1)
    beta, H = newton(Z, np.array([0.0, 1.0]))
    ll_full = ll(Z @ beta)
    cov = np.linalg.inv(H)
    a, se_a = float(beta[1]), float(math.sqrt(max(cov[1, 1], 0)))
    # a = 1: eta = θ - b (offset)
    th = 0.0
    for _ in range(100):
        p = sigmoid(th - b)
        step = (x - k * p).sum() / max((k * p * (1 - p)).sum(), 1e-12)
        th += float(np.clip(step, -5, 5))
        if abs(step) < 1e-12:
            break
    ll_a1 = ll(th - b)
    pbar = np.clip(x.sum() / k.sum(), 1e-12, 1 - 1e-12)
    ll_a0 = ll(np.full_like(b, math.log(pbar / (1 - pbar))))
    lr1, lr0 = 2 * (ll_full - ll_a1), 2 * (ll_full - ll_a0)
    theta = float(beta[0] / a) if abs(a) > 1e-8 else float("nan")
    return {"a": a, "a_se": se_a, "a_lo": a - 1.96 * se_a, "a_hi": a + 1.96 * se_a, "theta_at_a": theta,
            "lr_a1": float(lr1), "p_a1": float(chi2.sf(max(lr1, 0), 1)), "lr_a0": float(lr0),
            "p_a0": float(chi2.sf(max(lr0, 0), 1)), "theta_rasch": th}


def r2_paper(y: np.ndarray, yhat: np.ndarray) -> float:
    """GAOKAO-Eval's R² = 1 - Σ(y - ŷ)² / Σ(y - ȳ)² (negative: worse than the constant mean)."""
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    ok = ~np.isnan(y) & ~np.isnan(yhat)
    y, yhat = y[ok], yhat[ok]
    ss = float(((y - y.mean()) ** 2).sum())
    return 1 - float(((y - yhat) ** 2).sum()) / ss if ss > 0 else float("nan")


CLASSES = ("rasch_consistent", "flattened", "difficulty_invariant", "inverted", "steeper")


def classify(slope: dict[str, float]) -> str:
    """D1 label from the slope test: inverted if a < 0 significantly (better on harder items); invariant if
    a = 0 is not rejected (and a < 0.5); flattened if a < 1 significantly; steeper if a > 1 significantly;
    else Rasch-consistent."""
    if slope["a"] < 0 and slope["p_a0"] < 0.05:
        return "inverted"
    if slope["p_a0"] > 0.05 and slope["a"] < 0.5:
        return "difficulty_invariant"
    if slope["p_a1"] < 0.05 and slope["a"] < 1:
        return "flattened"
    if slope["p_a1"] < 0.05 and slope["a"] > 1:
        return "steeper"
    return "rasch_consistent"


def d1_model(x: np.ndarray, b: np.ndarray, K: Any = 1.0, n_boot: int = 200, n_null: int = 200, seed: int = 0
             ) -> dict[str, Any]:
    """D1 difficulty-invariance diagnosis of one model (responses x over items with anchored b)."""
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(seed)
    x = np.asarray(x, float)
    b = np.asarray(b, float)
    ok = ~np.isnan(x) & np.isfinite(b)
    x, b = x[ok], b[ok]
    k = np.broadcast_to(np.asarray(K, float), ok.shape)[ok]
    y = x / k
    L = len(x)

    def corr(yy, bb):
        if np.ptp(yy) == 0 or np.ptp(bb) == 0:
            return float("nan"), float("nan")
        return float(spearmanr(bb, yy)[0]), float(pearsonr(bb, yy)[0])

    rho, r = corr(y, b)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, L, L)
        boots.append(corr(y[idx], b[idx]))
    boots = np.asarray(boots)
    def q3(v):
        v = np.asarray(v, float)
        v = v[np.isfinite(v)]
        return [float(np.percentile(v, 2.5)), float(np.median(v)), float(np.percentile(v, 97.5))] if len(v) else \
            [float("nan")] * 3

    def ci(col):
        lo, _, hi = q3(boots[:, col])
        return [lo, hi]

    slope = slope_fit(x, b, k)
    theta, se = person_mle(x[None, :], b, k[None, :], wle=True)
    th = float(theta[0])
    yhat = sigmoid(th - b)
    r2 = r2_paper(y, yhat)
    X1 = y[None, :] if np.all(k == 1) else None
    fit = fit_stats(X1, np.array([th]), b, axis=1) if X1 is not None else None
    lz = float(person_lz(X1, np.array([th]), b)[0]) if X1 is not None else float("nan")
    gs = float(guttman_errors(X1, b)[0]) if X1 is not None else float("nan")
    # null: Rasch-consistent responses at the same θ and items
    null = {"a": [], "spearman": [], "r2": [], "infit": [], "outfit": [], "lz": []}
    p = sigmoid(th - b)
    for _ in range(n_null):
        xs = rng.binomial(k.astype(int), p).astype(float)
        ys = xs / k
        sl = slope_fit(xs, b, k)
        null["a"].append(sl["a"])
        null["spearman"].append(corr(ys, b)[0])
        null["r2"].append(r2_paper(ys, p))
        if X1 is not None:
            f = fit_stats(ys[None, :], np.array([th]), b, axis=1)
            null["infit"].append(float(f["infit"][0]))
            null["outfit"].append(float(f["outfit"][0]))
            null["lz"].append(float(person_lz(ys[None, :], np.array([th]), b)[0]))
    nullq = {k2: (q3(v) if len(v) else None) for k2, v in null.items()}
    out = {"n_items": L, "theta_wle": th, "theta_se": float(se[0]), "score_rate": float(y.mean()),
           "spearman": rho, "spearman_ci": ci(0), "pearson": r, "pearson_ci": ci(1), **slope, "r2": r2,
           "label": classify(slope), "null_2.5_50_97.5": nullq}
    if fit is not None:
        out.update(infit=float(fit["infit"][0]), outfit=float(fit["outfit"][0]), infit_t=float(fit["infit_t"][0]),
                   outfit_t=float(fit["outfit_t"][0]), lz=lz, guttman=gs)
    return out


def d2_bins(X: np.ndarray, theta: np.ndarray, b: np.ndarray, K: Any = 1.0, n_bins: int | None = None,
            min_items: int = 10, top_k: int = 10, names: tuple[list[str], list[str]] | None = None,
            n_null: int = 200, seed: int = 0) -> dict[str, Any]:
    """D2: over-dispersion φ = Σ(x - Kp)² / Σ Kp(1-p) per difficulty bin, χ² test, simulated null, top cells."""
    from scipy.stats import chi2

    X = as_matrix(X)
    b = np.asarray(b, float)
    th = np.asarray(theta, float)
    Kb = np.broadcast_to(np.asarray(K, float), X.shape)
    okc = ~np.isnan(X) & np.isfinite(th)[:, None] & np.isfinite(b)[None, :]
    L = int(np.isfinite(b).sum())
    n_bins = n_bins or max(1, min(10, L // min_items))
    edges = np.unique(np.quantile(b[np.isfinite(b)], np.linspace(0, 1, n_bins + 1)))
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0]])
    edges[-1] += 1e-9
    n_bins = len(edges) - 1
    p = sigmoid(th[:, None] - b[None, :])
    W = Kb * p * (1 - p)
    resid2 = np.where(okc, (np.nan_to_num(X) - Kb * p) ** 2, 0.0)
    rng = np.random.default_rng(seed)
    bins = []
    for j in range(n_bins):
        inb = (b >= edges[j]) & (b < edges[j + 1])
        m = okc & inb[None, :]
        num, den = resid2[m].sum(), W[m].sum()
        n = int(m.sum())
        phi = float(num / den) if den > 0 else float("nan")
        chi = float((resid2[m] / W[m]).sum())
        sims = []
        for _ in range(n_null):
            xs = rng.binomial(Kb[m].astype(int), p[m])
            sims.append(float(((xs - Kb[m] * p[m]) ** 2).sum() / den))
        bins.append({"lo": float(edges[j]), "hi": float(edges[j + 1]), "n_items": int(inb.sum()), "n_cells": n,
                     "phi": phi, "chi2": chi, "p": float(chi2.sf(chi, n)) if n else float("nan"),
                     "null_phi_95": float(np.percentile(sims, 95)) if sims else float("nan")})
    z = np.where(okc, (np.nan_to_num(X) - Kb * p) / np.sqrt(np.maximum(W, 1e-12)), 0.0)
    flat = np.argsort(-np.abs(z), axis=None)[:top_k]
    cells = []
    for f in flat:
        v, i = np.unravel_index(f, z.shape)
        if not okc[v, i]:
            continue
        cells.append({"person": names[0][v] if names else int(v), "item": names[1][i] if names else int(i),
                      "x": float(X[v, i]), "p": float(p[v, i]), "z": float(z[v, i])})
    num, den = resid2[okc].sum(), W[okc].sum()
    return {"bins": bins, "phi_overall": float(num / den) if den > 0 else float("nan"), "top_cells": cells}


# ---------------------------------------------------------------------------------------------------------------
# difficulty sources


def bradley_terry(pairs: list[tuple[str, str]], items: list[str] | None = None, iters: int = 1000,
                  prior: float = 0.5) -> dict[str, float]:
    """Bradley-Terry MLE (MM algorithm, Hunter 2004) from (harder, easier) judgments; z-scored log strengths.

    ``prior`` adds that many virtual wins and losses against a mean item (keeps unbeaten items finite)."""
    names = items or sorted({a for p in pairs for a in p})
    idx = {n: i for i, n in enumerate(names)}
    n = len(names)
    wins = np.full(n, prior)
    games = np.zeros((n, n))
    for h, e in pairs:
        if h not in idx or e not in idx:
            raise LmlabError(f"pairwise judgment names an unknown item: {h!r} vs {e!r}")
        wins[idx[h]] += 1
        games[idx[h], idx[e]] += 1
        games[idx[e], idx[h]] += 1
    gam = np.ones(n)
    for _ in range(iters):
        denom = (games / (gam[:, None] + gam[None, :])).sum(1) + 2 * prior / (gam + 1.0)
        new = wins / denom
        new /= np.exp(np.mean(np.log(new)))
        if np.max(np.abs(new - gam)) < 1e-10:
            gam = new
            break
        gam = new
    s = np.log(gam)
    s = (s - s.mean()) / (s.std() if s.std() > 0 else 1.0)
    return dict(zip(names, s.tolist()))


def zscore(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, float)
    ok = np.isfinite(v)
    out = np.full_like(v, np.nan)
    sd = v[ok].std()
    out[ok] = (v[ok] - v[ok].mean()) / (sd if sd > 0 else 1.0)
    return out


DIFFICULTY_SOURCES = ("human", "irt", "elo", "tokens")
"""human: the items' given difficulty; irt: CML b from the model population; elo: Bradley-Terry from pairwise
judgments; tokens: z-scored log mean reasoning/completion tokens (the paper's o1 reasoning-as-difficulty)."""


# ---------------------------------------------------------------------------------------------------------------
# matrix I/O


@dataclass
class Matrix:
    """A models x items response matrix (NaN = missing) with binomial trial counts K."""

    values: np.ndarray
    K: np.ndarray
    persons: list[str]
    items: list[str]
    item_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: str = "binary"

    def to_json(self) -> dict[str, Any]:
        nan = lambda a: [[None if np.isnan(v) else float(v) for v in row] for row in a]  # noqa: E731
        return {"kind": self.kind, "persons": self.persons, "items": self.items, "values": nan(self.values),
                "K": self.K.tolist(), "item_meta": self.item_meta}


def load_matrix(path: str | Path) -> Matrix:
    """matrix.json (from ``eval matrix``), or a CSV with a header of item ids and the person id first."""
    path = Path(path)
    if path.is_dir():
        path = path / "matrix.json"
    if not path.is_file():
        raise LmlabError(f"matrix file not found: {path}")
    if path.suffix == ".json":
        try:
            d = json.loads(path.read_text())
            vals = np.array([[np.nan if v is None else v for v in row] for row in d["values"]], float)
            K = np.asarray(d.get("K", np.ones_like(vals)), float)
            return Matrix(vals, np.broadcast_to(K, vals.shape).copy(), list(map(str, d["persons"])),
                          list(map(str, d["items"])), d.get("item_meta", {}), d.get("kind", "binary"))
        except (KeyError, ValueError, TypeError) as e:
            raise LmlabError(f"{path}: not a response matrix ({e})") from None
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or len(rows[0]) < 3:
        raise LmlabError(f"{path}: need a header (person, item ids...) and at least one row")
    items = rows[0][1:]
    persons, vals = [], []
    for ln, row in enumerate(rows[1:], 2):
        if len(row) != len(rows[0]):
            raise LmlabError(f"{path}:{ln}: expected {len(rows[0])} columns, got {len(row)}")
        persons.append(row[0])
        try:
            vals.append([float(v) if v.strip() not in ("", "NA", "nan") else np.nan for v in row[1:]])
        except ValueError as e:
            raise LmlabError(f"{path}:{ln}: {e}") from None
    V = np.asarray(vals, float)
    return Matrix(V, np.ones_like(V), persons, items)


# ---------------------------------------------------------------------------------------------------------------
# commands


METHODS = ("cml", "mml", "jml", "pcm")


@dataclass
class IrtFitConfig(RunArgs):
    """Fit a Rasch model (CML/MML/JML/PCM) to a models x items response matrix."""

    matrix: str = ""
    """matrix.json from `lmlab eval matrix` (or its run dir), or a CSV (person id, then one column per item)."""
    method: str = "cml"
    """cml | mml | jml | pcm (partial credit by CML)."""
    sigma: float | None = None
    """MML: fix the ability SD (default: free)."""
    nodes: int = 21
    """MML: quadrature nodes."""
    quadrature: str = "gauss-hermite"
    """MML: gauss-hermite (ltm's rule) | legendre (girth's: Gauss-Legendre on [-4.5, 4.5], N(0, 1) weights)."""
    binarize: float | None = None
    """Dichotomise partial-credit values at this fraction of K (e.g. 1.0 = full credit)."""
    plots: bool = True
    """Write the Wright map, item characteristic curves and the infit bubble chart."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.nodes < 3:
            raise ConfigError("nodes must be >= 3")
        if self.quadrature not in QUADRATURES:
            raise ConfigError(f"quadrature must be one of {sorted(QUADRATURES)}, got {self.quadrature!r}")


def _prepare(m: Matrix, binarize: float | None) -> tuple[np.ndarray, np.ndarray]:
    X, K = m.values.copy(), m.K.copy()
    if binarize is not None:
        X = np.where(np.isnan(X), np.nan, (binarize * K - 1e-9 <= X).astype(float))
        K = np.ones_like(K)
    return X, K


def fit_matrix(m: Matrix, method: str = "cml", sigma: float | None = None, nodes: int = 21,
               binarize: float | None = None, quadrature: str = "gauss-hermite") -> dict[str, Any]:
    """Everything ``eval irt fit`` computes, as a JSON-able dict (items, persons, fit, dropped, tests)."""
    X, K = _prepare(m, binarize)
    binary = bool(np.all(K == 1)) and np.all(np.isin(X[~np.isnan(X)], (0.0, 1.0)))
    if method in ("cml",) and not binary:
        raise LmlabError("CML Rasch needs a binary matrix: pass binarize=1.0, or use method=mml/jml (binomial) "
                         "or pcm (partial credit)")
    # CML/JML condition on (or cannot use) extreme persons: drop them too when deciding which items are extreme
    kp, ki, ex = drop_extremes(X, K, persons=method in ("cml", "jml", "pcm"))
    dropped_items = [m.items[i] for i in np.flatnonzero(~ki)]
    if ki.sum() < 2:
        raise LmlabError(f"fewer than 2 non-extreme items left ({len(dropped_items)} dropped as all-correct/"
                         "all-wrong); nothing to fit")
    if dropped_items:
        log.info("dropped %d extreme items: %s", len(dropped_items), dropped_items[:10])
    Xi, Ki = X[:, ki], K[:, ki]
    items = [m.items[i] for i in np.flatnonzero(ki)]
    out: dict[str, Any] = {"method": method, "n_persons": X.shape[0], "n_items": int(ki.sum()),
                           "dropped": {"items_all_correct": [m.items[i] for i in ex.items_all_max],
                                       "items_all_wrong": [m.items[i] for i in ex.items_all_zero],
                                       "items_empty": [m.items[i] for i in ex.items_empty],
                                       "persons_extreme": [m.persons[v] for v in ex.persons_all_max +
                                                           ex.persons_all_zero]}}
    if method == "pcm":
        Ki0 = Ki[0]
        if np.any(np.abs(Xi - np.round(Xi)) > 1e-9):
            raise LmlabError("PCM needs integer category scores (pass a matrix of integer points)")
        res = pcm_fit(Xi, m=Ki0.astype(int) if np.all(Ki == Ki0) else None)
        out["items"] = [{"id": it, "b": float(res.location[j]), "thresholds": res.thresholds[j].tolist(),
                         "se": res.se[j].tolist()} for j, it in enumerate(items)]
        out["loglik"] = res.loglik
        out["persons"] = [{"id": p} for p in m.persons]
        return out
    if method == "cml":
        res = cml_fit(Xi)
        b, se_b = res.b, res.se
        out.update(loglik=res.loglik, iterations=res.iterations, identification="sum(b) = 0")
    elif method == "mml":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = mml_fit(Xi, Ki, sigma=sigma, n_nodes=nodes, quadrature=quadrature)
        for w in caught:
            log.warning("%s", w.message)
        out["warnings"] = [str(w.message) for w in caught]
        b, se_b = res.b, res.se_b
        out.update(loglik=res.loglik, sigma=res.sigma, sigma_se=res.se_sigma, identification="mean(theta) = 0",
                   ltm={"difficulty": res.ltm_difficulty.tolist(), "discrimination": res.ltm_discrimination})
    else:
        kp2, ki2, ex2 = drop_extremes(Xi, Ki)
        if ki2.sum() < 2 or kp2.sum() < 2:
            raise LmlabError("JML: fewer than 2 non-extreme persons/items")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = jml_fit(Xi[np.ix_(kp2, ki2)], Ki[np.ix_(kp2, ki2)])
        b = np.full(Xi.shape[1], np.nan)
        se_b = np.full(Xi.shape[1], np.nan)
        b[ki2], se_b[ki2] = res.b, res.se_b
        out.update(b_corrected=dict(zip([items[i] for i in np.flatnonzero(ki2)], res.b_corrected.tolist())),
                   warnings=[str(w.message) for w in caught], identification="sum(b) = 0")
    okb = np.isfinite(b)
    theta_mle, se_mle = person_mle(Xi[:, okb], b[okb], Ki[:, okb])
    theta_wle, se_wle = person_mle(Xi[:, okb], b[okb], Ki[:, okb], wle=True)
    r = np.nansum(Xi, 1)
    rmax = np.where(np.isnan(Xi), 0, Ki).sum(1)
    extreme = (r <= 0) | (r >= rmax)
    persons = []
    for v, name in enumerate(m.persons):
        row = {"id": name, "raw": float(r[v]), "max": float(rmax[v]), "theta_mle": float(theta_mle[v]),
               "se_mle": float(se_mle[v]), "theta_wle": float(theta_wle[v]), "se_wle": float(se_wle[v]),
               "extreme": bool(extreme[v]), "theta": float(theta_wle[v] if extreme[v] else theta_mle[v])}
        if method == "mml":
            row.update(theta_eap=float(res.theta_eap[v]), sd_eap=float(res.theta_eap_sd[v]))
        persons.append(row)
    if binary:
        th_fit = np.where(extreme, np.nan, theta_mle)
        ifit = fit_stats(Xi[:, okb], th_fit, b[okb], axis=0)
        pfit = fit_stats(Xi[:, okb], np.where(extreme, np.nan, theta_mle), b[okb], axis=1)
        lz = person_lz(Xi[:, okb], th_fit, b[okb])
        gstar = guttman_errors(Xi[:, okb], b[okb])
        for v, row in enumerate(persons):
            row.update({k: float(pfit[k][v]) for k in ("infit", "outfit", "infit_t", "outfit_t")},
                       lz=float(lz[v]), guttman=float(gstar[v]))
        if method == "cml" and Xi.shape[0] > 3:
            try:
                out["andersen_lr"] = andersen_lr(Xi)
            except LmlabError as e:
                out["andersen_lr"] = {"error": str(e)}
    else:
        ifit = None
    out["items"] = []
    bi = iter(range(int(okb.sum())))
    for j, it in enumerate(items):
        row = {"id": it, "b": float(b[j]), "se": float(se_b[j]), "p": float(np.nanmean(Xi[:, j] / Ki[:, j]))}
        if okb[j] and ifit is not None:
            k = next(bi)
            row.update({s: float(ifit[s][k]) for s in ("infit", "outfit", "infit_t", "outfit_t")})
            row["misfit"] = bool((row["infit"] > 1.5 or row["infit"] < 0.5) and abs(row["infit_t"]) > 2)
        row.update({k: v for k, v in m.item_meta.get(it, {}).items() if k in ("subject", "type", "difficulty")})
        out["items"].append(row)
    out["persons"] = persons
    th = np.array([p["theta"] for p in persons])
    se_th = np.array([p["se_wle"] if p["extreme"] else p["se_mle"] for p in persons])
    out["reliability"] = {"person_separation": separation_reliability(th, se_th),
                          "item_separation": separation_reliability(b, se_b)}
    return out


def wright_map(path: Path, persons: list[dict[str, Any]], items: list[dict[str, Any]], title: str = "Wright map"
               ) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    th = [(p["id"], p["theta"]) for p in persons if np.isfinite(p.get("theta", np.nan))]
    bs = np.array([i["b"] for i in items if np.isfinite(i["b"])])
    allv = np.concatenate([bs, [t for _, t in th]]) if th else bs
    lo, hi = (float(allv.min()), float(allv.max())) if len(allv) else (-1.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, 25)
    fig, (ax1, ax2) = plt.subplots(1, 2, sharey=True, figsize=(8, 5))
    if th:
        vals = np.array([t for _, t in th])
        ax1.hist(vals, bins=edges, orientation="horizontal", color="tab:blue", alpha=0.6)
        if len(th) <= 25:
            for name, t in th:
                ax1.annotate(str(name)[:22], (0, t), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax1.invert_xaxis()
    ax1.set_xlabel("persons (models)")
    ax1.set_ylabel("logit")
    types = sorted({str(i.get("type", i.get("subject", "item"))) for i in items})
    per_type = [[i["b"] for i in items if str(i.get("type", i.get("subject", "item"))) == t and np.isfinite(i["b"])]
                for t in types]
    ax2.hist(per_type, bins=edges, orientation="horizontal", stacked=True, label=types)
    if len(types) > 1:
        ax2.legend(fontsize=7)
    ax2.set_xlabel("items (difficulty b)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def icc_plot(path: Path, X: np.ndarray, theta: np.ndarray, b: np.ndarray, names: list[str], max_items: int = 6
             ) -> Path:
    """Item characteristic curves with binned empirical proportions and Wilson 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_items, len(b))
    pick = np.argsort(b)[np.linspace(0, len(b) - 1, n).astype(int)]
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), sharey=True, squeeze=False)
    ok = np.isfinite(theta)
    grid = np.linspace(np.nanmin(theta[ok]) - 1, np.nanmax(theta[ok]) + 1, 100) if ok.any() else np.linspace(-3, 3)
    nb = max(2, min(6, int(ok.sum()) // 5 or 2))
    edges = np.quantile(theta[ok], np.linspace(0, 1, nb + 1)) if ok.any() else np.array([-3, 3])
    for ax, j in zip(axes[0], pick):
        ax.plot(grid, sigmoid(grid - b[j]), color="k")
        for e0, e1 in zip(edges[:-1], edges[1:]):
            m = ok & (theta >= e0) & (theta <= e1) & ~np.isnan(X[:, j])
            if m.sum():
                kk, nn = X[m, j].sum(), m.sum()
                lo, hi = wilson(kk, nn)
                c = theta[m].mean()
                ax.errorbar([c], [kk / nn], yerr=[[kk / nn - lo], [hi - kk / nn]], fmt="o", color="tab:red", ms=3)
        ax.set_title(f"{str(names[j])[:16]} b={b[j]:.2f}", fontsize=8)
        ax.set_xlabel("θ")
    axes[0][0].set_ylabel("P(correct)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mcc_plot(path: Path, rows: list[tuple[str, np.ndarray, float, dict[str, Any]]], b: np.ndarray) -> Path:
    """Per-model characteristic curve: score rate vs difficulty (binned, Wilson CIs) with σ(θ̂ - b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = min(4, n)
    nrow = math.ceil(n / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.2 * cols, 2.8 * nrow), squeeze=False, sharey=True)
    grid = np.linspace(np.nanmin(b) - 0.5, np.nanmax(b) + 0.5, 100)
    nb = max(2, min(8, len(b) // 8))
    edges = np.quantile(b, np.linspace(0, 1, nb + 1))
    for ax, (name, y, th, d1) in zip(axes.ravel(), rows):
        ax.plot(grid, sigmoid(th - grid), color="k")
        for e0, e1 in zip(edges[:-1], edges[1:]):
            m = (b >= e0) & (b <= e1) & ~np.isnan(y)
            if m.sum():
                kk, nn = y[m].sum(), m.sum()
                lo, hi = wilson(kk, nn)
                ax.errorbar([b[m].mean()], [kk / nn], yerr=[[max(kk / nn - lo, 0)], [max(hi - kk / nn, 0)]],
                            fmt="o", color="tab:blue", ms=3)
        ax.set_title(f"{str(name)[:20]}\na={d1['a']:.2f} ρ={d1['spearman']:.2f} R²={d1['r2']:.2f}", fontsize=8)
        ax.set_xlabel("difficulty b")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("score rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fit_bubble(path: Path, items: list[dict[str, Any]]) -> Path:
    from lmlab.core.plotting import _new, _save, _style

    rows = [i for i in items if "infit_t" in i and np.isfinite(i["b"])]
    fig, ax = _new()
    if rows:
        ax.scatter([i["b"] for i in rows], [i["infit_t"] for i in rows],
                   s=[20 + 200 * min(i["se"], 2) for i in rows], alpha=0.5)
    ax.axhline(2, ls="--", color="grey")
    ax.axhline(-2, ls="--", color="grey")
    _style(ax, "item infit t vs difficulty (bubble size = SE)", "difficulty b", "infit t")
    return _save(fig, path)


def fit_main(cfg: IrtFitConfig) -> Path:
    from lmlab.core.runs import start_run

    if not cfg.matrix:
        raise ConfigError("give a response matrix (matrix.json / run dir / CSV)")
    m = load_matrix(cfg.matrix)
    # fitting first validates (and raises) before the run dir exists
    res = fit_matrix(m, cfg.method, cfg.sigma, cfg.nodes, cfg.binarize, cfg.quadrature)
    with start_run(cfg, "eval-irt-fit") as run:
        run.save_json("irt.json", {**res, "matrix": str(cfg.matrix)})
        if cfg.plots and cfg.method != "pcm":
            wright_map(run.plots / "wright_map.png", res["persons"], res["items"])
            X, _ = _prepare(m, cfg.binarize)
            idx = [m.items.index(i["id"]) for i in res["items"]]
            b = np.array([i["b"] for i in res["items"]])
            th = np.array([p["theta"] for p in res["persons"]], float)
            if np.all(m.K == 1) or cfg.binarize is not None:
                icc_plot(run.plots / "icc.png", X[:, idx], th, b, [i["id"] for i in res["items"]])
            fit_bubble(run.plots / "infit_bubble.png", res["items"])
        summary = {k: res[k] for k in ("method", "n_persons", "n_items", "dropped", "reliability") if k in res}
        summary["loglik"] = res.get("loglik")
        summary["persons"] = {p["id"]: round(p.get("theta", float("nan")), 4) for p in res["persons"]}
        summary["misfitting_items"] = [i["id"] for i in res["items"] if i.get("misfit")]
        if "andersen_lr" in res:
            summary["andersen_lr"] = res["andersen_lr"]
        run.finish(summary)
    return run.path


@dataclass
class IrtDiagnoseConfig(RunArgs):
    """Detect the paper's discrepancies: D1 difficulty invariance and D2 variance at similar difficulty."""

    matrix: str = ""
    """matrix.json / run dir / CSV (models x items)."""
    difficulty: list[str] = field(default_factory=lambda: ["irt"])
    """Difficulty sources to compare: human | irt | elo | tokens (the first is the primary one)."""
    difficulty_file: str | None = None
    """CSV item_id,difficulty for `human` (else the items' `difficulty` metadata is used)."""
    pairs: str | None = None
    """JSONL of {"harder": id, "easier": id} judgments for `elo` (Bradley-Terry)."""
    binarize: float | None = 1.0
    """Dichotomise at this fraction of K (None keeps binomial counts)."""
    n_boot: int = 200
    """Bootstrap resamples over items for correlation CIs."""
    n_null: int = 200
    """Parametric-bootstrap replications of the Rasch null."""
    bins: int | None = None
    """D2 difficulty bins (default: up to 10 with >= 10 items each)."""
    top_k: int = 10
    """D2: most surprising (model, item) cells to list."""
    calibrate: bool = True
    """Put external difficulty sources on the population's logit scale (common slope) before D1/D2."""

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [d for d in self.difficulty if d not in DIFFICULTY_SOURCES]
        if bad or not self.difficulty:
            raise ConfigError(f"difficulty sources must be among {DIFFICULTY_SOURCES}, got {self.difficulty}")
        if "elo" in self.difficulty and not self.pairs:
            raise ConfigError("difficulty source `elo` needs pairs=FILE.jsonl")


def difficulty_source(name: str, m: Matrix, X: np.ndarray, K: np.ndarray, difficulty_file: str | None = None,
                      pairs: str | None = None) -> np.ndarray:
    """One value per item of ``m`` (NaN where unknown), on a logit-like scale where larger = harder."""
    L = len(m.items)
    if name == "human":
        vals = np.full(L, np.nan)
        if difficulty_file:
            with open(difficulty_file, newline="") as f:
                rd = csv.DictReader(f)
                if not rd.fieldnames or not {"item_id", "difficulty"} <= set(rd.fieldnames):
                    raise LmlabError(f"{difficulty_file}: need columns item_id,difficulty")
                d = {r["item_id"]: float(r["difficulty"]) for r in rd}
            vals = np.array([d.get(i, np.nan) for i in m.items])
        else:
            vals = np.array([float(m.item_meta.get(i, {}).get("difficulty", np.nan) or np.nan) for i in m.items])
        if np.isfinite(vals).sum() < 2:
            raise LmlabError("difficulty source `human`: no item difficulties given (items' `difficulty` field or "
                             "difficulty_file)")
        return vals
    if name == "irt":
        out = np.full(L, np.nan)
        if np.all(K == 1):  # binary: CML b
            kp, ki, _ = drop_extremes(X)
            if ki.sum() < 2 or kp.sum() < 1:
                raise LmlabError("difficulty source `irt`: fewer than 2 non-extreme items (too few models?)")
            out[ki] = cml_fit(X[np.ix_(kp, ki)]).b
        else:  # binomial counts (K samples): MML with the binomial likelihood, 61 nodes
            _, ki, _ = drop_extremes(X, K, persons=False)
            if ki.sum() < 2:
                raise LmlabError("difficulty source `irt`: fewer than 2 non-extreme items")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[ki] = mml_fit(X[:, ki], K[:, ki], n_nodes=61).b
        return out
    if name == "elo":
        if not pairs:
            raise LmlabError("difficulty source `elo` needs a pairs file")
        pp = []
        for ln, line in enumerate(Path(pairs).read_text().splitlines(), 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    pp.append((str(d["harder"]), str(d["easier"])))
                except (ValueError, KeyError) as e:
                    raise LmlabError(f"{pairs}:{ln}: need {{\"harder\": id, \"easier\": id}} ({e})") from None
        bt = bradley_terry(pp, items=m.items)
        return np.array([bt[i] for i in m.items])
    if name == "tokens":
        tok = np.array([float(m.item_meta.get(i, {}).get("mean_reasoning_tokens", np.nan) or np.nan)
                        for i in m.items])
        if np.isfinite(tok).sum() < 2:
            raise LmlabError("difficulty source `tokens`: the matrix has no token counts (build it with eval matrix)")
        return zscore(np.log1p(tok))
    raise LmlabError(f"unknown difficulty source {name!r}")


def calibrate_source(X: np.ndarray, K: np.ndarray, s: np.ndarray, iters: int = 200) -> tuple[float, float, float]:
    """Put an external difficulty ``s`` on the population's logit scale: fit x_vi ~ Bin(K, σ(θ_v - β s_i - c))
    over all non-extreme persons (person intercepts, one common slope β). Returns (β, SE(β), c); the anchored
    difficulty is b = β s + c, so a model's D1 slope a_m = 1 means "as sensitive to this difficulty as the
    population of models", whatever the source's units."""
    ok_i = np.isfinite(s)
    Xs, Ks, ss = X[:, ok_i], K[:, ok_i], s[ok_i]
    ss_c = ss - ss.mean()
    obs = ~np.isnan(Xs)
    x = np.where(obs, Xs, 0.0)
    k = np.where(obs, Ks, 0.0)
    r = x.sum(1)
    keep = (r > 0) & (r < k.sum(1))
    x, k = x[keep], k[keep]
    if keep.sum() == 0:
        return 1.0, float("nan"), 0.0
    th = np.log((x.sum(1) + 0.5) / (k.sum(1) - x.sum(1) + 0.5))
    beta = 0.0
    for _ in range(iters):
        p = sigmoid(th[:, None] - beta * ss_c[None, :])
        W = k * p * (1 - p)
        th = th + (x.sum(1) - (k * p).sum(1)) / np.maximum(W.sum(1), 1e-12)
        p = sigmoid(th[:, None] - beta * ss_c[None, :])
        W = k * p * (1 - p)
        g = -((x - k * p) * ss_c[None, :]).sum()
        h = (W * ss_c[None, :] ** 2).sum()
        step = g / max(h, 1e-12)
        beta += float(np.clip(step, -2, 2))
        if abs(step) < 1e-10:
            break
    p = sigmoid(th[:, None] - beta * ss_c[None, :])
    h = float((k * p * (1 - p) * ss_c[None, :] ** 2).sum())
    return beta, 1 / math.sqrt(h) if h > 0 else float("nan"), -beta * ss.mean()


def diagnose(m: Matrix, sources: dict[str, np.ndarray], binarize: float | None = 1.0, n_boot: int = 200,
             n_null: int = 200, bins: int | None = None, top_k: int = 10, seed: int = 0, calibrate: bool = True
             ) -> dict[str, Any]:
    """D1 per model and D2 per source. External sources (all but ``irt``) are put on the logit scale with
    :func:`calibrate_source` unless ``calibrate`` is False (then they are used as given, as the paper does)."""
    X, K = _prepare(m, binarize)
    out: dict[str, Any] = {"sources": {}, "source_correlations": {}}
    from scipy.stats import spearmanr

    names = list(sources)
    for a in names:
        for c in names:
            if a < c:
                ok = np.isfinite(sources[a]) & np.isfinite(sources[c])
                out["source_correlations"][f"{a}~{c}"] = float(spearmanr(sources[a][ok], sources[c][ok])[0]) \
                    if ok.sum() > 2 else float("nan")
    for name, b in sources.items():
        okb = np.isfinite(b)
        calib = None
        if calibrate and name != "irt":
            beta, se_beta, c = calibrate_source(X, K, b)
            calib = {"beta": beta, "beta_se": se_beta, "offset": c,
                     "population_slope_z": beta / se_beta if se_beta and np.isfinite(se_beta) else float("nan")}
            if beta > 0 and np.isfinite(beta):
                b = beta * b + c
            else:  # the population does not fail more on "harder" items: keep the source's orientation
                calib["note"] = ("population slope <= 0 (this difficulty does not predict the models' failures); "
                                 "using the z-scored source as logits")
                b = zscore(b)
        d1 = {}
        thetas = np.full(len(m.persons), np.nan)
        for v, p in enumerate(m.persons):
            d1[p] = d1_model(X[v, okb], b[okb], K[v, okb], n_boot=n_boot, n_null=n_null, seed=seed + v)
            thetas[v] = d1[p]["theta_wle"]
        # pooled R² as in the paper (score rate over models vs σ(θ̄ - b)); labelled as pooled
        y_items = np.nanmean(X[:, okb] / K[:, okb], 0)
        yhat = np.nanmean(sigmoid(thetas[:, None] - b[None, okb]), 0)
        d2 = d2_bins(X[:, okb], thetas, b[okb], K[:, okb], n_bins=bins, top_k=top_k,
                     names=(m.persons, [i for i, o in zip(m.items, okb) if o]), n_null=n_null, seed=seed)
        out["sources"][name] = {"n_items": int(okb.sum()), "calibration": calib, "b": b.tolist(), "d1": d1,
                                "r2_pooled": r2_paper(y_items, yhat), "d2": d2,
                                "labels": {p: d1[p]["label"] for p in m.persons}}
    return out


def diagnose_main(cfg: IrtDiagnoseConfig) -> Path:
    from lmlab.core.runs import start_run

    if not cfg.matrix:
        raise ConfigError("give a response matrix (matrix.json / run dir / CSV)")
    m = load_matrix(cfg.matrix)
    X, K = _prepare(m, cfg.binarize)
    sources = {s: difficulty_source(s, m, X, K, cfg.difficulty_file, cfg.pairs) for s in cfg.difficulty}
    res = diagnose(m, sources, cfg.binarize, cfg.n_boot, cfg.n_null, cfg.bins, cfg.top_k, cfg.seed,
                   cfg.calibrate)
    with start_run(cfg, "eval-irt-diagnose") as run:
        run.save_json("diagnose.json", res)
        primary = cfg.difficulty[0]
        b = np.asarray(res["sources"][primary]["b"], float)
        okb = np.isfinite(b)
        rows = [(p, X[v, okb] / K[v, okb], res["sources"][primary]["d1"][p]["theta_wle"],
                 res["sources"][primary]["d1"][p]) for v, p in enumerate(m.persons)]
        mcc_plot(run.plots / f"model_curves_{primary}.png", rows, b[okb])
        run.finish({"primary": primary, "source_correlations": res["source_correlations"],
                    **{f"{s}": {"r2_pooled": r["r2_pooled"], "labels": r["labels"],
                                "phi_overall": r["d2"]["phi_overall"],
                                "slopes": {p: round(d["a"], 3) for p, d in r["d1"].items()}}
                       for s, r in res["sources"].items()}})
    return run.path


@dataclass
class IrtReportConfig(RunArgs):
    """Markdown + HTML report from `eval irt fit` / `eval irt diagnose` run directories."""

    runs: list[str] = field(default_factory=list)
    """Run directories (fit and/or diagnose)."""



def report_text(fit: dict[str, Any] | None, diag: dict[str, Any] | None) -> str:
    lines = ["# Rasch / IRT report", ""]
    if fit:
        lines += [f"## Fit ({fit['method']}): {fit['n_persons']} persons x {fit['n_items']} items", ""]
        d = fit.get("dropped", {})
        lines.append(f"Dropped extreme items: {len(d.get('items_all_correct', []))} all-correct, "
                     f"{len(d.get('items_all_wrong', []))} all-wrong.")
        rel = fit.get("reliability", {})
        lines.append(f"Reliability: person separation {rel.get('person_separation', float('nan')):.3f}, "
                     f"item separation {rel.get('item_separation', float('nan')):.3f}.")
        if "andersen_lr" in fit and "lr" in fit["andersen_lr"]:
            a = fit["andersen_lr"]
            lines.append(f"Andersen LR (median split): {a['lr']:.2f} on {a['df']} df, p = {a['p']:.3g}.")
        lines += ["", "| person | raw/max | theta | SE | infit | outfit | l_z |", "|---|---|---|---|---|---|---|"]
        for p in fit["persons"]:
            se = p.get("se_wle") if p.get("extreme") else p.get("se_mle")
            lines.append(f"| {p['id']} | {p.get('raw', 0):g}/{p.get('max', 0):g} | {p.get('theta', float('nan')):.3f}"
                         f"{' (WLE)' if p.get('extreme') else ''} | {se or float('nan'):.3f} | "
                         f"{p.get('infit', float('nan')):.3f} | {p.get('outfit', float('nan')):.3f} | "
                         f"{p.get('lz', float('nan')):.2f} |")
        mis = [i["id"] for i in fit["items"] if i.get("misfit")]
        lines += ["", f"Misfitting items (MNSQ outside 0.5-1.5 and |t| > 2): {len(mis)} {mis[:20]}", ""]
    if diag:
        for s, r in diag["sources"].items():
            cal = r.get("calibration")
            lines += [f"## Detectors with difficulty source `{s}` ({r['n_items']} items)", "",
                      (f"Population slope on `{s}`: {cal['beta']:.3f} (SE {cal['beta_se']:.3f}); "
                       + (cal["note"] if "note" in cal else f"calibrated b = {cal['beta']:.3f} x {s} + "
                          f"{cal['offset']:.3f}, so a = 1 means as difficulty-sensitive as the population.")
                       if cal else "Used as given (logit scale)."), "",
                      f"Pooled R² (paper's metric, pooled over models): {r['r2_pooled']:.3f}", "",
                      "| model | label | slope a [95% CI] | p(a=1) | p(a=0) | Spearman ρ [95% CI] | R² | null ρ 95% |",
                      "|---|---|---|---|---|---|---|---|"]
            for p, d in r["d1"].items():
                nq = d["null_2.5_50_97.5"]["spearman"]
                lines.append(f"| {p} | {d['label']} | {d['a']:.2f} [{d['a_lo']:.2f}, {d['a_hi']:.2f}] | "
                             f"{d['p_a1']:.3g} | {d['p_a0']:.3g} | {d['spearman']:.2f} [{d['spearman_ci'][0]:.2f}, "
                             f"{d['spearman_ci'][1]:.2f}] | {d['r2']:.2f} | [{nq[0]:.2f}, {nq[2]:.2f}] |")
            lines += ["", "D2 over-dispersion by difficulty bin (φ ≈ 1 under Rasch):", "",
                      "| bin | items | φ | null φ 95% | χ² p |", "|---|---|---|---|---|"]
            for bb in r["d2"]["bins"]:
                lines.append(f"| [{bb['lo']:.2f}, {bb['hi']:.2f}) | {bb['n_items']} | {bb['phi']:.2f} | "
                             f"{bb['null_phi_95']:.2f} | {bb['p']:.3g} |")
            cells = r["d2"].get("top_cells", [])[:5]
            if cells:
                lines += ["", "Most surprising cells: " + "; ".join(
                    f"{c['person']} on {c['item']} (x={c['x']:g}, p={c['p']:.2f}, z={c['z']:+.1f})" for c in cells)]
            lines.append("")
        if diag.get("source_correlations"):
            lines += ["Difficulty source correlations (Spearman): " + ", ".join(
                f"{k} {v:.2f}" for k, v in diag["source_correlations"].items()), ""]
    return "\n".join(lines)


def report_main(cfg: IrtReportConfig) -> Path:
    from lmlab.core.report import write_report
    from lmlab.core.runs import atomic_write, read_json, start_run

    if not cfg.runs:
        raise ConfigError("give at least one fit or diagnose run directory")
    fit = diag = None
    dirs = []
    for r in cfg.runs:
        p = Path(r)
        if (p / "irt.json").is_file():
            fit = read_json(p / "irt.json")
        elif (p / "diagnose.json").is_file():
            diag = read_json(p / "diagnose.json")
        else:
            raise LmlabError(f"{p}: not an `eval irt fit` or `eval irt diagnose` run (no irt.json/diagnose.json)")
        dirs.append(p)
    with start_run(cfg, "eval-irt-report") as run:
        text = report_text(fit, diag)
        atomic_write(run.path / "report.md", text)
        write_report(dirs, run.path / "report.html", title="Rasch / IRT report")
        run.finish({"report_md": "report.md", "runs": [str(d) for d in dirs]})
    return run.path
