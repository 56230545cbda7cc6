"""Data mixing laws: fit, nest with scaling laws, predict and optimise domain mixtures.

Paper: **Data Mixing Laws: Optimizing Data Mixtures by Predicting Language Modeling Performance**
(Ye, Liu, Sun, Zhan, Zhou, Qiu; arXiv 2403.16952, ICLR 2025).

The law (per validation domain i, training proportions r on the simplex, Σ_j r_j = 1)::

    L_i(r) = c_i + k_i · exp(Σ_j t_ij r_j)                         (paper eq. 2; 1 domain: c + k exp(t r))

Because Σ_j r_j = 1, ``k_i`` is not identifiable apart from ``t_i`` (``k e^{t·r} = e^{(t + ln k)·r}``), so we fit
the reparametrisation ``L_i(r) = c_i + exp(a_i · r)`` with ``a_i = t_i + ln k_i`` and report both forms (the
``(k, t)`` form pinned by ``k_i = exp(mean_j a_ij)``, i.e. ``t_i`` centred). Signs: ``t_ij < 0`` - training on j
helps validation domain i.

Aggregation over validation domains:

* explicit: ``L(r) = Σ_i s_i L_i(r)`` with known weights ``s`` (the validation set's composition);
* implicit: ``L(r) = Σ_m s_m L_m(r)`` over M implicit domains with unknown ``s ≥ 0, Σ s = 1`` fitted jointly.
  With only the total loss observed, ``s_m`` and ``k_m`` are confounded (the same argument as above), so the
  paper's form reduces to ``L = c + Σ_m s_m exp(a_m · r)`` (its ``MixtureMLP``); ``s`` is recoverable when the
  per-domain losses ``L_m`` are observed too, which :func:`fit_implicit` uses when given them.

Scaling laws for the nested pipeline (paper Alg. 1)::

    L(S) = E + B / S^β       (training steps)          L(N) = E + A / N^α       (non-embedding parameters)

Fitting (exact and fast; paper: L-BFGS from 6,000 random starts with a Huber loss): **variable projection**.
For a fixed ``c``, ``ln(y - c) = R a`` is linear least squares, so the mixing law is a 1-D search over
``c ∈ [0, min y)`` followed by a polish of all parameters with ``scipy.optimize.least_squares(loss="soft_l1")``.
The power laws are linear in ``(E, B)`` for a fixed exponent, so they are a 1-D search over ``β`` + polish.
A ``c`` (or ``E``) that ends on its bound is flagged (``at_bound``): the law is then extrapolating a floor it
never saw. Known failure modes are guarded: a validation domain whose own training proportion is 0 jumps off the
law (``own_min``: fit/predict only where ``r_own > 0``; or ``zero_indicator``: model the jump as
``c + exp(a·r + d·1[r_own = 0])``), predictions outside the range of the fitted mixtures
are flagged (per-coordinate box and the exact convex-hull LP) and can be ridge-shrunk (``ridge`` on the centred
``a``) and clipped to the fitted loss range widened by ``clip_margin``.

Optimisation: minimise ``Σ_i w_i L_i(r)`` (or an implicit law) over the simplex with availability caps
``r_j ≤ tokens_j · max_epochs / target_tokens``. A positive combination of exponentials of affine functions is
convex, so the local solution of SLSQP is the global one.

Continual pretraining: with proportion ``p`` of original data and ``1 - p`` of the new domain, the original
domain's loss follows ``c + exp(a_new + (a_orig - a_new) p)``; the critical proportion is the smallest ``p`` that
keeps it below ``L_before + tol``.

Defaults from the paper and its repository: Huber δ = 0.02 for the laws (here soft-L1 ``f_scale = 0.02``);
nested pipeline: step law fitted on early checkpoints of runs scheduled for the target length, size law over
the proxy sizes, mixing law on the extrapolated losses; mixtures sampled on the simplex (Dirichlet, or the
paper's double-diminishing grid). As in the repository's pipeline the step-law exponent is shared by the validation
domains of a run (``--tie_alpha valid``) and the size-law exponent by all mixtures and domains (``--tie_alpha
all``). Tiny proxies are noisy (seed-to-seed SD 0.05-0.12 nats on the built-in domains), so ``proxy.seeds``
averages replicate runs before any law is fitted.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

_TINY = 1e-12


class FitWarning(UserWarning):
    """A law was fitted or used outside its safe range (bound-hitting parameter, extrapolation)."""


# ====================================================================================================
# the laws (pure functions)


def mix_law(r: np.ndarray, c: float, a: np.ndarray) -> np.ndarray:
    """``c + exp(r @ a)``: r (n, M) proportions, a (M,) -> (n,) losses (inf where an extrapolation overflows)."""
    with np.errstate(over="ignore"):
        return c + np.exp(np.asarray(r, float) @ np.asarray(a, float))


def mix_law_kt(r: np.ndarray, c: float, k: float, t: np.ndarray) -> np.ndarray:
    """The paper's form ``c + k · exp(r @ t)``: r (n, M), t (M,) -> (n,)."""
    return c + k * np.exp(np.asarray(r, float) @ np.asarray(t, float))


def to_kt(a: np.ndarray) -> tuple[float, np.ndarray]:
    """``a = t + ln k`` -> ``(k, t)`` with ``t`` centred (Σ t = 0); ``k exp(t·r) = exp(a·r)`` on the simplex."""
    a = np.asarray(a, float)
    m = float(a.mean())
    with np.errstate(over="ignore"):
        return float(np.exp(m)), a - m


def implicit_law(r: np.ndarray, c: float, s: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``c + Σ_m s_m exp(A_m · r)``: r (n, M), s (K,), A (K, M) -> (n,)."""
    return c + np.exp(np.asarray(r, float) @ np.asarray(A, float).T) @ np.asarray(s, float)


def power_law(x: np.ndarray, E: float, B: float, beta: float) -> np.ndarray:
    """``E + B · x^-β`` (step law with x = steps S, size law with x = parameters N)."""
    return E + B * np.asarray(x, float) ** (-beta)


# ====================================================================================================
# fitting


@dataclass
class MixFit:
    """One fitted mixing law ``c + exp(a·r)`` (= ``c + k exp(t·r)``)."""

    c: float
    a: list[float]
    k: float
    t: list[float]
    rmse: float
    n: int
    at_bound: bool
    own: int | None = None
    """Index of the validation domain's own training domain (for the zero guard), if known."""
    own_min: float = 0.0
    """Runs with ``r[own] <= own_min`` were excluded from the fit (the law does not hold there)."""
    zero_jump: float | None = None
    """Zero-indicator variant: ``L = c + exp(a·r + d·1[r_own = 0])``, ``d`` here (None: plain law)."""
    r_lo: list[float] = field(default_factory=list)
    """Per-coordinate min of the fitted mixtures (range guard)."""
    r_hi: list[float] = field(default_factory=list)
    y_lo: float = 0.0
    y_hi: float = 0.0
    kind: str = "exp"

    def predict(self, r: np.ndarray) -> np.ndarray:
        r = np.atleast_2d(np.asarray(r, float))
        if self.zero_jump is not None and self.own is not None:
            return mix_law(_with_zero(r, self.own), self.c, np.append(self.a, self.zero_jump))
        return mix_law(r, self.c, np.asarray(self.a))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _with_zero(R: np.ndarray, own: int) -> np.ndarray:
    """Append the zero indicator ``1[r_own = 0]`` as an extra column: (n, M) -> (n, M + 1)."""
    return np.concatenate([R, (R[:, own] <= 0).astype(float)[:, None]], 1)


def _check_runs(R: np.ndarray, y: np.ndarray, n_params: int, what: str) -> None:
    if R.ndim != 2 or y.ndim != 1 or len(R) != len(y):
        raise LmlabError(f"{what}: proportions {R.shape} and losses {y.shape} do not match")
    if len(y) < n_params:
        raise LmlabError(f"{what}: {len(y)} runs but the law has {n_params} parameters; need at least "
                         f"{n_params} runs (minimum {n_params}), or fewer domains")
    if not np.all(np.isfinite(y)) or not np.all(np.isfinite(R)):
        raise LmlabError(f"{what}: losses/proportions contain NaN or inf")


def _lin_a(R: np.ndarray, z: np.ndarray, ridge: float) -> np.ndarray:
    """Least squares ``R a ≈ z`` (R (n, M)) with an optional ridge on the centred ``a`` (identifiable part)."""
    M = R.shape[1]
    if ridge > 0:
        P = np.eye(M) - 1.0 / M
        return np.linalg.solve(R.T @ R + ridge * P + _TINY * np.eye(M), R.T @ z)
    return np.linalg.lstsq(R, z, rcond=None)[0]


def fit_mix_law(R: np.ndarray, y: np.ndarray, *, ridge: float = 0.0, f_scale: float = 0.02,
                loss: str = "soft_l1", own: int | None = None, own_min: float | None = None,
                zero_indicator: bool = False, grid: int = 200) -> MixFit:
    """Fit ``y ≈ c + exp(R a)`` by variable projection + robust polish.

    R (n, M) training proportions (rows on the simplex), y (n,) losses of one validation domain.
    ``own``: column of this validation domain's own training data; with ``own_min`` set, runs with
    ``R[:, own] <= own_min`` are dropped (the zero-proportion jump the smooth law cannot follow); with
    ``zero_indicator`` the jump is modelled instead: ``1[r_own = 0]`` joins the exponent with its own coefficient.
    """
    from scipy.optimize import least_squares, minimize_scalar

    R, y = np.asarray(R, float), np.asarray(y, float)
    if own is not None and own_min is not None:
        keep = R[:, own] > own_min
        R, y = R[keep], y[keep]
    if zero_indicator and own is not None:
        f = fit_mix_law(_with_zero(R, own), y, ridge=ridge, f_scale=f_scale, loss=loss, grid=grid)
        f.own, f.zero_jump = own, f.a[-1]
        f.a, f.r_lo, f.r_hi = f.a[:-1], f.r_lo[:-1], f.r_hi[:-1]
        f.k, t = to_kt(np.array(f.a))
        f.t = t.tolist()
        return f
    M = R.shape[1]
    _check_runs(R, y, M + 1, "mixing law")
    ymin = float(y.min())
    if ymin <= 0:
        raise LmlabError("mixing law: losses must be positive")

    def ls_y(c: float) -> tuple[float, np.ndarray]:
        a = _lin_a(R, np.log(np.maximum(y - c, _TINY)), ridge)
        res = c + np.exp(np.clip(R @ a, -50, 50)) - y
        return float(res @ res + ridge * np.sum((a - a.mean()) ** 2)), a

    # 1-D profile over c in [0, min y): dense near min y where the optimum often sits
    q = np.concatenate([[1.0], np.logspace(0, -6, grid)])
    cs = ymin * (1 - q)
    vals = [ls_y(c)[0] for c in cs]
    i = int(np.argmin(vals))
    lo, hi = cs[max(0, i - 1)], cs[min(len(cs) - 1, i + 1)]
    if hi > lo:
        c0 = float(minimize_scalar(lambda c: ls_y(c)[0], bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-12 * max(1.0, ymin)}).x)
        if ls_y(c0)[0] > vals[i]:
            c0 = float(cs[i])
    else:
        c0 = float(cs[i])
    a0 = ls_y(c0)[1]
    c_hi = ymin * (1 - 1e-9)

    def resid(p: np.ndarray) -> np.ndarray:
        c, a = p[0], p[1:]
        r = c + np.exp(np.clip(R @ a, -50, 50)) - y
        if ridge > 0:
            r = np.concatenate([r, math.sqrt(ridge) * (a - a.mean())])
        return r

    p0 = np.concatenate([[min(max(c0, 0.0), c_hi)], a0])
    best = p0
    if len(y) > M + 1:  # robust polish (with exactly M+1 points the profile solution is already exact)
        try:
            sol = least_squares(resid, p0, loss=loss, f_scale=f_scale, method="trf",
                                bounds=([0.0] + [-np.inf] * M, [c_hi] + [np.inf] * M), x_scale="jac",
                                xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
            best = sol.x
        except ValueError as e:  # pragma: no cover - defensive
            log.debug("polish failed: %s", e)
    c, a = float(best[0]), np.asarray(best[1:])
    fitted = c + np.exp(R @ a)
    rmse = float(np.sqrt(np.mean((fitted - y) ** 2)))
    span = max(float(y.max() - ymin), 1e-9)
    at_bound = bool(c < 1e-6 * max(1.0, ymin) or c > ymin - 1e-4 * span)
    k, t = to_kt(a)
    return MixFit(c=c, a=a.tolist(), k=k, t=t.tolist(), rmse=rmse, n=len(y), at_bound=at_bound, own=own,
                  own_min=own_min if own_min is not None else -1.0,
                  r_lo=R.min(0).tolist(), r_hi=R.max(0).tolist(), y_lo=ymin, y_hi=float(y.max()))


@dataclass
class PowerFit:
    """A fitted ``E + B x^-β`` (steps or parameters)."""

    E: float
    B: float
    beta: float
    rmse: float
    n: int
    at_bound: bool

    def predict(self, x: Any) -> np.ndarray:
        return power_law(np.asarray(x, float), self.E, self.B, self.beta)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _profile_argmin(sse: Callable[[float], float], beta_range: tuple[float, float], n_grid: int) -> float:
    """Exponent minimising a profiled SSE: a log-spaced grid over ``beta_range``, then a bounded 1-D refinement
    between the best grid point's neighbours (kept only if it improves on the grid)."""
    from scipy.optimize import minimize_scalar

    bl, bh = beta_range
    grid = np.exp(np.linspace(math.log(bl), math.log(bh), n_grid))
    vals = [sse(b) for b in grid]
    i = int(np.argmin(vals))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    b0 = float(minimize_scalar(sse, bounds=(lo, hi), method="bounded").x)
    return b0 if sse(b0) <= vals[i] else float(grid[i])


def fit_power_law(x: np.ndarray, y: np.ndarray, *, beta_range: tuple[float, float] = (0.01, 3.0),
                  f_scale: float = 0.02, loss: str = "soft_l1", what: str = "power law") -> PowerFit:
    """Fit ``y ≈ E + B x^-β`` with E, B ≥ 0: profile over β (linear in E, B), then robust polish."""
    from scipy.optimize import least_squares, nnls

    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 1 or x.shape != y.shape:
        raise LmlabError(f"{what}: x {x.shape} and y {y.shape} do not match")
    if len(np.unique(x)) < 3:
        raise LmlabError(f"{what}: {len(np.unique(x))} distinct points but the law has 3 parameters "
                         "(E, B, exponent); need at least 3")
    if np.any(x <= 0):
        raise LmlabError(f"{what}: x must be positive")
    xs = x / x.max()  # scale for conditioning; B is rescaled back below

    def prof(beta: float) -> tuple[float, np.ndarray]:
        X = np.stack([np.ones_like(xs), xs ** (-beta)], 1)
        coef, rn = nnls(X, y)
        return float(rn ** 2), coef

    bl, bh = beta_range
    b0 = _profile_argmin(lambda b: prof(b)[0], beta_range, 48)
    (E0, B0) = prof(b0)[1]

    def resid(p: np.ndarray) -> np.ndarray:
        return p[0] + p[1] * xs ** (-p[2]) - y

    p0 = np.array([E0, max(B0, 1e-12), b0])
    lb, ub = [0.0, 0.0, bl], [np.inf, np.inf, bh]
    p0 = np.clip(p0, np.array(lb) + 1e-15, np.array(ub) - 1e-12)
    best = p0
    if len(y) > 3:
        sol = least_squares(resid, p0, loss=loss, f_scale=f_scale, bounds=(lb, ub), method="trf",
                            xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
        best = sol.x
    E, Bs, beta = (float(v) for v in best)
    B = Bs * x.max() ** beta
    rmse = float(np.sqrt(np.mean((power_law(x, E, B, beta) - y) ** 2)))
    at_bound = bool(E < 1e-6 or beta <= bl * 1.001 or beta >= bh * 0.999)
    return PowerFit(E=E, B=B, beta=beta, rmse=rmse, n=len(y), at_bound=at_bound)


def fit_power_laws_tied(xs: list[np.ndarray], ys: list[np.ndarray], *, beta_range: tuple[float, float] = (0.01, 3.0),
                        f_scale: float = 0.02, loss: str = "soft_l1", what: str = "power law") -> list[PowerFit]:
    """Fit ``y_g ≈ E_g + B_g x_g^-β`` for G curves with **one shared exponent β** (the paper's repository ties
    the exponent: ``steplaw.py --tie_alpha valid`` across validation domains of a run, ``sizelaw.py --tie_alpha
    all`` across mixtures and domains). For a fixed β every curve is a non-negative linear fit in (E_g, B_g),
    so this is a 1-D profile over β, then a robust polish of all 2G + 1 parameters. xs, ys: G arrays (n_g,)."""
    from scipy.optimize import least_squares, nnls

    xs = [np.asarray(x, float) for x in xs]
    ys = [np.asarray(y, float) for y in ys]
    if not xs or len(xs) != len(ys) or any(x.shape != y.shape or x.ndim != 1 for x, y in zip(xs, ys)):
        raise LmlabError(f"{what}: give matching 1-D x and y arrays per curve")
    G = len(xs)
    n = sum(len(np.unique(x)) for x in xs)
    if any(len(np.unique(x)) < 2 for x in xs) or n < 2 * G + 1:
        raise LmlabError(f"{what}: {n} distinct points over {G} curves but the tied law has {2 * G + 1} "
                         f"parameters; need at least {2 * G + 1} (>= 2 per curve)")
    if any(np.any(x <= 0) for x in xs):
        raise LmlabError(f"{what}: x must be positive")
    scale = max(float(x.max()) for x in xs)
    xs_s = [x / scale for x in xs]

    def prof(beta: float) -> tuple[float, list[np.ndarray]]:
        tot, coefs = 0.0, []
        for x, y in zip(xs_s, ys):
            coef, rn = nnls(np.stack([np.ones_like(x), x ** (-beta)], 1), y)
            tot += rn ** 2
            coefs.append(coef)
        return float(tot), coefs

    bl, bh = beta_range
    b0 = _profile_argmin(lambda b: prof(b)[0], beta_range, 64)
    coefs = prof(b0)[1]
    p0 = np.concatenate([np.concatenate([[c[0], max(c[1], 1e-12)] for c in coefs]), [b0]])
    lb = np.array([0.0] * (2 * G) + [bl])
    ub = np.array([np.inf] * (2 * G) + [bh])
    p0 = np.clip(p0, lb + 1e-15, ub - 1e-12)

    def resid(q: np.ndarray) -> np.ndarray:
        return np.concatenate([q[2 * g] + q[2 * g + 1] * x ** (-q[-1]) - y for g, (x, y) in enumerate(zip(xs_s, ys))])

    best = p0
    if n > 2 * G + 1:
        best = least_squares(resid, p0, loss=loss, f_scale=f_scale, bounds=(lb, ub), method="trf",
                             xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=4000).x
    beta = float(best[-1])
    out = []
    for g, (x, y) in enumerate(zip(xs, ys)):
        E, B = float(best[2 * g]), float(best[2 * g + 1]) * scale ** beta
        rmse = float(np.sqrt(np.mean((power_law(x, E, B, beta) - y) ** 2)))
        out.append(PowerFit(E=E, B=B, beta=beta, rmse=rmse, n=len(y),
                            at_bound=bool(E < 1e-6 or beta <= bl * 1.001 or beta >= bh * 0.999)))
    return out


@dataclass
class ImplicitFit:
    """``L(r) = c + Σ_m s_m exp(A_m · r)`` with ``s`` on the simplex (implicit domain aggregation)."""

    c: float
    s: list[float]
    A: list[list[float]]
    rmse: float
    n: int
    at_bound: bool
    domain_c: list[float] | None = None
    """Per-domain floors ``c_m`` when per-domain losses were given (then ``c = Σ s_m c_m``)."""
    r_lo: list[float] = field(default_factory=list)
    r_hi: list[float] = field(default_factory=list)
    y_lo: float = 0.0
    y_hi: float = 0.0
    kind: str = "implicit"

    def predict(self, r: np.ndarray) -> np.ndarray:
        return implicit_law(np.atleast_2d(r), self.c, np.asarray(self.s), np.asarray(self.A))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def fit_implicit(R: np.ndarray, y: np.ndarray, K: int = 3, *, Y: np.ndarray | None = None,
                 f_scale: float = 0.02, loss: str = "soft_l1", restarts: int = 6, seed: int = 0) -> ImplicitFit:
    """Implicit aggregation: fit ``L(r) = Σ_m s_m L_m(r)`` with unknown ``s ≥ 0, Σ s = 1``, jointly.

    R (n, M) proportions, y (n,) total loss. Without ``Y``: K implicit domains, ``L = c + Σ s_m exp(A_m r)``
    (the paper's MixtureMLP; ``s`` only identifiable up to the ``ln k`` shift). With ``Y`` (n, K) the measured
    losses of the K component domains: the per-domain laws ``c_m + exp(A_m r)`` and ``s`` are fitted jointly to
    ``[Y, y]`` and ``s`` is identifiable (recovered).
    """
    from scipy.optimize import least_squares

    R, y = np.asarray(R, float), np.asarray(y, float)
    n, M = R.shape
    if Y is not None:
        Y = np.asarray(Y, float)
        if Y.ndim != 2 or len(Y) != n:
            raise LmlabError(f"implicit law: per-domain losses {Y.shape} do not match {n} runs")
        K = Y.shape[1]
        _check_runs(R, y, M + 1, "implicit law")
    else:
        _check_runs(R, y, 1 + (K - 1) + K * M, "implicit law")
    rng = np.random.default_rng(seed)
    base = fit_mix_law(R, y)

    if Y is not None:
        comps = [fit_mix_law(R, Y[:, m]) for m in range(K)]
        cm0 = np.array([f.c for f in comps])
        A0 = np.array([f.a for f in comps])

        def unpack(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return p[:K], _softmax(np.concatenate([[0.0], p[K: 2 * K - 1]])), p[2 * K - 1:].reshape(K, M)

        def resid(p: np.ndarray) -> np.ndarray:
            cm, s, A = unpack(p)
            Lm = cm + np.exp(np.clip(R @ A.T, -50, 50))  # (n, K)
            return np.concatenate([(Lm - Y).ravel(), Lm @ s - y])

        best = None
        for trial in range(restarts):
            s_init = rng.normal(0, 1, K - 1) if trial else np.zeros(K - 1)
            p0 = np.concatenate([cm0, s_init, A0.ravel()])
            sol = least_squares(resid, p0, loss=loss, f_scale=f_scale, method="trf", max_nfev=3000)
            if best is None or sol.cost < best.cost:
                best = sol
        cm, s, A = unpack(best.x)
        c = float(cm @ s)
        fitted = implicit_law(R, c, s, A)
        rmse = float(np.sqrt(np.mean((fitted - y) ** 2)))
        return ImplicitFit(c=c, s=s.tolist(), A=A.tolist(), rmse=rmse, n=n, at_bound=any(f.at_bound for f in comps),
                           domain_c=cm.tolist(), r_lo=R.min(0).tolist(), r_hi=R.max(0).tolist(),
                           y_lo=float(y.min()), y_hi=float(y.max()))

    ymin = float(y.min())

    def unpack2(p: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        return p[0], _softmax(np.concatenate([[0.0], p[1:K]])), p[K:].reshape(K, M)

    def resid2(p: np.ndarray) -> np.ndarray:
        c, s, A = unpack2(p)
        return c + np.exp(np.clip(R @ A.T, -50, 50)) @ s - y

    best = None
    for trial in range(restarts):
        A0 = np.array(base.a)[None, :] + rng.normal(0, 0.5 if trial else 0.1, (K, M))
        A0 += math.log(K)  # s = 1/K at init: keep Σ s exp(A r) ≈ exp(a r)
        p0 = np.concatenate([[min(base.c, ymin * (1 - 1e-6))], rng.normal(0, 0.1, K - 1), A0.ravel()])
        lb = np.full(len(p0), -np.inf)
        ub = np.full(len(p0), np.inf)
        lb[0], ub[0] = 0.0, ymin * (1 - 1e-9)
        sol = least_squares(resid2, p0, loss=loss, f_scale=f_scale, bounds=(lb, ub), method="trf", max_nfev=3000)
        if best is None or sol.cost < best.cost:
            best = sol
    c, s, A = unpack2(best.x)
    fitted = implicit_law(R, c, s, A)
    rmse = float(np.sqrt(np.mean((fitted - y) ** 2)))
    span = max(float(y.max() - ymin), 1e-9)
    return ImplicitFit(c=float(c), s=s.tolist(), A=A.tolist(), rmse=rmse, n=n,
                       at_bound=bool(c < 1e-6 or c > ymin - 1e-4 * span), r_lo=R.min(0).tolist(),
                       r_hi=R.max(0).tolist(), y_lo=ymin, y_hi=float(y.max()))


# ====================================================================================================
# guards and uncertainty


def in_hull(points: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """Whether each row of ``points`` (q, M) is a convex combination of rows of ``hull`` (n, M) (exact LP)."""
    from scipy.optimize import linprog

    points, hull = np.atleast_2d(points), np.asarray(hull, float)
    n = len(hull)
    A_eq = np.vstack([hull.T, np.ones((1, n))])
    out = []
    for p in points:
        res = linprog(np.zeros(n), A_eq=A_eq, b_eq=np.concatenate([p, [1.0]]), bounds=(0, None), method="highs")
        out.append(res.status == 0)
    return np.array(out, bool)


def guarded_predict(fit: MixFit | ImplicitFit, r: np.ndarray, clip_margin: float | None = 0.5,
                    tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Prediction with the range guard: returns ``(pred, out_of_range)``.

    ``out_of_range`` marks mixtures outside the per-coordinate range of the fitted mixtures (or, for a
    :class:`MixFit` with an ``own`` column, at the excluded zero-own-proportion region). With ``clip_margin``
    the prediction is clipped to the fitted loss range widened by ``clip_margin × range`` on each side
    (an exponential extrapolating far outside its data is not evidence).
    """
    r = np.atleast_2d(np.asarray(r, float))
    pred = fit.predict(r)
    lo, hi = np.asarray(fit.r_lo), np.asarray(fit.r_hi)
    oor = np.any((r < lo - tol) | (r > hi + tol), axis=1)
    if isinstance(fit, MixFit) and fit.own is not None and fit.own_min >= 0:
        oor |= r[:, fit.own] <= fit.own_min
    if clip_margin is not None:
        span = fit.y_hi - fit.y_lo
        pred = np.clip(pred, fit.y_lo - clip_margin * span, fit.y_hi + clip_margin * span)
    return pred, oor


def bootstrap_fits(R: np.ndarray, y: np.ndarray, n_boot: int = 100, seed: int = 0, R_pred: np.ndarray | None = None,
                   **kw: Any) -> dict[str, Any]:
    """Bootstrap over runs: 95% intervals of ``c``, ``a`` and (given ``R_pred``) of the predictions."""
    rng = np.random.default_rng(seed)
    R, y = np.asarray(R, float), np.asarray(y, float)
    cs, As, preds = [], [], []
    M = R.shape[1]
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(idx)) < M + 1:
            continue
        try:
            f = fit_mix_law(R[idx], y[idx], **kw)
        except (LmlabError, np.linalg.LinAlgError, ValueError):
            continue
        cs.append(f.c)
        As.append(f.a)
        if R_pred is not None:
            preds.append(f.predict(R_pred))
    if not cs:
        return {}
    out = {"n": len(cs), "c_ci": np.percentile(cs, [2.5, 97.5]).tolist(),
           "a_ci": np.percentile(np.array(As), [2.5, 97.5], axis=0).tolist()}
    if preds:
        P = np.array(preds)
        out["pred_lo"], out["pred_hi"] = np.percentile(P, 2.5, 0).tolist(), np.percentile(P, 97.5, 0).tolist()
        out["pred_std"] = P.std(0).tolist()
    return out


def mae(pred: Any, true: Any) -> float:
    return float(np.mean(np.abs(np.asarray(pred, float) - np.asarray(true, float))))


def spearman(pred: Any, true: Any) -> float:
    from scipy.stats import spearmanr

    p, t = np.asarray(pred, float), np.asarray(true, float)
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return float("nan")
    return float(spearmanr(p, t).statistic)


# ====================================================================================================
# optimisation on the simplex (convex)


def availability_caps(tokens: dict[str, float] | list[float], target_tokens: float, max_epochs: float = 1.0
                      ) -> np.ndarray:
    """``r_j ≤ tokens_j · max_epochs / target_tokens`` (capped at 1)."""
    t = np.asarray(list(tokens.values()) if isinstance(tokens, dict) else tokens, float)
    if target_tokens <= 0:
        raise LmlabError("target_tokens must be > 0")
    return np.minimum(1.0, t * max_epochs / target_tokens)


def optimize_mixture(fits: list[MixFit | ImplicitFit], weights: np.ndarray | None = None, *,
                     caps: np.ndarray | None = None, starts: np.ndarray | None = None,
                     kl: float = 0.0, prior: np.ndarray | None = None, lower: float | np.ndarray = 0.0
                     ) -> tuple[np.ndarray, float]:
    """Minimise ``Σ_i w_i L_i(r) [+ kl · KL(r ‖ prior)]`` over the simplex (with ``lower ≤ r ≤ caps``).

    Each ``L_i`` is ``c + Σ positive · exp(affine)`` so the objective is convex: SLSQP's solution is global.
    Returns ``(r*, objective)``.
    """
    from scipy.optimize import minimize

    M = len(fits[0].r_lo) if fits[0].r_lo else len(np.atleast_1d(fits[0].a if isinstance(fits[0], MixFit)
                                                                     else fits[0].A[0]))
    w = np.ones(len(fits)) / len(fits) if weights is None else np.asarray(weights, float)
    if len(w) != len(fits) or np.any(w < 0):
        raise LmlabError(f"need {len(fits)} non-negative weights, got {list(w)}")
    ub = np.ones(M) if caps is None else np.minimum(1.0, np.asarray(caps, float))
    if ub.sum() < 1 - 1e-9:
        raise LmlabError(f"availability caps sum to {ub.sum():.3f} < 1: not enough data for the target tokens")
    lb = np.minimum(np.broadcast_to(np.asarray(lower, float), (M,)), ub)
    if lb.sum() > 1 + 1e-9:
        raise LmlabError(f"lower bounds sum to {lb.sum():.3f} > 1")
    terms = []  # (weight, c, s (K,), A (K, M))
    for wi, f in zip(w, fits):
        if isinstance(f, MixFit):
            terms.append((wi, f.c, np.ones(1), np.asarray(f.a)[None, :]))
        else:
            terms.append((wi, f.c, np.asarray(f.s), np.asarray(f.A)))
    pr = np.ones(M) / M if prior is None else np.asarray(prior, float) / np.sum(prior)

    def obj(r: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = 0.0, np.zeros(M)
        for wi, c, s, A in terms:
            e = s * np.exp(A @ r)  # (K,)
            v += wi * (c + e.sum())
            g += wi * (e @ A)
        if kl > 0:
            rr = np.maximum(r, 1e-12)
            v += kl * float(np.sum(rr * np.log(rr / pr)))
            g += kl * (np.log(rr / pr) + 1)
        return v, g

    cands = [np.minimum(ub, 1.0 / M) / np.minimum(ub, 1.0 / M).sum()]
    if starts is not None:
        cands += [np.asarray(s, float) for s in np.atleast_2d(starts)]
    best_r, best_v = None, np.inf
    for x0 in cands:
        x0 = np.clip(x0, lb, ub)
        x0 = x0 / x0.sum()
        sol = minimize(obj, x0, jac=True, method="SLSQP", bounds=list(zip(lb, ub)),
                       constraints=[{"type": "eq", "fun": lambda r: r.sum() - 1, "jac": lambda r: np.ones(M)}],
                       options={"ftol": 1e-14, "maxiter": 1000})
        r = np.clip(sol.x, lb, ub)
        r = r / r.sum()
        v = obj(r)[0]
        if v < best_v:
            best_r, best_v = r, v
    return best_r, float(best_v)


def critical_proportion(fit: MixFit, threshold: float) -> float | None:
    """Continual pretraining: smallest share ``p`` of original data (column 0; new data column 1) with
    ``L_orig(p) ≤ threshold``; ``None`` when even ``p = 1`` exceeds it."""
    a_orig, a_new = fit.a[0], fit.a[1]
    L = lambda p: fit.c + math.exp(a_new + (a_orig - a_new) * p)  # noqa: E731
    if L(0.0) <= threshold:
        return 0.0
    if L(1.0) > threshold or threshold <= fit.c:
        return None
    p = (math.log(threshold - fit.c) - a_new) / (a_orig - a_new)
    return float(min(1.0, max(0.0, p)))


# ====================================================================================================
# mixture sampling


def sample_mixtures(M: int, n: int, method: str = "dirichlet", seed: int = 0, alpha: float = 1.0,
                    caps: np.ndarray | None = None, min_prop: float = 0.0) -> np.ndarray:
    """``n`` mixtures (n, M) on the simplex: Dirichlet(alpha), the paper's double-diminishing grid, or a grid."""
    rng = np.random.default_rng(seed)
    if method not in SAMPLERS:
        raise LmlabError(f"unknown sampler {method!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[method](M, n, rng, alpha, np.ones(M) if caps is None else np.asarray(caps, float), min_prop)


def _dirichlet(M: int, n: int, rng: np.random.Generator, alpha: float, caps: np.ndarray, min_prop: float
               ) -> np.ndarray:
    out: list[np.ndarray] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise LmlabError("could not sample mixtures under the caps; relax caps or min_prop")
        r = rng.dirichlet(np.full(M, alpha))
        r = min_prop + (1 - M * min_prop) * r
        if np.all(r <= caps + 1e-12):
            out.append(r)
    return np.array(out)


def _double_diminishing(M: int, n: int, rng: np.random.Generator, alpha: float, caps: np.ndarray,
                        min_prop: float) -> np.ndarray:
    """Paper Alg. 2: domain j gets ``cap_j · 2^-s`` (s random, snapped to 1/16; 0 below 1/16), last = rest."""
    out: list[np.ndarray] = []
    seen: set[tuple[float, ...]] = set()
    tries = 0
    while len(out) < n and tries < 1000 * n:
        tries += 1
        order = rng.permutation(M)
        r = np.zeros(M)
        left = 1.0
        for j in order[:-1]:
            v = math.floor(caps[j] * 2.0 ** -int(rng.integers(0, 5)) * 16) / 16
            r[j] = min(v, left)
            left -= r[j]
        r[order[-1]] = left
        key = tuple(np.round(r, 6))
        if np.all(r <= caps + 1e-9) and key not in seen:
            seen.add(key)
            out.append(r)
    if len(out) < n:
        raise LmlabError(f"double-diminishing: only {len(out)} distinct mixtures exist; lower n")
    return np.array(out)


def _grid(M: int, n: int, rng: np.random.Generator, alpha: float, caps: np.ndarray, min_prop: float) -> np.ndarray:
    """Smallest regular simplex grid with ≥ n points (interior first when possible), subsampled evenly."""
    import itertools

    for h in range(1, 64):
        pts = [np.array(c) / h for c in itertools.product(range(h + 1), repeat=M) if sum(c) == h]
        pts = [p for p in pts if np.all(p <= caps + 1e-12) and np.all(p >= min_prop - 1e-12)]
        if len(pts) >= n:
            idx = np.linspace(0, len(pts) - 1, n).round().astype(int)
            return np.array([pts[i] for i in idx])
    raise LmlabError("grid sampler: too many points requested")


SAMPLERS = {"dirichlet": _dirichlet, "double-diminishing": _double_diminishing, "grid": _grid}
"""Mixture samplers for the proxy runs (``sampler=`` choices)."""


# ====================================================================================================
# tables of runs (user CSV / JSONL) and the nested fit


@dataclass
class Runs:
    """Runs as arrays: proportions R (n, M), losses Y (n, T), optional steps/params (n,)."""

    domains: list[str]
    targets: list[str]
    R: np.ndarray
    Y: np.ndarray
    steps: np.ndarray | None = None
    params: np.ndarray | None = None
    normalized: int = 0
    """Rows whose proportions did not sum to 1 and were normalised."""


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV or JSONL file (numbers parsed)."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"runs file not found: {p}")
    if p.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LmlabError(f"{p}:{i}: not JSON ({e.msg})") from None
        return rows
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        d: dict[str, Any] = {}
        for k, v in row.items():
            if k is None:
                continue
            try:
                d[k] = float(v) if v not in ("", None) else float("nan")
            except ValueError:
                d[k] = v
        out.append(d)
    return out


PROP_PREFIXES = ("r_", "train_", "mix_")
LOSS_HINTS = ("loss", "val_")


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    for pre in prefixes:
        if name.startswith(pre):
            return name[len(pre):]
    return name


def load_runs(data: str | Path, losses: str | Path | None = None, *, domains: list[str] | None = None,
              targets: list[str] | None = None, join: str = "auto", steps_col: str = "steps",
              params_col: str = "params") -> Runs:
    """Read runs from one table (or a mixtures table + a losses table joined on ``join``).

    Proportion columns: ``domains`` or every column starting with ``r_``/``train_``/``mix_``. Loss columns:
    ``targets`` or every other numeric column whose name contains ``loss`` or starts with ``val_``.
    Rows whose proportions do not sum to 1 are normalised (warning); negative proportions are an error.
    """
    rows = read_table(data)
    if losses is not None:
        other = read_table(losses)
        keys = [join] if join != "auto" else ["run", "index", "id", "name"]
        key = next((k for k in keys if rows and k in rows[0] and other and k in other[0]), None)
        if key is None:
            raise LmlabError(f"cannot join {data} and {losses}: no shared column among {keys}")
        by = {r[key]: r for r in other}
        rows = [{**r, **by[r[key]]} for r in rows if r[key] in by]
    if not rows:
        raise LmlabError(f"{data}: no runs")
    cols = list(rows[0])
    dom_cols = domains or [c for c in cols if c.startswith(PROP_PREFIXES)]
    if not dom_cols:
        raise LmlabError(f"{data}: no proportion columns (name them r_<domain> or pass domains=...)")
    missing = [c for c in dom_cols if c not in cols]
    if missing:
        raise LmlabError(f"{data}: missing proportion column(s) {missing}")
    skip = set(dom_cols) | {steps_col, params_col, "run", "index", "id", "name"}
    tgt_cols = targets or [c for c in cols if c not in skip and any(h in c.lower() for h in LOSS_HINTS)
                           and isinstance(rows[0][c], float)]
    if not tgt_cols:
        raise LmlabError(f"{data}: no loss columns (name them loss_<domain> or pass targets=...)")
    missing = [c for c in tgt_cols if c not in cols]
    if missing:
        raise LmlabError(f"{data}: missing loss column(s) {missing}")
    try:
        R = np.array([[float(r[c]) for c in dom_cols] for r in rows])
        Y = np.array([[float(r[c]) for c in tgt_cols] for r in rows])
    except (TypeError, ValueError) as e:
        raise LmlabError(f"{data}: non-numeric proportion or loss ({e})") from None
    R, n_norm = check_proportions(R)
    steps = np.array([float(r[steps_col]) for r in rows]) if steps_col in cols else None
    params = np.array([float(r[params_col]) for r in rows]) if params_col in cols else None
    return Runs(domains=[_strip(c, PROP_PREFIXES) for c in dom_cols], targets=tgt_cols, R=R, Y=Y, steps=steps,
                params=params, normalized=n_norm)


def check_proportions(R: np.ndarray, tol: float = 1e-3) -> tuple[np.ndarray, int]:
    """Rows on the simplex: negative -> error; sums off 1 by more than ``tol`` -> normalised with a warning."""
    R = np.atleast_2d(np.asarray(R, float))
    if np.any(~np.isfinite(R)):
        raise LmlabError("proportions contain NaN or inf")
    if np.any(R < 0):
        i = int(np.argwhere(R < 0)[0][0])
        raise LmlabError(f"negative proportion in mixture {i}: {R[i].round(4).tolist()}")
    sums = R.sum(1)
    if np.any(sums <= 0):
        raise LmlabError("a mixture has all proportions zero")
    off = np.abs(sums - 1) > tol
    if off.any():
        log.warning("%d mixture(s) do not sum to 1 (e.g. %.4f); normalised", int(off.sum()), float(sums[off][0]))
        warnings.warn(f"{int(off.sum())} mixture(s) do not sum to 1; normalised", FitWarning, stacklevel=2)
    return R / sums[:, None], int(off.sum())


def nest(runs: Runs, target_steps: float | None = None, target_params: float | None = None,
         fit_from: float = 0.0, tie_steps: bool = False, tie_sizes: bool = False
         ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Paper Alg. 1: per (mixture, size) fit the step law and extrapolate to ``target_steps``; per mixture fit the
    size law across sizes and extrapolate to ``target_params``. Returns ``(R (K, M), Y (K, T), info)`` with one
    row per mixture. Without steps/params columns (or targets), rows are used as they are (last step, largest
    size). ``tie_steps``: one step exponent β per (mixture, size) shared by all validation domains (the
    repository's ``steplaw.py --tie_alpha valid``); ``tie_sizes``: one size exponent α shared by every mixture
    and domain (``sizelaw.py --tie_alpha all``) - fewer parameters, better-conditioned extrapolation."""
    R, Y = runs.R, runs.Y
    keys = [tuple(np.round(r, 6)) for r in R]
    mix_keys = list(dict.fromkeys(keys))
    steps = runs.steps if runs.steps is not None else np.zeros(len(R))
    params = runs.params if runs.params is not None else np.zeros(len(R))
    sizes = sorted(set(params.tolist()))
    info: dict[str, Any] = {"step_fits": [], "size_fits": [], "sizes": sizes, "tie_steps": tie_steps,
                            "tie_sizes": tie_sizes}
    T = Y.shape[1]
    per_mix: list[dict[float, np.ndarray]] = []
    for mk in mix_keys:  # (1) step law per (mixture, size)
        rows = [i for i, k in enumerate(keys) if k == mk]
        per_size = {}
        for N in sizes:
            idx = [i for i in rows if params[i] == N]
            if not idx:
                continue
            idx = sorted(idx, key=lambda i: steps[i])
            s = steps[idx]
            if runs.steps is not None and target_steps is not None and len(np.unique(s[s >= fit_from])) >= 3:
                sel = [i for i in idx if steps[i] >= fit_from]
                if tie_steps and T > 1:
                    pfs = fit_power_laws_tied([steps[sel]] * T, [Y[sel, t] for t in range(T)], what="step law")
                else:
                    pfs = [fit_power_law(steps[sel], Y[sel, t], what="step law") for t in range(T)]
                vals = [float(pf.predict(target_steps)) for pf in pfs]
                for t, pf in enumerate(pfs):
                    info["step_fits"].append({"mixture": list(mk), "params": N, "target": runs.targets[t],
                                              **pf.to_dict(), "pred": vals[t]})
                per_size[N] = np.array(vals)
            else:
                per_size[N] = Y[idx[-1]]
        per_mix.append(per_size)
    # (2) size law per mixture (or one exponent for all)
    extrapolate = runs.params is not None and target_params is not None
    if extrapolate and all(target_params not in ps for ps in per_mix):
        if any(len(ps) < 3 for ps in per_mix):
            raise LmlabError(f"size law needs at least 3 model sizes per mixture, got "
                             f"{min(len(ps) for ps in per_mix)}")
        curves = [(k, t, np.array(sorted(ps))) for k, ps in enumerate(per_mix) for t in range(T)]
        ys = [np.array([per_mix[k][N][t] for N in Ns]) for k, t, Ns in curves]
        if tie_sizes:
            pfs = fit_power_laws_tied([Ns for _, _, Ns in curves], ys, beta_range=(0.01, 2.0), f_scale=0.08,
                                      what="size law")
        else:
            pfs = [fit_power_law(Ns, y, beta_range=(0.01, 2.0), f_scale=0.08, what="size law")
                   for (_, _, Ns), y in zip(curves, ys)]
        out_Y = np.zeros((len(per_mix), T))
        for (k, t, Ns), y, pf in zip(curves, ys, pfs):
            out_Y[k, t] = float(pf.predict(target_params))
            info["size_fits"].append({"mixture": list(mix_keys[k]), "target": runs.targets[t], **pf.to_dict(),
                                      "pred": out_Y[k, t], "x": Ns.tolist(), "y": y.tolist()})
    else:
        out_Y = np.array([ps[target_params] if target_params is not None and target_params in ps
                          else ps[max(ps)] for ps in per_mix])
    return np.array([np.array(mk) for mk in mix_keys]), out_Y, info


def kfold_predict(R: np.ndarray, y: np.ndarray, folds: int = 4, seed: int = 0, model: str = "law",
                  **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Cross-validated predictions (n,) and out-of-range flags for the mixing law (``model="law"``), the
    guarded law (``"guarded"``: ridge + clip), or the implicit law (``"implicit"``, K = ``kw['K']``)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    fold[rng.permutation(len(y))] = np.arange(len(y)) % folds
    pred, oor = np.zeros(len(y)), np.zeros(len(y), bool)
    for f in range(folds):
        tr, te = fold != f, fold == f
        if model == "implicit":
            fit = fit_implicit(R[tr], y[tr], K=kw.get("K", 3), seed=seed)
            p, o = guarded_predict(fit, R[te], clip_margin=None)
        else:
            fit_kw = {k: v for k, v in kw.items() if k in ("ridge", "own", "own_min", "f_scale", "zero_indicator")}
            fit = fit_mix_law(R[tr], y[tr], **fit_kw)
            p, o = guarded_predict(fit, R[te], clip_margin=kw.get("clip_margin"))
        pred[te], oor[te] = p, o
    return pred, oor


# ====================================================================================================
# law files and plots


def own_index(target: str, domains: list[str]) -> int | None:
    """The training domain a validation target belongs to (longest domain name contained in the target)."""
    t = target.lower()
    hits = [(len(d), i) for i, d in enumerate(domains) if d.lower() and d.lower() in t]
    return max(hits)[1] if hits else None


def load_law(path: str | Path) -> dict[str, Any]:
    """A ``law.json`` (or a run dir containing one) written by ``lmlab data mix fit`` / ``run``."""
    p = Path(path)
    if p.is_dir():
        p = p / "law.json"
    if not p.is_file():
        raise LmlabError(f"law file not found: {p} (give a 'data mix fit' run dir or its law.json)")
    law = json.loads(p.read_text())
    if "fits" not in law or "domains" not in law:
        raise LmlabError(f"{p} is not a mixing-law file")
    return law


def law_fits(law: dict[str, Any]) -> dict[str, MixFit]:
    return {t: MixFit(**f) for t, f in law["fits"].items()}


def parse_mixtures(items: list[str], M: int) -> np.ndarray:
    """``["0.2,0.3,0.5", ...]`` or a CSV/JSONL path -> (q, M) on the simplex (normalised, checked)."""
    rows: list[list[float]] = []
    for it in items:
        if Path(it).is_file():
            for r in read_table(it):
                vals = [v for k, v in r.items() if k.startswith(PROP_PREFIXES)]
                rows.append([float(v) for v in vals])
            continue
        try:
            rows.append([float(v) for v in str(it).replace(";", ",").split(",") if v.strip()])
        except ValueError:
            raise LmlabError(f"mixture {it!r} is not comma-separated numbers or a file") from None
    if not rows:
        raise LmlabError("no mixtures given")
    bad = [r for r in rows if len(r) != M]
    if bad:
        raise LmlabError(f"mixture {bad[0]} has {len(bad[0])} proportions; the law has {M} domains")
    return check_proportions(np.array(rows))[0]


def simplex_grid(fn, h: int = 40) -> np.ndarray:
    """Values of ``fn(r)`` on a 3-domain simplex: matrix [i, j] at r = (j/h, i/h, 1 - (i+j)/h), NaN outside."""
    m = np.full((h + 1, h + 1), np.nan)
    pts = [(i, j) for i in range(h + 1) for j in range(h + 1 - i)]
    R = np.array([[j / h, i / h, 1 - (i + j) / h] for i, j in pts])
    v = fn(R)
    for (i, j), val in zip(pts, v):
        m[i, j] = val
    return m


def plot_surface(path: Path, fn, domains: list[str], title: str, points: np.ndarray | None = None,
                 best: np.ndarray | None = None) -> Path:
    """Loss surface over 3 domains (simplex heatmap, x = r_0, y = r_1), fitted mixtures as dots, optimum star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmlab.core.runs import atomic_write

    h = 40
    m = simplex_grid(fn, h)
    fig = Figure(figsize=(5.6, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, origin="lower", extent=(-0.5 / h, 1 + 0.5 / h, -0.5 / h, 1 + 0.5 / h), cmap="viridis",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="predicted loss")
    if points is not None and len(points):
        ax.scatter(points[:, 0], points[:, 1], c="white", edgecolors="black", s=22, label="fitted mixtures")
    if best is not None:
        ax.scatter([best[0]], [best[1]], marker="*", c="red", s=140, label="optimum")
    ax.set_xlabel(f"r[{domains[0]}]")
    ax.set_ylabel(f"r[{domains[1]}]  (r[{domains[2]}] = rest)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


# ====================================================================================================
# `lmlab data mix fit | predict | optimize`


@dataclass
class LawOptions:
    """How laws are fitted and guarded (shared by fit and run)."""

    ridge: float = 0.0
    """Ridge on the centred coefficients a (0: the paper's law; 1e-4 tames extrapolation)."""
    clip_margin: float | None = None
    """Range guard: clip predictions to the fitted loss range widened by this fraction (null: off)."""
    own_min: float | None = None
    """Zero guard: fit each target only on runs whose own-domain proportion exceeds this (null: off)."""
    zero_indicator: bool = False
    """Zero guard, modelled: add 1[r_own = 0] to each target's exponent (the jump at a zero own proportion)."""
    f_scale: float = 0.02
    """Soft-L1 scale of the robust polish (the paper's Huber delta)."""
    implicit_k: int = 0
    """Also fit an implicit-aggregation law on the aggregate loss with this many implicit domains (0: off)."""
    tie_steps: bool = True
    """Nested: one step-law exponent per run shared by its validation domains (paper repo: --tie_alpha valid)."""
    tie_sizes: bool = True
    """Nested: one size-law exponent shared by all mixtures and domains (paper repo: --tie_alpha all)."""

    def __post_init__(self) -> None:
        if self.ridge < 0 or self.f_scale <= 0 or self.implicit_k < 0:
            raise ConfigError("ridge >= 0, f_scale > 0 and implicit_k >= 0 required")


@dataclass
class FitConfig(RunArgs):
    """Fit data mixing laws to a table of runs (mixture proportions -> validation losses)."""

    data: str = ""
    """CSV/JSONL of runs: proportion columns r_<domain>, loss columns loss_<target> [, steps, params]."""
    losses: str | None = None
    """Optional second table with the losses, joined to `data` on run/index/id/name."""
    domains: list[str] = field(default_factory=list)
    """Proportion columns (default: columns starting with r_, train_ or mix_)."""
    targets: list[str] = field(default_factory=list)
    """Loss columns (default: numeric columns containing 'loss' or starting with val_)."""
    weights: list[float] = field(default_factory=list)
    """Explicit aggregation weights over targets (default: uniform)."""
    target_steps: float | None = None
    """Nested: extrapolate each run to this many steps with the step law (needs a steps column)."""
    target_params: float | None = None
    """Nested: extrapolate to this many parameters with the size law (needs a params column, >= 3 sizes)."""
    fit_from: float = 0.0
    """Nested: fit the step law only on rows with steps >= this (skip warm-up)."""
    law: LawOptions = field(default_factory=LawOptions)
    """Fitting and guard options."""
    folds: int = 4
    """K-fold cross-validation for MAE / Spearman (0: off)."""
    bootstrap: int = 100
    """Bootstrap resamples over runs for parameter / prediction intervals (0: off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.folds == 1 or self.folds < 0 or self.bootstrap < 0:
            raise ConfigError("folds must be 0 or >= 2 and bootstrap >= 0")


def fit_laws(R: np.ndarray, Y: np.ndarray, domains: list[str], targets: list[str], weights: np.ndarray,
             opts: LawOptions, folds: int = 4, bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Per-target laws, explicit aggregate, single law on the aggregate, optional implicit law, CV metrics."""
    M = R.shape[1]
    if len(R) < M + 1:
        raise LmlabError(f"{len(R)} mixtures but the law has {M + 1} parameters per target (c + {M} "
                         f"coefficients); need at least {M + 1} mixtures")
    fits, cv, boots, kw_by = {}, {}, {}, {}
    agg_true = Y @ weights
    agg_cv = np.zeros(len(R))
    for t, name in enumerate(targets):
        own = own_index(name, domains) if (opts.own_min is not None or opts.zero_indicator) else None
        kw = {"ridge": opts.ridge, "f_scale": opts.f_scale, "own": own, "own_min": opts.own_min if own is not None
              else None, "zero_indicator": opts.zero_indicator}
        kw_by[name] = kw
        fits[name] = fit_mix_law(R, Y[:, t], **kw)
        if fits[name].at_bound:
            log.warning("target %s: fitted c=%.4f is at its bound (the loss floor is extrapolated)", name,
                        fits[name].c)
        if folds >= 2 and len(R) >= 2 * (M + 1):
            p, oor = kfold_predict(R, Y[:, t], folds, seed, clip_margin=opts.clip_margin, **kw)
            agg_cv += weights[t] * p
            cv[name] = {"mae": mae(p, Y[:, t]), "spearman": spearman(p, Y[:, t]),
                        "mae_in_range": mae(p[~oor], Y[~oor, t]) if (~oor).any() else None,
                        "out_of_range": int(oor.sum()), "pred": p.tolist()}
        if bootstrap:
            boots[name] = bootstrap_fits(R, Y[:, t], bootstrap, seed, **kw)
    single = fit_mix_law(R, agg_true, ridge=opts.ridge, f_scale=opts.f_scale)
    res: dict[str, Any] = {"domains": domains, "targets": targets, "weights": weights.tolist(),
                           "fits": {k: f.to_dict() for k, f in fits.items()}, "single": single.to_dict(),
                           "n_mixtures": len(R), "cv": cv, "bootstrap": boots,
                           "guard": {"clip_margin": opts.clip_margin, "ridge": opts.ridge, "own_min": opts.own_min,
                                     "zero_indicator": opts.zero_indicator}}
    if cv:
        ps, _ = kfold_predict(R, agg_true, folds, seed, ridge=opts.ridge, f_scale=opts.f_scale,
                              clip_margin=opts.clip_margin)
        res["aggregate_cv"] = {"explicit": {"mae": mae(agg_cv, agg_true), "spearman": spearman(agg_cv, agg_true)},
                               "single": {"mae": mae(ps, agg_true), "spearman": spearman(ps, agg_true)}}
    if opts.implicit_k:
        imp = fit_implicit(R, agg_true, K=opts.implicit_k, seed=seed)
        res["implicit"] = imp.to_dict()
        if cv:
            pi, _ = kfold_predict(R, agg_true, folds, seed, model="implicit", K=opts.implicit_k)
            res["aggregate_cv"]["implicit"] = {"mae": mae(pi, agg_true), "spearman": spearman(pi, agg_true)}
    return res


def _weights(weights: list[float], T: int) -> np.ndarray:
    if not weights:
        return np.ones(T) / T
    w = np.asarray(weights, float)
    if len(w) != T or np.any(w < 0) or w.sum() <= 0:
        raise LmlabError(f"weights must be {T} non-negative numbers (one per target), got {weights}")
    return w / w.sum()


def _aggregate_predict(law: dict[str, Any], R: np.ndarray, guard: bool = True) -> dict[str, Any]:
    fits = law_fits(law)
    w = np.asarray(law["weights"])
    out: dict[str, Any] = {}
    total = np.zeros(len(R))
    oor_any = np.zeros(len(R), bool)
    margin = law.get("guard", {}).get("clip_margin") if guard else None
    for (name, f), wi in zip(fits.items(), w):
        p, oor = guarded_predict(f, R, clip_margin=margin)
        out[name] = p.tolist()
        total += wi * p
        oor_any |= oor
    out["aggregate"] = total.tolist()
    out["out_of_range"] = oor_any.tolist()
    out["in_hull"] = in_hull(R, np.asarray(law["mixtures"])).tolist() if law.get("mixtures") else None
    return out


def _write_law_plots(run: Any, law: dict[str, Any], R: np.ndarray, Y: np.ndarray) -> None:
    from lmlab.core.plotting import scatter_plot

    cv = law.get("cv") or {}
    if cv:
        scatter_plot(run.plots / "cv_pred_vs_measured.png", {t: Y[:, i] for i, t in enumerate(law["targets"])
                                                             if t in cv},
                     {t: cv[t]["pred"] for t in law["targets"] if t in cv}, diagonal=True,
                     title="mixing law: cross-validated prediction", xlabel="measured loss",
                     ylabel="predicted loss")
    if len(law["domains"]) == 3:
        w = np.asarray(law["weights"])
        fits = list(law_fits(law).values())
        fn = lambda Q: sum(wi * f.predict(Q) for wi, f in zip(w, fits))  # noqa: E731
        plot_surface(run.plots / "surface.png", fn, law["domains"], "predicted aggregate loss", points=R,
                     best=np.asarray(law["optimum"]["mixture"]) if law.get("optimum") else None)


def fit_main(cfg: FitConfig) -> Path:
    from lmlab.core.runs import start_run

    if not cfg.data:
        raise ConfigError("give the runs table: lmlab data mix fit RUNS.csv")
    runs = load_runs(cfg.data, cfg.losses, domains=cfg.domains or None, targets=cfg.targets or None)
    if (cfg.target_steps is not None and runs.steps is None) or (cfg.target_params is not None and
                                                                 runs.params is None):
        raise LmlabError("target_steps/target_params need 'steps'/'params' columns in the runs table")
    R, Y, nest_info = nest(runs, cfg.target_steps, cfg.target_params, cfg.fit_from,
                               tie_steps=cfg.law.tie_steps, tie_sizes=cfg.law.tie_sizes)
    w = _weights(cfg.weights, len(runs.targets))
    with start_run(cfg, "data-mix-fit") as run:
        t0 = time.perf_counter()
        law = fit_laws(R, Y, runs.domains, runs.targets, w, cfg.law, cfg.folds, cfg.bootstrap, cfg.seed)
        law["fit_seconds"] = round(time.perf_counter() - t0, 3)
        law["mixtures"] = R.tolist()
        law["nested"] = {"target_steps": cfg.target_steps, "target_params": cfg.target_params,
                         "step_fits": len(nest_info["step_fits"]), "size_fits": len(nest_info["size_fits"])}
        fl = list(law_fits(law).values())
        r_opt, v = optimize_mixture(fl, w, starts=R)
        r_box, v_box = optimize_mixture(fl, w, starts=R, lower=R.min(0), caps=R.max(0))
        law["optimum"] = {"mixture": r_opt.tolist(), "predicted": v, "best_sampled": float(np.min(Y @ w)),
                          "in_range": not bool(guarded_predict(fl[0], r_opt)[1][0]),
                          "within_fitted_range": {"mixture": r_box.tolist(), "predicted": v_box}}
        run.save_json("law.json", law)
        _write_law_plots(run, law, R, Y)
        summary = {k: law[k] for k in ("domains", "targets", "n_mixtures", "optimum", "fit_seconds")}
        summary["fits"] = {t: {"c": f["c"], "a": f["a"], "k": f["k"], "t": f["t"], "rmse": f["rmse"],
                               "at_bound": f["at_bound"]} for t, f in law["fits"].items()}
        summary["cv"] = {t: {k: v for k, v in m.items() if k != "pred"} for t, m in law["cv"].items()}
        summary["aggregate_cv"] = law.get("aggregate_cv")
        summary["normalized_rows"] = runs.normalized
        run.finish(summary)
    return run.path


@dataclass
class PredictConfig(RunArgs):
    """Predict validation losses of mixtures with a fitted law."""

    law: str = ""
    """A 'data mix fit' / 'data mix run' run dir, or its law.json."""
    mixtures: list[str] = field(default_factory=list)
    """Mixtures 'r1,r2,...' (one per item) or a CSV/JSONL file of r_<domain> columns."""
    guard: bool = True
    """Apply the law's range guard (clip) and flag out-of-range mixtures."""


def predict_main(cfg: PredictConfig) -> Path:
    from lmlab.core.runs import start_run

    if not cfg.law:
        raise ConfigError("give a law: lmlab data mix predict RUN_DIR mixtures=0.2,0.3,0.5")
    law = load_law(cfg.law)
    R = parse_mixtures(cfg.mixtures, len(law["domains"]))
    with start_run(cfg, "data-mix-predict") as run:
        pred = _aggregate_predict(law, R, cfg.guard)
        rows = [{"mixture": dict(zip(law["domains"], r.tolist())),
                 **{t: pred[t][i] for t in law["targets"]}, "aggregate": pred["aggregate"][i],
                 "out_of_range": pred["out_of_range"][i], "in_hull": pred["in_hull"][i] if pred["in_hull"] else None}
                for i, r in enumerate(R)]
        if any(r["out_of_range"] for r in rows):
            log.warning("%d mixture(s) lie outside the fitted range: predictions are extrapolations",
                        sum(r["out_of_range"] for r in rows))
        run.finish({"predictions": rows})
    return run.path


@dataclass
class OptimizeConfig(RunArgs):
    """Find the mixture minimising the predicted (weighted) validation loss."""

    law: str = ""
    """A 'data mix fit' / 'data mix run' run dir, or its law.json."""
    weights: list[float] = field(default_factory=list)
    """Weights over the law's targets (default: the law's own)."""
    tokens: list[float] = field(default_factory=list)
    """Available tokens per training domain (with target_tokens: availability caps)."""
    target_tokens: float | None = None
    """Tokens of the target run (caps r_i <= tokens_i * max_epochs / target_tokens)."""
    max_epochs: float = 1.0
    """Maximum repetitions of a domain's data."""
    kl: float = 0.0
    """Weight of KL(r || prior) (0: off; keeps the optimum near the prior)."""
    prior: list[float] = field(default_factory=list)
    """Prior mixture for the KL term (default: uniform)."""
    within_range: bool = False
    """Keep every proportion inside the range of the fitted mixtures (no extrapolation of the law)."""


def optimize_main(cfg: OptimizeConfig) -> Path:
    from lmlab.core.runs import start_run

    if not cfg.law:
        raise ConfigError("give a law: lmlab data mix optimize RUN_DIR")
    law = load_law(cfg.law)
    M = len(law["domains"])
    w = _weights(cfg.weights, len(law["targets"])) if cfg.weights else np.asarray(law["weights"])
    caps = None
    if cfg.tokens or cfg.target_tokens is not None:
        if len(cfg.tokens) != M or cfg.target_tokens is None:
            raise LmlabError(f"caps need tokens= (one per domain, {M}) and target_tokens=")
        caps = availability_caps(cfg.tokens, cfg.target_tokens, cfg.max_epochs)
    prior = np.asarray(cfg.prior, float) if cfg.prior else None
    if prior is not None and len(prior) != M:
        raise LmlabError(f"prior needs {M} proportions")
    fits = list(law_fits(law).values())
    with start_run(cfg, "data-mix-optimize") as run:
        R = np.asarray(law.get("mixtures") or np.ones((1, M)) / M)
        lower = 0.0
        if cfg.within_range:
            lower, hi = R.min(0), R.max(0)
            caps = hi if caps is None else np.minimum(caps, hi)
        r_opt, v = optimize_mixture(fits, w, caps=caps, starts=R, kl=cfg.kl, prior=prior, lower=lower)
        sampled = sum(wi * f.predict(R) for wi, f in zip(w, fits))
        res = {"mixture": dict(zip(law["domains"], r_opt.tolist())), "predicted": v,
               "per_target": {t: float(f.predict(r_opt)[0]) for t, f in zip(law["targets"], fits)},
               "best_sampled_predicted": float(sampled.min()), "uniform_predicted": float(
                   sum(wi * f.predict(np.ones(M) / M)[0] for wi, f in zip(w, fits))),
               "caps": caps.tolist() if caps is not None else None,
               "out_of_range": bool(guarded_predict(fits[0], r_opt)[1][0])}
        if M == 3:
            plot_surface(run.plots / "surface.png", lambda Q: sum(wi * f.predict(Q) for wi, f in zip(w, fits)),
                         law["domains"], "predicted loss and optimum", points=R, best=r_opt)
        run.finish(res)
    return run.path


# ====================================================================================================
# proxy training (the foundation's loop on tiny Llama configs) and `lmlab data mix run`


def proxy_config(vocab_size: int, hidden: int, layers: int = 2, special: dict[str, int] | None = None):
    """A tiny Llama config of width ``hidden`` (heads of 16 dims, MLP 8/3·hidden, tied embeddings)."""
    from transformers import LlamaConfig

    heads = max(1, hidden // 16)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=int(math.ceil(hidden * 8 / 3 / 8) * 8), max_position_embeddings=1024,
                      tie_word_embeddings=True)
    for k, v in (special or {}).items():
        setattr(cfg, k, v)
    return cfg


def non_embedding_params(model: Any) -> int:
    """Parameters excluding the (tied) token embedding: the N of the size law."""
    from lmlab.core.models import n_params

    emb = model.get_input_embeddings().weight.numel()
    return int(n_params(model) - emb)


def mix_stream(streams: list[np.ndarray], r: np.ndarray, total: int, seed: int = 0) -> np.ndarray:
    """A training stream with ``round(r_j · total)`` tokens of domain j (a seeded window, wrapping = repeats);
    uniform windows over it see domain j with probability ≈ r_j."""
    rng = np.random.default_rng(seed)
    parts = []
    for s, rj in zip(streams, r):
        n = int(round(float(rj) * total))
        if n <= 0:
            continue
        start = int(rng.integers(0, len(s)))
        idx = (start + np.arange(n)) % len(s)
        parts.append(np.asarray(s[idx]))
    return np.concatenate(parts)


def _key(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_proxy(folder: Path, *, mixture: np.ndarray, hidden: int, layers: int, tok: Any, streams: list[np.ndarray],
                vals: dict[str, np.ndarray], opt: Any, stop_after: int | None, stream_tokens: int, seed: int,
                eval_windows_n: int, device: Any = "cpu", init_from: str | None = None,
                progress: bool = False) -> dict[str, Any]:
    """One proxy run (cached and resumable in ``folder``): trains with :func:`lmlab.core.pretrain.train`
    for ``stop_after`` steps of an ``opt.steps`` schedule, evaluating every validation domain every
    ``opt.eval_every`` steps. Returns ``{"params", "evals": [{"step", <domain>: loss}]}``."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmlab.core.pretrain import eval_windows, evaluate, train
    from lmlab.core.runs import write_json
    from lmlab.core.zoo import _special_ids

    end = opt.steps if stop_after is None else min(stop_after, opt.steps)
    done = folder / "done.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if rec["evals"] and rec["evals"][-1]["step"] >= end:
            rec["evals"] = [e for e in rec["evals"] if e["step"] <= end]
            return rec
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if init_from:
        from lmlab.core.models import load_model

        model = load_model(init_from, device, torch.float32).train()
    else:
        model = AutoModelForCausalLM.from_config(proxy_config(len(tok), hidden, layers, _special_ids(tok)),
                                                 dtype=torch.float32).to(device)
    n_ne = non_embedding_params(model)
    train_ids = mix_stream(streams, mixture, stream_tokens, seed)
    windows = {d: eval_windows(v, eval_windows_n, opt.seq_len) for d, v in vals.items()}
    ev_path = folder / "evals.json"
    evals = json.loads(ev_path.read_text()) if ev_path.is_file() else []
    ck = folder / "checkpoint"
    ck_step = json.loads((ck / "trainer_state.json").read_text())["step"] if (ck / "trainer_state.json").is_file() \
        else 0
    evals = [e for e in evals if e["step"] <= ck_step]

    first = next(iter(vals))
    same = len(windows[first]) == opt.eval_batches * opt.batch_size  # train() already scored these windows

    def on_eval(step: int, v: float) -> None:
        rec = {"step": step, **{d: v if (d == first and same) else evaluate(model, w, opt.batch_size)
                                for d, w in windows.items()}}
        evals.append(rec)
        write_json(ev_path, evals)

    if ck_step == 0 and (not evals or evals[0]["step"] != 0):  # step 0 (untrained): reference, not fitted
        evals.insert(0, {"step": 0, **{d: evaluate(model, w, opt.batch_size) for d, w in windows.items()}})
    train(model, train_ids, vals[first], opt, seed=seed, ckpt_dir=ck, resume=True, stop_after=end,
          progress=progress, on_eval=on_eval)
    evals = sorted({e["step"]: e for e in evals}.values(), key=lambda e: e["step"])
    rec = {"params": n_ne, "hidden": hidden, "layers": layers, "mixture": mixture.tolist(), "evals": evals}
    write_json(done, rec)
    return rec


def average_records(recs: list[dict[str, Any]], domains: list[str]) -> dict[str, Any]:
    """Average replicate proxy runs (same mixture and size, different seeds) step by step over the steps all
    replicates evaluated; ``seed_sd`` holds the across-seed standard deviation of each domain's last loss."""
    if len(recs) == 1:
        return {**recs[0], "seeds": 1, "seed_sd": None}
    by = [{e["step"]: e for e in r["evals"]} for r in recs]
    steps = sorted(set.intersection(*(set(b) for b in by)))
    evals = [{"step": s, **{d: float(np.mean([b[s][d] for b in by])) for d in domains}} for s in steps]
    last = steps[-1]
    sd = {d: float(np.std([b[last][d] for b in by], ddof=1)) for d in domains}
    return {**recs[0], "evals": evals, "seeds": len(recs), "seed_sd": sd}


@dataclass
class ProxyOptions:
    """The proxy runs (tiny Llama configs trained with the foundation loop)."""

    sizes: list[int] = field(default_factory=lambda: [32, 48, 64])
    """Hidden widths of the proxy models (>= 3 for the size law)."""
    layers: int = 2
    """Transformer layers of every proxy."""
    steps: int = 120
    """Steps actually trained per proxy (of a target_steps-long schedule: the early part of the target run)."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 64
    """Tokens per sequence."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup: int = 20
    """Warm-up steps."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak."""
    eval_every: int = 20
    """Evaluate every validation domain every N steps (the step law's points)."""
    eval_windows: int = 32
    """Validation windows (of seq_len tokens) per domain."""
    stream_tokens: int = 400_000
    """Length of each mixture's training stream (tokens)."""
    save_every: int = 100
    """Checkpoint a proxy every N steps (a killed proxy resumes from there; finished proxies are cached)."""
    seeds: int = 1
    """Replicates per proxy (seeds seed, seed+1, ...: init and data order); losses are averaged over them.
    Tiny proxies are noisy (run-to-run sd 0.05-0.2 nats here), so averaging sharpens every fit."""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")
        if not self.sizes or any(s < 16 or s % 16 for s in self.sizes):
            raise ConfigError(f"sizes must be multiples of 16 (>= 16), got {self.sizes}")
        if self.steps < 1 or self.eval_every < 1 or self.layers < 1:
            raise ConfigError("steps, eval_every and layers must be >= 1")


@dataclass
class RunConfig(RunArgs):
    """The nested pipeline: proxy runs -> step/size laws -> mixing law -> optimum -> verification runs."""

    domains: list[str] = field(default_factory=lambda: ["code", "prose", "math"])
    """Training (and validation) domains: built-in names or text/jsonl/parquet paths."""
    max_bytes: int = 1_000_000
    """Max text bytes per domain."""
    mixtures: int = 12
    """Number of proxy mixtures K."""
    holdout: int = 4
    """Mixtures held out to measure the law's prediction error (fit on K - holdout)."""
    sampler: str = "dirichlet"
    """Mixture sampler: dirichlet | double-diminishing | grid."""
    alpha: float = 1.0
    """Dirichlet concentration."""
    min_prop: float = 0.02
    """Minimum proportion per domain in sampled mixtures (the law breaks at exactly 0)."""
    proxy: ProxyOptions = field(default_factory=ProxyOptions)
    """Proxy runs."""
    target_steps: int = 480
    """Steps of the target run (proxies train the first proxy.steps of this schedule)."""
    step_fit_from: int | None = None
    """First step the step law is fitted on (null: the end of warm-up; the paper fits 10k-30k of 100k steps)."""
    target_size: int | None = 96
    """Hidden width of the target model (null: the largest proxy size, no size law)."""
    val_weights: list[float] = field(default_factory=list)
    """Weights of the validation domains in the objective (default: uniform)."""
    max_epochs: float = 4.0
    """Availability cap: a domain may repeat at most this often in the target run."""
    verify: bool = True
    """Train the target model at the optimum and at the uniform mixture and compare with the prediction."""
    law: LawOptions = field(default_factory=LawOptions)
    """Fitting and guard options."""
    cache: str | None = None
    """Proxy-run cache folder (default: <lmlab cache>/mixing); runs are resumed / reused from it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.domains or len(set(self.domains)) != len(self.domains) or len(self.domains) < 2:
            raise ConfigError(f"need at least 2 distinct domains, got {self.domains}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        M = len(self.domains)
        if self.mixtures - self.holdout < M + 1:
            raise ConfigError(f"mixtures - holdout = {self.mixtures - self.holdout} but the law has {M + 1} "
                              f"parameters per domain; need at least {M + 1 + self.holdout} mixtures")
        if self.holdout < 0 or self.target_steps < self.proxy.steps:
            raise ConfigError("holdout >= 0 and target_steps >= proxy.steps required")
        last = self.proxy.steps - 2 * self.proxy.eval_every
        if self.step_fit_from is not None and not 0 <= self.step_fit_from <= last:
            raise ConfigError(f"step_fit_from must leave >= 3 evaluations before proxy.steps={self.proxy.steps}, "
                              f"got {self.step_fit_from}")
        if not 0 <= self.min_prop * M < 1:
            raise ConfigError(f"min_prop * domains must be < 1, got {self.min_prop * M}")
        if self.val_weights and len(self.val_weights) != M:
            raise ConfigError(f"val_weights needs {M} values")
        if self.target_size is not None and self.target_size not in self.proxy.sizes and len(self.proxy.sizes) < 3:
            raise ConfigError(f"the size law needs at least 3 proxy sizes to extrapolate to {self.target_size}; "
                              f"got {self.proxy.sizes}")


def _optim(p: ProxyOptions, steps: int) -> Any:
    from lmlab.core.pretrain import OptimConfig

    return OptimConfig(steps=steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr, warmup=p.warmup,
                       min_lr_ratio=p.min_lr_ratio, eval_every=p.eval_every, save_every=p.save_every,
                       eval_batches=max(1, p.eval_windows // p.batch_size), log_every=10 ** 9)


def domain_streams(domains: list[str], max_bytes: int, seed: int = 0) -> tuple[Any, list[np.ndarray],
                                                                              dict[str, np.ndarray], dict]:
    """Reference tokenizer + per-domain train streams and validation streams (cached by the foundation)."""
    from lmlab.core.zoo import reference_tokenizer, token_streams

    tok = reference_tokenizer()
    streams, vals, meta = [], {}, {}
    for d in domains:
        try:
            tr, va, m = token_streams(tok, d, max_bytes, seed=seed)
        except LmlabError as e:
            raise LmlabError(f"domain {d!r} has no usable data: {e}") from None
        if len(tr) < 1000 or len(va) < 100:
            raise LmlabError(f"domain {d!r} has too little data ({len(tr)} train / {len(va)} val tokens)")
        streams.append(tr)
        vals[Path(d).name if d not in ("code", "prose", "math") else d] = va
        meta[d] = {"train_tokens": int(len(tr)), "val_tokens": int(len(va))}
    return tok, streams, vals, meta


def run_main(cfg: RunConfig) -> Path:
    from tqdm.auto import tqdm

    from lmlab.core.corpus import cache_dir
    from lmlab.core.plotting import line_plot, scatter_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    tok, streams, vals, data_meta = domain_streams(cfg.domains, cfg.max_bytes, cfg.seed)  # fail before run dir
    names = list(vals)
    M = len(names)
    w = _weights(cfg.val_weights, M)
    p = cfg.proxy
    target_tokens = cfg.target_steps * p.batch_size * p.seq_len
    caps = availability_caps([len(s) for s in streams], target_tokens, cfg.max_epochs)
    if caps.sum() < 1:
        raise LmlabError(f"the domains hold too few tokens for target_steps={cfg.target_steps} at max_epochs="
                         f"{cfg.max_epochs}")
    R = sample_mixtures(M, cfg.mixtures, cfg.sampler, cfg.seed, cfg.alpha, caps=np.maximum(caps, cfg.min_prop),
                        min_prop=cfg.min_prop)
    cache = Path(cfg.cache) if cfg.cache else cache_dir() / "mixing"
    proxy_opt = _optim(p, cfg.target_steps)
    from lmlab.core.zoo import tokenizer_hash

    base_key = {"domains": cfg.domains, "max_bytes": cfg.max_bytes, "tok": tokenizer_hash(tok),
                "opt": dataclasses.asdict(proxy_opt), "layers": p.layers, "stream": p.stream_tokens, "seed": cfg.seed,
                "ev": p.eval_windows, "train_tokens": [int(len(s)) for s in streams]}

    def proxy(r: np.ndarray, hidden: int, stop: int | None) -> dict[str, Any]:
        recs = []
        for k in range(p.seeds):  # replicate k uses seed + k (replicate 0 = the single-seed cache entry)
            key = _key({**base_key, "seed": cfg.seed + k, "r": np.round(r, 8).tolist(), "hidden": hidden})
            recs.append(train_proxy(cache / key, mixture=r, hidden=hidden, layers=p.layers, tok=tok,
                                    streams=streams, vals=vals, opt=proxy_opt, stop_after=stop,
                                    stream_tokens=p.stream_tokens, seed=cfg.seed + k,
                                    eval_windows_n=p.eval_windows, device=dev))
        return average_records(recs, names)

    with start_run(cfg, "data-mix-run", device=dev, dtype=dtype, threads=threads,
                   extra_meta={"data": data_meta}) as run:
        t0 = time.perf_counter()
        rows, sds = [], []
        jobs = [(i, h) for h in p.sizes for i in range(len(R))]
        for i, h in tqdm(jobs, desc="proxy runs", unit="run"):
            rec = proxy(R[i], h, p.steps)
            if rec["seed_sd"] and h == max(p.sizes):
                sds.append([rec["seed_sd"][d] for d in names])
            for e in rec["evals"]:
                if e["step"] > 0:
                    rows.append({"mixture": i, **{f"r_{d}": float(v) for d, v in zip(names, R[i])},
                                 "steps": e["step"], "params": rec["params"], "hidden": h,
                                 **{f"loss_{d}": e[d] for d in names}})
            run.log({"proxy": i, "hidden": h, "params": rec["params"], "final": {d: rec["evals"][-1][d]
                                                                               for d in names}})
        proxy_seconds = time.perf_counter() - t0
        _write_csv(run.path / "runs.csv", rows)
        params_by_h = {r["hidden"]: r["params"] for r in rows}
        target_h = cfg.target_size if cfg.target_size is not None else max(p.sizes)
        from transformers import AutoModelForCausalLM

        from lmlab.core.zoo import _special_ids

        tgt_params = params_by_h.get(target_h) or non_embedding_params(AutoModelForCausalLM.from_config(
            proxy_config(len(tok), target_h, p.layers, _special_ids(tok))))
        runs = Runs(domains=names, targets=[f"loss_{d}" for d in names],
                    R=np.array([[r[f"r_{d}"] for d in names] for r in rows]),
                    Y=np.array([[r[f"loss_{d}"] for d in names] for r in rows]),
                    steps=np.array([r["steps"] for r in rows], float),
                    params=np.array([r["params"] for r in rows], float))
        fit_from = cfg.step_fit_from if cfg.step_fit_from is not None else max(p.warmup, p.eval_every)
        Rn, Yn, nest_info = nest(runs, cfg.target_steps, float(tgt_params), fit_from=fit_from,
                                 tie_steps=cfg.law.tie_steps, tie_sizes=cfg.law.tie_sizes)
        order = [int(np.argmin(np.abs(Rn - r).sum(1))) for r in R]
        Rn, Yn = Rn[order], Yn[order]

        # (1) the law at proxy scale: fit on K - holdout measured mixtures, predict the held-out ones
        largest = max(p.sizes)
        meas = np.array([[rows_by[-1][f"loss_{d}"] for d in names] for rows_by in
                         ([r for r in rows if r["mixture"] == i and r["hidden"] == largest] for i in range(len(R)))])
        k_fit = cfg.mixtures - cfg.holdout
        held: dict[str, Any] = {}
        if cfg.holdout:
            pred_h = np.zeros((cfg.holdout, M))
            for t in range(M):
                f = fit_mix_law(R[:k_fit], meas[:k_fit, t], ridge=cfg.law.ridge, f_scale=cfg.law.f_scale)
                pred_h[:, t] = guarded_predict(f, R[k_fit:], clip_margin=cfg.law.clip_margin)[0]
            rel = np.abs(pred_h - meas[k_fit:]) / meas[k_fit:]
            loo = np.zeros_like(meas)  # leave-one-out over all K mixtures: a split-free view of the same error
            for i in range(len(R)):
                m = np.arange(len(R)) != i
                for t in range(M):
                    f = fit_mix_law(R[m], meas[m, t], ridge=cfg.law.ridge, f_scale=cfg.law.f_scale)
                    loo[i, t] = guarded_predict(f, R[i:i + 1], clip_margin=cfg.law.clip_margin)[0][0]
            loo_rel = np.abs(loo - meas) / meas
            held = {"fit_mixtures": k_fit, "holdout_mixtures": cfg.holdout, "size": largest, "steps": p.steps,
                    "mean_abs_rel_error": float(rel.mean()), "loo_mean_abs_rel_error": float(loo_rel.mean()),
                    "loo_per_domain_mare": {d: float(loo_rel[:, t].mean()) for t, d in enumerate(names)},
                    "seeds": p.seeds, "seed_sd": ({d: float(v) for d, v in zip(names, np.mean(sds, 0))}
                                                  if sds else None),
                    "per_domain_mare": {d: float(rel[:, t].mean()) for t, d in enumerate(names)},
                    "per_domain_mae": {d: mae(pred_h[:, t], meas[k_fit:, t]) for t, d in enumerate(names)},
                    "predicted": pred_h.tolist(), "measured": meas[k_fit:].tolist()}
            scatter_plot(run.plots / "holdout_pred_vs_measured.png",
                         {d: meas[k_fit:, t] for t, d in enumerate(names)},
                         {d: pred_h[:, t] for t, d in enumerate(names)}, diagonal=True,
                         title=f"held-out mixtures (fit on {k_fit}), hidden {largest}, step {p.steps}",
                         xlabel="measured loss", ylabel="predicted loss")

        # (2) the nested law (all mixtures, extrapolated to the target) -> optimum
        law = fit_laws(Rn, Yn, names, runs.targets, w, cfg.law, folds=0, bootstrap=0, seed=cfg.seed)
        fits = list(law_fits(law).values())
        r_opt, v_opt = optimize_mixture(fits, w, caps=caps, starts=Rn, lower=cfg.min_prop)
        uni = np.minimum(np.ones(M) / M, caps)
        uni = uni / uni.sum()
        pred_uni = float(sum(wi * f.predict(uni)[0] for wi, f in zip(w, fits)))
        law.update(mixtures=Rn.tolist(), optimum={"mixture": r_opt.tolist(), "predicted": v_opt},
                   nested={"target_steps": cfg.target_steps, "target_params": tgt_params, "target_hidden": target_h})
        run.save_json("law.json", law)
        _write_law_plots(run, law, Rn, Yn)
        results: dict[str, Any] = {
            "domains": names, "mixtures": R.tolist(), "proxy_sizes": p.sizes, "proxy_params": params_by_h,
            "proxy_steps": p.steps, "target_steps": cfg.target_steps, "target_hidden": target_h,
            "target_params": tgt_params, "proxy_seconds": round(proxy_seconds, 1), "holdout": held,
            "optimum": {"mixture": dict(zip(names, r_opt.tolist())), "predicted": v_opt,
                        "per_domain": {d: float(f.predict(r_opt)[0]) for d, f in zip(names, fits)}},
            "uniform": {"mixture": dict(zip(names, uni.tolist())), "predicted": pred_uni},
            "best_sampled_predicted": float(np.min(Yn @ w)), "caps": caps.tolist(),
            "fits": {d: {k: law["fits"][t][k] for k in ("c", "a", "k", "t", "rmse", "at_bound")}
                     for d, t in zip(names, runs.targets)},
        }
        # step/size law plots for the first mixture
        sf = [s for s in nest_info["step_fits"] if s["params"] == params_by_h[largest]][:M]
        if sf:
            xs = [r["steps"] for r in rows if r["mixture"] == 0 and r["hidden"] == largest]
            grid = np.linspace(min(xs), cfg.target_steps, 50)
            series = {f"{d} measured": [r[f"loss_{d}"] for r in rows if r["mixture"] == 0 and r["hidden"] == largest]
                      for d in names}
            xmap: dict[str, Any] = {k: xs for k in series}
            for s, d in zip(sf, names):
                series[f"{d} step law"] = power_law(grid, s["E"], s["B"], s["beta"]).tolist()
                xmap[f"{d} step law"] = grid.tolist()
            line_plot(run.plots / "step_law.png", xmap, series, title="step law (mixture 0, largest proxy)",
                      xlabel="step", ylabel="val loss")

        zf = nest_info["size_fits"][:M]  # size law of mixture 0, one per domain
        if zf:
            grid = np.geomspace(min(zf[0]["x"]), tgt_params, 50)
            series, xmap = {}, {}
            for s, d in zip(zf, names):
                series[f"{d} (step-extrapolated)"], xmap[f"{d} (step-extrapolated)"] = s["y"], s["x"]
                series[f"{d} size law"] = power_law(grid, s["E"], s["B"], s["beta"]).tolist()
                xmap[f"{d} size law"] = grid.tolist()
            line_plot(run.plots / "size_law.png", xmap, series, logx=True, xlabel="non-embedding parameters",
                      ylabel=f"val loss at step {cfg.target_steps}", title="size law (mixture 0)")

        # (3) verification at the target scale
        if cfg.verify:
            ver = {}
            for name, r in (("optimum", r_opt), ("uniform", uni)):
                rec = proxy(r, target_h, None)
                last = rec["evals"][-1]
                measured = float(sum(wi * last[d] for wi, d in zip(w, names)))
                pred = v_opt if name == "optimum" else pred_uni
                ev = [e for e in rec["evals"] if e["step"] >= fit_from]
                quarter = [e for e in ev if e["step"] <= cfg.target_steps // 4]
                step_err = None
                if len({e["step"] for e in quarter}) >= 3:
                    agg = np.array([sum(wi * e[d] for wi, d in zip(w, names)) for e in quarter])
                    pf = fit_power_law(np.array([e["step"] for e in quarter], float), agg, what="step law")
                    step_pred = float(pf.predict(cfg.target_steps))
                    step_err = {"fit_steps": [quarter[0]["step"], quarter[-1]["step"]], "predicted": step_pred,
                                "measured": measured, "rel_error": abs(step_pred - measured) / measured}
                ver[name] = {"measured": measured, "predicted": pred, "rel_error": abs(pred - measured) / measured,
                             "per_domain": {d: last[d] for d in names}, "step_law_from_quarter": step_err,
                             "seeds": rec["seeds"], "seed_sd": rec["seed_sd"]}
            ver["optimum_beats_uniform"] = ver["optimum"]["measured"] <= ver["uniform"]["measured"]
            results["verification"] = ver
        results["seconds"] = round(time.perf_counter() - t0, 1)
        run.finish(results)
    return run.path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    from lmlab.core.runs import atomic_write

    if not rows:
        return
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
    atomic_write(path, buf.getvalue())


# ====================================================================================================
# `lmlab data mix continual`: the critical proportion of original data


@dataclass
class ContinualConfig(RunArgs):
    """Continual pretraining: the smallest share of original data that keeps the original loss in tolerance."""

    model: str = "ref:dense"
    """The existing model (ref:NAME, HF name or path)."""
    original: list[str] = field(default_factory=lambda: ["code", "prose"])
    """Domains of the original data (mixed uniformly); their mean loss must stay within tolerance."""
    new: str = "math"
    """The new domain (a built-in name or a text/jsonl/parquet path)."""
    proportions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 0.75])
    """Shares of original data in the continual-pretraining mixtures (>= 3, for the 3-parameter law)."""
    tolerance: float = 0.02
    """Allowed increase of the original-domain loss over the model's loss before training (nats)."""
    steps: int = 100
    """Continual-pretraining steps per mixture."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 64
    """Tokens per sequence."""
    lr: float = 3e-4
    """Peak learning rate (about the reference recipe's final rate: re-warming a trained model costs loss)."""
    eval_every: int = 25
    """Evaluate every N steps."""
    eval_windows: int = 32
    """Validation windows per domain."""
    max_bytes: int = 1_000_000
    """Max text bytes per domain."""
    verify: bool = True
    """Train once more at the critical proportion and measure."""
    cache: str | None = None
    """Run cache (default: <lmlab cache>/mixing)."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.proportions)) < 3 or any(not 0 <= p <= 1 for p in self.proportions):
            raise ConfigError(f"give at least 3 distinct proportions in [0, 1], got {self.proportions}")
        if not self.original or self.new in self.original:
            raise ConfigError("original must be non-empty and must not contain the new domain")
        if self.tolerance < 0:
            raise ConfigError("tolerance must be >= 0")


def continual_main(cfg: ContinualConfig) -> Path:
    from tqdm.auto import tqdm

    from lmlab.core.corpus import cache_dir
    from lmlab.core.models import load_tokenizer
    from lmlab.core.plotting import line_plot
    from lmlab.core.pretrain import OptimConfig
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.core.zoo import token_streams

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    from lmlab.core.models import load_model

    load_model(cfg.model, "cpu", None, cfg.trust_remote_code)  # a missing model fails here, before the run dir
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    streams, vals = [], {}
    for d in [*cfg.original, cfg.new]:
        try:
            tr, va, _ = token_streams(tok, d, cfg.max_bytes, seed=cfg.seed)
        except LmlabError as e:
            raise LmlabError(f"domain {d!r} has no usable data: {e}") from None
        streams.append(tr)
        vals[d] = va
    orig = mix_stream(streams[:-1], np.ones(len(cfg.original)) / len(cfg.original), 400_000, cfg.seed)
    pair = [orig, streams[-1]]
    opt = OptimConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                      warmup=min(10, cfg.steps), eval_every=cfg.eval_every,
                      eval_batches=max(1, cfg.eval_windows // cfg.batch_size), log_every=10 ** 9)
    cache = Path(cfg.cache) if cfg.cache else cache_dir() / "mixing"
    base = {"model": cfg.model, "orig": cfg.original, "new": cfg.new, "opt": dataclasses.asdict(opt),
            "seed": cfg.seed, "max_bytes": cfg.max_bytes, "ev": cfg.eval_windows}

    def one(p: float) -> dict[str, Any]:
        return train_proxy(cache / ("cpt-" + _key({**base, "p": round(p, 8)})), mixture=np.array([p, 1 - p]),
                           hidden=0, layers=0, tok=tok, streams=pair, vals=vals, opt=opt, stop_after=None,
                           stream_tokens=400_000, seed=cfg.seed, eval_windows_n=cfg.eval_windows, device=dev,
                           init_from=cfg.model)

    def orig_loss(e: dict[str, float]) -> float:
        return float(np.mean([e[d] for d in cfg.original]))

    with start_run(cfg, "data-mix-continual", device=dev, dtype=dtype, threads=threads) as run:
        ps = sorted(set(cfg.proportions))
        recs = {p: one(p) for p in tqdm(ps, desc="continual runs", unit="run")}
        before = orig_loss(recs[ps[0]]["evals"][0])
        y_orig = np.array([orig_loss(recs[p]["evals"][-1]) for p in ps])
        y_new = np.array([recs[p]["evals"][-1][cfg.new] for p in ps])
        R = np.array([[p, 1 - p] for p in ps])
        f_orig = fit_mix_law(R, y_orig)
        f_new = fit_mix_law(R, y_new)
        thr = before + cfg.tolerance
        p_star = critical_proportion(f_orig, thr)
        res: dict[str, Any] = {"model": cfg.model, "original": cfg.original, "new": cfg.new,
                               "loss_before": {"original": before, "new": recs[ps[0]]["evals"][0][cfg.new]},
                               "threshold": thr, "proportions": ps, "original_loss": y_orig.tolist(),
                               "new_loss": y_new.tolist(), "law_original": f_orig.to_dict(),
                               "law_new": f_new.to_dict(), "critical_proportion": p_star}
        if cfg.verify and p_star is not None:
            rec = one(p_star)
            res["verification"] = {"proportion": p_star, "original_loss": orig_loss(rec["evals"][-1]),
                                   "predicted_original_loss": float(f_orig.predict(np.array([p_star, 1 - p_star]))[0]),
                                   "new_loss": rec["evals"][-1][cfg.new],
                                   "within_tolerance": orig_loss(rec["evals"][-1]) <= thr + 1e-9}
        grid = np.linspace(0, 1, 101)
        G = np.stack([grid, 1 - grid], 1)
        line_plot(run.plots / "critical_proportion.png", {"original (law)": grid, "new (law)": grid,
                                                           "original (measured)": ps, "new (measured)": ps,
                                                           "threshold": [0, 1]},
                  {"original (law)": f_orig.predict(G).tolist(), "new (law)": f_new.predict(G).tolist(),
                   "original (measured)": y_orig.tolist(), "new (measured)": y_new.tolist(),
                   "threshold": [thr, thr]}, title=f"continual pretraining on {cfg.new}: critical share "
                  + (f"{p_star:.3f}" if p_star is not None else "none"),
                  xlabel="share of original data", ylabel="val loss")
        run.finish(res)
    return run.path


# ====================================================================================================
# tour


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """``lmlab tour`` section: a small nested pipeline on code/prose/math (cached proxies; --full: 3 sizes)."""
    if cfg.full:
        rc = RunConfig(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    else:
        rc = RunConfig(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads,
                       max_bytes=1_000_000, mixtures=6, holdout=2, target_steps=120, target_size=None,
                       proxy=ProxyOptions(sizes=[32], steps=40, eval_every=10, eval_windows=16,
                                          stream_tokens=150_000))
    path = run_main(rc)
    r = json.loads((path / "results.json").read_text())
    opt = ", ".join(f"{d} {v:.2f}" for d, v in r["optimum"]["mixture"].items())
    lines = [f"{len(r['mixtures'])} proxy mixtures x sizes {r['proxy_sizes']} ({r['proxy_steps']} of "
             f"{r['target_steps']} steps), law fitted per domain on step/size-extrapolated losses."]
    if r.get("holdout"):
        h = r["holdout"]
        lines.append(f"Held-out mixtures ({h['holdout_mixtures']}, fit on {h['fit_mixtures']}): mean |rel. error| "
                     f"{100 * h['mean_abs_rel_error']:.2f}%.")
    lines.append(f"Optimum: {opt}; predicted loss {r['optimum']['predicted']:.3f}.")
    v = r.get("verification")
    if v:
        lines.append(f"Verification (hidden {r['target_hidden']}, {r['target_steps']} steps): optimum measured "
                     f"{v['optimum']['measured']:.3f} (pred {v['optimum']['predicted']:.3f}) vs uniform "
                     f"{v['uniform']['measured']:.3f} (pred {v['uniform']['predicted']:.3f}).")
    return path, "\n".join(lines)
