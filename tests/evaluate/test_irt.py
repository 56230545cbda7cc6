"""Rasch/IRT: published LSAT-6 anchors (eRm CML, ltm MML), recovery, detectors, commands."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from lmlab.errors import LmlabError
from lmlab.evaluate import irt

LSAT_CML_B = [-1.2561, 0.4749, 1.2360, 0.1684, -0.6232]
LSAT_CML_SE = [0.1044, 0.0699, 0.0688, 0.0726, 0.0859]


@pytest.fixture(scope="module")
def lsat():
    return irt.lsat6()


@pytest.fixture(scope="module")
def lsat_cml(lsat):
    return irt.cml_fit(lsat)


def test_lsat6_matrix(lsat):
    assert lsat.shape == (1000, 5)
    np.testing.assert_allclose(lsat.mean(0), [0.924, 0.709, 0.553, 0.763, 0.870], atol=1e-3)


def test_cml_lsat6_matches_erm(lsat_cml):
    np.testing.assert_allclose(lsat_cml.b, LSAT_CML_B, atol=5e-4)
    np.testing.assert_allclose(lsat_cml.se, LSAT_CML_SE, atol=5e-4)
    assert lsat_cml.loglik == pytest.approx(-1091.570, abs=5e-4)
    assert abs(lsat_cml.b.sum()) < 1e-10
    assert lsat_cml.iterations <= 8


def test_person_mle_wle_lsat6(lsat_cml):
    pats = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], float)
    th, se = irt.person_mle(pats, lsat_cml.b)
    np.testing.assert_allclose(th, [-1.6015, -0.4743, 0.4809, 1.5999], atol=1e-3)
    np.testing.assert_allclose(se, [1.1811, 0.9898, 0.9874, 1.1768], atol=1e-3)
    wle, _ = irt.person_mle(pats, lsat_cml.b, wle=True)
    np.testing.assert_allclose(wle, [-1.3376, -0.4115, 0.4219, 1.3357], atol=1e-3)
    # extremes: MLE infinite, WLE finite and ordered
    ext = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], float)
    th_e, _ = irt.person_mle(ext, lsat_cml.b)
    assert np.isneginf(th_e[0]) and np.isposinf(th_e[1])
    w_e, _ = irt.person_mle(ext, lsat_cml.b, wle=True)
    assert np.all(np.isfinite(w_e)) and w_e[0] < wle[0] and w_e[1] > wle[-1]


def test_item_fit_lsat6_matches_erm(lsat, lsat_cml):
    th, _ = irt.person_mle(lsat, lsat_cml.b)
    th = np.where(np.isfinite(th), th, np.nan)  # non-extreme persons only
    f = irt.fit_stats(lsat, th, lsat_cml.b, axis=0)
    assert list(f["n"]) == [699] * 5
    np.testing.assert_allclose(f["outfit"], [0.801, 0.958, 0.949, 0.944, 0.872], atol=1e-3)
    np.testing.assert_allclose(f["infit"], [0.828, 0.968, 0.973, 0.954, 0.895], atol=1e-3)
    np.testing.assert_allclose(f["outfit_t"], [-1.820, -1.116, -1.252, -1.248, -1.692], atol=2e-3)
    np.testing.assert_allclose(f["infit_t"], [-2.293, -0.992, -1.033, -1.236, -1.904], atol=2e-3)


def test_mml_lsat6_sigma_free_matches_ltm(lsat):
    m = irt.mml_fit(lsat)
    assert m.converged
    assert m.loglik == pytest.approx(-2466.938, abs=1e-3)
    np.testing.assert_allclose(m.ltm_difficulty, [-3.6153, -1.3224, -0.3176, -1.7301, -2.7802], atol=1e-3)
    assert m.ltm_discrimination == pytest.approx(0.7551, abs=1e-3)
    np.testing.assert_allclose(m.b, [-2.7300, -0.9986, -0.2399, -1.3065, -2.0994], atol=1e-3)
    assert 0 < m.se_sigma < 0.2


def test_mml_lsat6_sigma_fixed(lsat):
    m = irt.mml_fit(lsat, sigma=1.0)
    assert m.loglik == pytest.approx(-2473.054, abs=1e-3)
    np.testing.assert_allclose(m.b, [-2.872, -1.063, -0.2576, -1.3881, -2.2188], atol=1e-3)
    np.testing.assert_allclose(m.se_b, [0.1287, 0.0821, 0.0766, 0.0865, 0.1048], atol=2e-3)
    # EAP is monotone in the raw score
    r = lsat.sum(1)
    assert np.all(np.diff([m.theta_eap[r == k].mean() for k in range(6)]) > 0)


def test_jml_lsat6_and_short_test_warning(lsat):
    r = lsat.sum(1)
    X = lsat[(r > 0) & (r < 5)]
    with pytest.warns(UserWarning, match="short tests"):
        j = irt.jml_fit(X)
    np.testing.assert_allclose(j.b, [-1.5488, 0.5614, 1.6286, 0.1653, -0.8065], atol=1e-3)
    np.testing.assert_allclose(j.b_corrected, [-1.239, 0.449, 1.303, 0.132, -0.645], atol=1e-3)


def _simulate(rng, N, L, lo=-2, hi=2):
    b = rng.uniform(lo, hi, L)
    th = rng.normal(0, 1, N)
    X = (rng.random((N, L)) < irt.sigmoid(th[:, None] - b[None, :])).astype(float)
    return X, b - b.mean(), th


def test_cml_recovery_and_ci_coverage():
    rng = np.random.default_rng(0)
    cover, rmse = [], []
    for _ in range(50):
        X, b, _ = _simulate(rng, 500, 40)
        r = irt.cml_fit(X)
        rmse.append(np.sqrt(np.mean((r.b - b) ** 2)))
        cover.append(np.mean(np.abs(r.b - b) <= 1.96 * r.se))
    assert max(rmse) < 0.15
    assert 0.90 <= np.mean(cover) <= 0.98


def test_cml_ties_missing_and_girth_like_scale():
    """Equal item scores (ties) and missing-by-pattern data: SEs finite, ties get equal b."""
    rng = np.random.default_rng(1)
    X, b, _ = _simulate(rng, 60, 80)
    _, ki, _ = irt.drop_extremes(X, persons=False)
    X = X[:, ki]
    X[:, 1] = X[:, 0]  # an exact duplicate item
    r = irt.cml_fit(X)
    assert r.b[0] == pytest.approx(r.b[1], abs=1e-8)
    assert np.all(np.isfinite(r.se)) and np.all(r.se > 0)
    # the Hessian-based SEs agree with a finite-difference Hessian of the conditional log-likelihood
    T = irt._sum0_T(X.shape[1])
    h = 1e-4
    n = 4
    fd = np.zeros((n, n))
    def f(i, j, di, dj):
        bb = r.b.copy()
        bb += T[:, i] * di + T[:, j] * dj
        return irt.cml_loglik(X, bb)

    for i in range(n):
        for j in range(n):
            fd[i, j] = (f(i, j, h, h) - f(i, j, h, -h) - f(i, j, -h, h) + f(i, j, -h, -h)) / (4 * h * h)
    _, _, H = irt._cml_parts(r.b, [(None, *g[1:]) for g in _grp(X)])
    np.testing.assert_allclose((T.T @ H @ T)[:n, :n], fd, rtol=1e-3, atol=1e-3)
    # missing by design: two booklets sharing 10 items
    Xm = X.copy()
    Xm[:30, 40:] = np.nan
    Xm[30:, 10:40] = np.nan
    _, ki2, _ = irt.drop_extremes(Xm, persons=False)
    rm = irt.cml_fit(Xm[:, ki2])
    assert np.all(np.isfinite(rm.se)) and abs(rm.b.sum()) < 1e-8


def _grp(X):
    out = []
    for persons, items in irt._groups(X):
        Xg = X[np.ix_(persons, items)]
        rr = Xg.sum(1).astype(int)
        keep = (rr > 0) & (rr < len(items))
        out.append((persons, items, np.bincount(rr[keep], minlength=len(items) + 1).astype(float), Xg[keep].sum(0)))
    return out


def test_cml_rejects_extremes_and_nonbinary():
    X = np.array([[1, 0, 1], [1, 1, 0], [1, 0, 0]], float)  # item 0 all correct
    with pytest.raises(LmlabError, match="extreme"):
        irt.cml_fit(X)
    with pytest.raises(LmlabError, match="0/1"):
        irt.cml_fit(X * 2)


def test_drop_extremes_iterative():
    X = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 1, 1], [1, 1, 0, 0, 0]], float)
    kp, ki, ex = irt.drop_extremes(X)
    assert ex.items_all_max == [0] and ex.persons_all_max == [2]
    assert ex.items_all_zero == [] and ex.persons_all_zero == []
    assert ki.tolist() == [False, True, True, True, True] and kp.tolist() == [True, True, False, True, True]
    # a degenerate matrix cascades to nothing (reported, not a crash)
    kp2, ki2, ex2 = irt.drop_extremes(np.array([[1, 1, 0], [1, 0, 0]], float))
    assert not ki2.any() or not kp2.any()


def test_mml_binomial_recovery():
    rng = np.random.default_rng(3)
    N, L, K = 300, 20, 5
    b = np.linspace(-1.5, 1.5, L)
    th = rng.normal(0, 1.2, N)
    X = rng.binomial(K, irt.sigmoid(th[:, None] - b[None, :])).astype(float)
    m = irt.mml_fit(X, K=K, n_nodes=61)
    assert np.sqrt(np.mean((m.b - b) ** 2)) < 0.1
    assert m.sigma == pytest.approx(1.2, abs=0.15)


def test_jml_binomial_recovers():
    rng = np.random.default_rng(4)
    N, L, K = 200, 40, 4
    b = np.linspace(-1.5, 1.5, L)
    th = rng.normal(0, 1, N)
    X = rng.binomial(K, irt.sigmoid(th[:, None] - b[None, :])).astype(float)
    kp, ki, _ = irt.drop_extremes(X, K)
    j = irt.jml_fit(X[np.ix_(kp, ki)], K=K)
    assert np.corrcoef(j.b, b[ki])[0, 1] > 0.98


def test_pcm_reduces_to_rasch_on_binary(lsat, lsat_cml):
    p = irt.pcm_fit(lsat)
    np.testing.assert_allclose([t[0] for t in p.thresholds], lsat_cml.b, atol=1e-4)
    np.testing.assert_allclose([s[0] for s in p.se], lsat_cml.se, atol=2e-3)
    assert p.loglik == pytest.approx(lsat_cml.loglik, abs=1e-4)


def test_pcm_recovers_thresholds():
    rng = np.random.default_rng(5)
    N, L = 800, 6
    taus = np.array([[-1.0, 0.5], [-0.5, 0.0], [0.0, 0.8], [-1.2, -0.2], [0.3, 1.0], [-0.4, 0.4]])
    taus -= taus.mean()
    th = rng.normal(0, 1, N)
    X = np.zeros((N, L))
    for i in range(L):
        logits = np.stack([np.zeros(N), th - taus[i, 0], 2 * th - taus[i, 0] - taus[i, 1]], 1)
        pr = np.exp(logits - logits.max(1, keepdims=True))
        pr /= pr.sum(1, keepdims=True)
        X[:, i] = (rng.random(N)[:, None] > pr.cumsum(1)).sum(1)
    p = irt.pcm_fit(X)
    est = np.array(p.thresholds)
    assert np.sqrt(np.mean((est - taus) ** 2)) < 0.2
    assert np.all(np.abs(est - taus) < 4 * np.array(p.se) + 0.05)


def test_andersen_lr_detects_dif():
    rng = np.random.default_rng(6)
    X, b, _ = _simulate(rng, 1000, 10)
    ok = irt.andersen_lr(X)
    assert ok["df"] == 9 and ok["p"] > 0.001
    # item 0 much easier for the second half of persons (DIF by group)
    g = np.r_[np.zeros(500), np.ones(500)].astype(int)
    th = rng.normal(0, 1, 1000)
    bb = np.tile(b, (1000, 1))
    bb[500:, 0] -= 2.0
    Xd = (rng.random((1000, 10)) < irt.sigmoid(th[:, None] - bb)).astype(float)
    bad = irt.andersen_lr(Xd, groups=g)
    assert bad["p"] < 1e-6


def test_lsat_andersen_median_split(lsat):
    res = irt.andersen_lr(lsat)
    assert res["df"] == 4 and np.isfinite(res["lr"]) and res["lr"] >= 0


# --------------------------------------------------------------------------------------------------------------
# detectors


@pytest.fixture(scope="module")
def detector_cases():
    """The spec's synthetic cases: 300 items, b ~ N(0, 1.5), RandomState(0)."""
    rs = np.random.RandomState(0)
    b = rs.normal(0, 1.5, 300)
    consistent = (rs.random_sample(300) < irt.sigmoid(0.5 - b)).astype(float)
    invariant = (rs.random_sample(300) < 0.6).astype(float)
    flattened = (rs.random_sample(300) < irt.sigmoid(0.3 * (0.5 - b))).astype(float)
    return b, {"consistent": consistent, "invariant": invariant, "flattened": flattened}


def test_detector_d1_classifies_synthetic_models(detector_cases):
    b, cases = detector_cases
    res = {k: irt.d1_model(x, b, n_boot=100, n_null=50, seed=0) for k, x in cases.items()}
    assert res["consistent"]["label"] == "rasch_consistent"
    assert res["invariant"]["label"] == "difficulty_invariant"
    assert res["flattened"]["label"] == "flattened"
    # the spec's table, with wide tolerances
    assert res["consistent"]["a"] == pytest.approx(0.89, abs=0.3)
    assert res["invariant"]["a"] == pytest.approx(0.0, abs=0.15)
    assert res["flattened"]["a"] == pytest.approx(0.23, abs=0.15)
    assert res["consistent"]["spearman"] < -0.35 and abs(res["invariant"]["spearman"]) < 0.15
    assert res["invariant"]["infit"] > 1.5 and res["consistent"]["infit"] < 1.2
    assert res["invariant"]["lz"] < -8 and res["consistent"]["lz"] > -3
    assert res["invariant"]["guttman"] > res["flattened"]["guttman"] > res["consistent"]["guttman"]
    assert res["invariant"]["r2"] < res["consistent"]["r2"]
    # null reference brackets the consistent model's ρ but not the invariant model's
    lo, _, hi = res["invariant"]["null_2.5_50_97.5"]["spearman"]
    assert not lo <= res["invariant"]["spearman"] <= hi


def test_detector_d2_overdispersion():
    rng = np.random.default_rng(7)
    M, L = 8, 200
    b = rng.normal(0, 1.5, L)
    th = np.linspace(-1, 1, M)
    X = (rng.random((M, L)) < irt.sigmoid(th[:, None] - b[None, :])).astype(float)
    ok = irt.d2_bins(X, th, b, n_null=50)
    assert 0.8 < ok["phi_overall"] < 1.2
    # high variance at similar difficulty: responses unrelated to b within bins
    Xn = (rng.random((M, L)) < 0.5).astype(float)
    bad = irt.d2_bins(Xn, th, b, n_null=50)
    assert bad["phi_overall"] > 1.5
    assert sum(bb["p"] < 0.01 for bb in bad["bins"]) >= len(bad["bins"]) // 2
    assert abs(bad["top_cells"][0]["z"]) >= abs(bad["top_cells"][-1]["z"])


def test_bradley_terry_recovers_order():
    rng = np.random.default_rng(8)
    true = np.linspace(-2, 2, 12)
    names = [f"q{i}" for i in range(12)]
    pairs = []
    for _ in range(600):
        i, j = rng.choice(12, 2, replace=False)
        pi = irt.sigmoid(true[i] - true[j])
        pairs.append((names[i], names[j]) if rng.random() < pi else (names[j], names[i]))
    bt = irt.bradley_terry(pairs)
    from scipy.stats import spearmanr

    assert spearmanr([bt[n] for n in names], true)[0] > 0.9


# --------------------------------------------------------------------------------------------------------------
# commands


def _write_matrix(path, rng, M=6, L=40, allcorrect=True):
    b = np.linspace(-2, 2, L)
    th = np.linspace(-1.5, 1.5, M)
    X = (rng.random((M, L)) < irt.sigmoid(th[:, None] - b[None, :])).astype(float)
    items = [f"i{k}" for k in range(L)]
    if allcorrect:
        X[:, 0] = 1.0
    meta = {it: {"difficulty": float(b[k]), "subject": "math", "type": "fill_blank",
                 "mean_reasoning_tokens": float(50 + 20 * k)} for k, it in enumerate(items)}
    m = irt.Matrix(X, np.ones_like(X), [f"m{v}" for v in range(M)], items, meta)
    path.write_text(json.dumps(m.to_json()))
    return path


def test_fit_diagnose_report_commands(tmp_path):
    rng = np.random.default_rng(9)
    mp = _write_matrix(tmp_path / "matrix.json", rng)
    run = irt.fit_main(irt.IrtFitConfig(matrix=str(mp), out=str(tmp_path / "fit")))
    res = json.loads((run / "irt.json").read_text())
    dropped = res["dropped"]["items_all_correct"] + res["dropped"]["items_all_wrong"]
    assert "i0" in res["dropped"]["items_all_correct"]  # reported, not a crash
    assert res["n_items"] == 40 - len(dropped) and not {i["id"] for i in res["items"]} & set(dropped)
    assert (run / "plots" / "wright_map.png").is_file() and (run / "plots" / "icc.png").is_file()
    ths = [p["theta"] for p in res["persons"]]
    assert np.all(np.isfinite(ths))
    pairs = tmp_path / "pairs.jsonl"
    order = [f"i{k}" for k in range(40)]  # i39 hardest
    pr = [(order[j], order[i]) for i in range(40) for j in range(i + 1, min(i + 6, 40))]
    pairs.write_text("".join(json.dumps({"harder": h, "easier": e}) + "\n" for h, e in pr))
    cfg = irt.IrtDiagnoseConfig(matrix=str(mp), difficulty=["human", "irt", "tokens", "elo"], pairs=str(pairs),
                                n_boot=10, n_null=10, out=str(tmp_path / "diag"))
    run2 = irt.diagnose_main(cfg)
    d = json.loads((run2 / "diagnose.json").read_text())
    assert set(d["sources"]) == {"human", "irt", "tokens", "elo"}
    assert d["source_correlations"]["elo~human"] > 0.95
    assert d["sources"]["human"]["calibration"]["beta"] > 0
    assert d["source_correlations"]["human~tokens"] == pytest.approx(1.0)
    assert (run2 / "plots" / "model_curves_human.png").is_file()
    run3 = irt.report_main(irt.IrtReportConfig(runs=[str(run), str(run2)], out=str(tmp_path / "rep")))
    text = (run3 / "report.md").read_text()
    assert f"Dropped extreme items: {len(res['dropped']['items_all_correct'])} all-correct" in text
    assert "D2 over-dispersion" in text
    assert (run3 / "report.html").is_file()


def test_fit_methods_on_matrix(tmp_path):
    rng = np.random.default_rng(10)
    mp = _write_matrix(tmp_path / "m.json", rng, M=30, L=35, allcorrect=False)
    m = irt.load_matrix(mp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {meth: irt.fit_matrix(m, meth) for meth in ("cml", "mml", "jml")}
    bc = np.array([i["b"] for i in out["cml"]["items"]])
    bm = np.array([i["b"] for i in out["mml"]["items"]])
    assert np.corrcoef(bc, bm)[0, 1] > 0.99
    assert out["jml"]["warnings"] == [] or "short" not in out["jml"]["warnings"][0]


def test_bad_matrix_inputs(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("model,a,b\nm1,1,0\nm2,1\n")
    with pytest.raises(LmlabError, match=r"bad.csv:3"):
        irt.load_matrix(p)
    p.write_text("model,a,b\nm1,1,1\nm2,1,1\n")
    with pytest.raises(LmlabError, match="fewer than 2 non-extreme items"):
        irt.fit_matrix(irt.load_matrix(p))
    with pytest.raises(LmlabError, match="not found"):
        irt.load_matrix(tmp_path / "nope.json")


def test_diagnose_binomial_irt_source_on_scale():
    """K samples per cell: the `irt` source is fit with the binomial likelihood, so slopes stay near 1."""
    rng = np.random.default_rng(0)
    M, L, K = 12, 60, 5
    b = np.linspace(-2, 2, L)
    th = np.linspace(-1.5, 1.5, M)
    X = rng.binomial(K, irt.sigmoid(th[:, None] - b[None, :])).astype(float)
    m = irt.Matrix(X, np.full(X.shape, float(K)), [f"m{i}" for i in range(M)], [f"i{j}" for j in range(L)],
                   kind="binomial")
    src = irt.difficulty_source("irt", m, m.values, m.K)
    assert np.corrcoef(src, b)[0, 1] > 0.95
    d = irt.diagnose(m, {"irt": src}, binarize=None, n_boot=10, n_null=10)
    slopes = [v["a"] for v in d["sources"]["irt"]["d1"].values()]
    assert 0.8 < np.median(slopes) < 1.25
    assert 0.8 < d["sources"]["irt"]["d2"]["phi_overall"] < 1.2


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("sigma", [None, 1.0])
def test_mml_analytic_hessian_matches_finite_differences(missing, sigma):
    rng = np.random.default_rng(11)
    N, L, K = 150, 6, 3
    b = np.linspace(-1, 1, L)
    X = rng.binomial(K, irt.sigmoid(rng.normal(0, 1, N)[:, None] - b[None, :])).astype(float)
    if missing:
        X[rng.random(X.shape) < 0.1] = np.nan
    pat, Kp, cnt, _ = irt._collapse(X, np.full(X.shape, float(K)))
    z, w = irt.gh_nodes(21)
    bc = np.zeros(len(pat))
    prm = b + 0.1 if sigma else np.append(b + 0.1, 0.2)
    H = irt._mml_terms(prm, pat, Kp, cnt, z, w, sigma, bc, hessian=True)[3]
    fd = irt._fd_hessian(lambda q: irt._mml_terms(q, pat, Kp, cnt, z, w, sigma, bc)[1], prm)
    np.testing.assert_allclose(H, fd, atol=1e-5 * np.abs(fd).max())


# ---------------------------------------------------------------------------------------------------------------
# quadrature rules and the comparison with girth (benchmarks/irt.py: girth_agreement)


def _marginal_loglik(X, b, z, w):
    """Independent marginal log-likelihood of a Rasch model with θ ~ N(0, 1) on nodes z, weights w."""
    eta = z[:, None] - np.asarray(b)[None, :]
    lp = -np.logaddexp(0, -eta)
    lq = -np.logaddexp(0, eta)
    L = X @ lp.T + (1 - X) @ lq.T
    m = L.max(1, keepdims=True)
    return float((np.log(np.exp(L - m) @ w) + m[:, 0]).sum())


def test_legendre_nodes_integrate_the_normal():
    z, w = irt.legendre_nodes(41, (-4.5, 4.5))
    assert z.shape == w.shape == (41,) and z.min() > -4.5 and z.max() < 4.5
    assert w.sum() == pytest.approx(1.0)
    assert w @ z == pytest.approx(0.0, abs=1e-12) and w @ z ** 2 == pytest.approx(1.0, abs=1e-3)
    assert w @ z ** 4 == pytest.approx(3.0, abs=2e-2)


def test_mml_legendre_maximises_the_marginal_likelihood(lsat):
    z, w = irt.legendre_nodes(41, (-4.5, 4.5))
    b = irt.mml_fit(lsat, sigma=1.0, n_nodes=41, quadrature="legendre").b
    ll = _marginal_loglik(lsat, b, z, w)
    h = 1e-4
    for i in range(lsat.shape[1]):  # stationary in every coordinate (central differences of an independent ll)
        e = np.zeros_like(b)
        e[i] = h
        g = (_marginal_loglik(lsat, b + e, z, w) - _marginal_loglik(lsat, b - e, z, w)) / (2 * h)
        assert abs(g) < 1e-3
        assert _marginal_loglik(lsat, b + 10 * e, z, w) < ll and _marginal_loglik(lsat, b - 10 * e, z, w) < ll
    # girth 0.8's fixed-discrimination estimator matches each item's marginal p-value instead; it is a different
    # point with a lower marginal likelihood
    from scipy.optimize import brentq

    mom = np.array([brentq(lambda t, p=p: irt.sigmoid(z - t) @ w - p, -20, 20) for p in lsat.mean(0)])
    assert np.abs(mom - b).max() > 5e-3 and _marginal_loglik(lsat, mom, z, w) < ll - 1e-3


def test_mml_quadrature_rules_agree_on_a_short_test(lsat):
    gh = irt.mml_fit(lsat, sigma=1.0).b
    leg = irt.mml_fit(lsat, sigma=1.0, n_nodes=41, quadrature="legendre").b
    np.testing.assert_allclose(gh, leg, atol=1e-3)


def test_mml_unknown_quadrature_is_an_error(lsat):
    from lmlab.config import ConfigError

    with pytest.raises(LmlabError, match="quadrature"):
        irt.mml_fit(lsat, quadrature="simpson")
    with pytest.raises(ConfigError, match="quadrature"):
        irt.IrtFitConfig(matrix="x.csv", method="mml", quadrature="simpson")


def test_girth_rasch_mml_is_the_marginal_moment_estimator(lsat):
    girth = pytest.importorskip("girth")
    from scipy.optimize import brentq

    z, w = irt.legendre_nodes(41, (-4.5, 4.5))  # girth's default quadrature
    g = np.asarray(girth.rasch_mml(lsat.T.astype(int), discrimination=1)["Difficulty"], float)
    mom = np.array([brentq(lambda t, p=p: irt.sigmoid(z - t) @ w - p, -20, 20) for p in lsat.mean(0)])
    np.testing.assert_allclose(g, mom, atol=2e-4)  # girth: fminbound xtol 1e-4
    b = irt.mml_fit(lsat, sigma=1.0, n_nodes=41, quadrature="legendre").b
    assert _marginal_loglik(lsat, b, z, w) > _marginal_loglik(lsat, g, z, w)
