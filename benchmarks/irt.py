"""IRT + exam benchmark: lmlab's Rasch fits vs `girth` on the same matrices; exam runner vs lm-eval.

    python benchmarks/irt.py [--reps 3] [--threads 1] [--skip-lmeval] [--out benchmarks/results/irt.json]

* **Fit time and agreement** on simulated Rasch matrices (b ~ U(-2, 2), θ ~ N(0, 1), seed 0), extreme items
  dropped first, both libraries timed in one process, interleaved, best of ``--reps``:
  - CML: ``lmlab.evaluate.irt.cml_fit`` (Newton, exact Hessian, SEs) vs ``girth.rasch_conditional`` (no SEs);
    girth's b is centred to sum 0 before comparing.
  - MML: ``lmlab.evaluate.irt.mml_fit(sigma=1)`` (21-node Gauss-Hermite, Newton, observed-information SEs) vs
    ``girth.rasch_mml`` (discrimination 1); the max difference is reported.
* **Equal-quadrature agreement** (``girth_agreement``): girth 0.8's ``rasch_mml`` with a fixed discrimination does
  *not* maximise the marginal likelihood: it makes one pass of ``_mml_abstract``, which sets each item's b so the
  model's marginal proportion correct, ∫ σ(θ - b) φ(θ) dθ over 41 Gauss-Legendre nodes on [-4.5, 4.5], equals
  the observed proportion (``fminbound``, xtol 1e-4). With girth's quadrature we therefore compare (a) that
  marginal-moment estimator re-implemented here vs girth (same algorithm: agreement ~1e-4, girth's xtol),
  (b) ``mml_fit(quadrature="legendre", n_nodes=41)`` vs an independent maximiser of the same marginal likelihood
  (torch L-BFGS with autograd; same algorithm: ~1e-8), (c) the marginal log-likelihood, under girth's own
  quadrature, at girth's b and at lmlab's b (lmlab's is higher: girth's point is not the MML maximum), and
  (d) lmlab MML vs girth at equal quadrature (different estimators: the gap shrinks with persons).
* **Exam runner items/s**: ``lmlab eval exam`` vs ``lm_eval`` (``generate_until`` on a local JSONL task) on the
  same model (``ref:dense``), the same built-in math items, the same greedy budget, one thread. Skipped when
  ``lm_eval`` is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: one BLAS thread (2-core box shared)

import numpy as np  # noqa: E402


def simulate(N: int, L: int, seed: int = 0) -> np.ndarray:
    from lmlab.evaluate import irt

    rng = np.random.default_rng(seed)
    b = rng.uniform(-2, 2, L)
    th = rng.normal(0, 1, N)
    X = (rng.random((N, L)) < irt.sigmoid(th[:, None] - b[None, :])).astype(float)
    _, ki, _ = irt.drop_extremes(X, persons=False)
    return X[:, ki]


def best(fn, reps: int) -> tuple[float, object]:
    t, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def fit_bench(shapes: list[tuple[int, int]], reps: int) -> list[dict]:
    import girth

    from lmlab.evaluate import irt

    rows = []
    for L, N in shapes:
        X = simulate(N, L)
        Xi = X.T.astype(int)  # girth wants items x persons
        t_cml, r = best(lambda: irt.cml_fit(X), reps)  # noqa: B023
        t_gc, g = best(lambda: girth.rasch_conditional(Xi), reps)  # noqa: B023
        gb = np.asarray(g["Difficulty"] if isinstance(g, dict) else g, float)
        gb = gb - gb.mean()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the coarse-quadrature warning is the point of the 61-node column
            t_mml, m = best(lambda: irt.mml_fit(X, sigma=1.0), reps)  # noqa: B023
        t_gm, gm = best(lambda: girth.rasch_mml(Xi, discrimination=1), reps)  # noqa: B023
        gmb = np.asarray(gm["Difficulty"], float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m61 = irt.mml_fit(X, sigma=1.0, n_nodes=61)
        rows.append({"items": X.shape[1], "persons": N,
                     "cml_s": round(t_cml, 4), "girth_cml_s": round(t_gc, 4),
                     "cml_ratio_lmlab_over_girth": round(t_cml / t_gc, 3),
                     "cml_max_abs_diff": float(np.max(np.abs(gb - r.b))), "cml_iterations": r.iterations,
                     "mml_s": round(t_mml, 4), "girth_mml_s": round(t_gm, 4),
                     "mml_ratio_lmlab_over_girth": round(t_mml / t_gm, 3),
                     "mml_max_abs_diff": float(np.max(np.abs(gmb - m.b))),
                     "mml61_max_abs_diff": float(np.max(np.abs(gmb - m61.b))),
                     "mml21_vs_61_max_abs_diff": float(np.max(np.abs(m.b - m61.b)))})
        print(rows[-1], flush=True)
    return rows


def lsat_check() -> dict:
    import girth

    from lmlab.evaluate import irt

    X = irt.lsat6()
    r = irt.cml_fit(X)
    g = girth.rasch_conditional(X.T.astype(int))
    gb = np.asarray(g["Difficulty"] if isinstance(g, dict) else g, float)
    m = irt.mml_fit(X, sigma=1.0)
    gm = np.asarray(girth.rasch_mml(X.T.astype(int), discrimination=1)["Difficulty"], float)
    return {"cml_lmlab": np.round(r.b, 4).tolist(), "cml_girth": np.round(gb - gb.mean(), 4).tolist(),
            "mml_sigma1_lmlab": np.round(m.b, 4).tolist(), "mml_girth": np.round(gm, 4).tolist(),
            "mml_ltm_published": [-2.872, -1.063, -0.2576, -1.3881, -2.2188]}


def marginal_moment_b(X: np.ndarray, z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """girth's fixed-discrimination "MML" estimator: b_i solving Σ_q w_q σ(z_q - b_i) = mean_v x_vi."""
    from scipy.optimize import brentq

    from lmlab.evaluate import irt

    return np.array([brentq(lambda b: float(irt.sigmoid(z - b) @ w) - p, -30, 30, xtol=1e-12)  # noqa: B023
                     for p in np.nanmean(X, 0)])


def torch_mml(X: np.ndarray, z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Independent Rasch MML (σ = 1): maximise Σ_v log Σ_q w_q Π_i P(x_vi | z_q) with torch L-BFGS + autograd."""
    import torch
    import torch.nn.functional as F

    Xt, zt, lw = torch.tensor(X, dtype=torch.float64), torch.tensor(z), torch.log(torch.tensor(w))
    b = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50,
                            line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        eta = zt[:, None] - b[None, :]  # (Q, L)
        ll = Xt @ F.logsigmoid(eta).T + (1 - Xt) @ F.logsigmoid(-eta).T  # (N, Q)
        v = -torch.logsumexp(ll + lw[None, :], 1).sum()
        v.backward()
        return v

    opt.step(nll)
    return b.detach().numpy()


def marginal_loglik(X: np.ndarray, b: np.ndarray, z: np.ndarray, w: np.ndarray) -> float:
    from lmlab.evaluate import irt

    eta = z[:, None] - b[None, :]
    L = X @ irt.log_sigmoid(eta).T + (1 - X) @ irt.log_sigmoid(-eta).T  # (N, Q)
    m = L.max(1, keepdims=True)
    return float((np.log(np.exp(L - m) @ w) + m[:, 0]).sum())


def girth_agreement(shapes: list[tuple[int, int]]) -> list[dict]:
    import girth

    from lmlab.evaluate import irt

    z, w = irt.legendre_nodes(41, (-4.5, 4.5))  # girth 0.8 defaults: quadrature_n 41, bounds (-4.5, 4.5)
    rows = []
    for name, X in [("LSAT-6", irt.lsat6()), *((f"{L} x {N}", simulate(N, L)) for L, N in shapes)]:
        g = np.asarray(girth.rasch_mml(X.T.astype(int), discrimination=1)["Difficulty"], float)
        mom = marginal_moment_b(X, z, w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leg = irt.mml_fit(X, sigma=1.0, n_nodes=41, quadrature="legendre").b
            gh = irt.mml_fit(X, sigma=1.0).b
        ind = torch_mml(X, z, w)
        rows.append({"matrix": name, "items": X.shape[1], "persons": X.shape[0],
                     "girth_vs_moment_estimator": float(np.abs(g - mom).max()),
                     "lmlab_mml_vs_independent_mml": float(np.abs(leg - ind).max()),
                     "loglik_at_girth_b": marginal_loglik(X, g, z, w),
                     "loglik_at_lmlab_b": marginal_loglik(X, leg, z, w),
                     "lmlab_mml_legendre_vs_girth": float(np.abs(leg - g).max()),
                     "lmlab_mml_gh21_vs_girth": float(np.abs(gh - g).max()),
                     "gh21_vs_legendre41": float(np.abs(gh - leg).max())})
        print(rows[-1], flush=True)
    return rows


LMEVAL_YAML = """task: lmlab_math
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: {max_new}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def exam_bench(n_items: int, max_new: int, batch: int) -> dict:
    import torch

    from lmlab.core.models import resolve_model_path
    from lmlab.evaluate import exam

    torch.set_num_threads(1)
    items = exam.builtin_math(n_items)
    cfg = exam.ExamConfig(items=f"builtin:math:{n_items}", model=["ref:dense"], max_new_tokens=max_new,
                          stop=["\n", "Q:"], batch_size=batch)
    be = exam.make_backend("ref:dense", cfg, "cpu", torch.float32)
    be.generate([exam.build_prompt(items[0])])  # warm-up
    t0 = time.perf_counter()
    rows = exam.run_exam(items, [be], cfg)
    t_lm = time.perf_counter() - t0
    acc = float(np.mean([r["full_credit"] for r in rows]))
    out = {"items": n_items, "max_new_tokens": max_new, "batch_size": batch, "lmlab_s": round(t_lm, 3),
           "lmlab_items_per_s": round(n_items / t_lm, 2), "lmlab_accuracy": acc}
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        out["lm_eval"] = "not installed"
        return out
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "math.jsonl"
        data.write_text("".join(json.dumps({"question": it["question"], "answer": it["answer"][0]}) + "\n"
                                for it in items))
        (Path(d) / "lmlab_math.yaml").write_text(LMEVAL_YAML.format(data=data, max_new=max_new))
        tm = TaskManager(include_path=d)
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=resolve_model_path("ref:dense"), dtype="float32", device="cpu", batch_size=batch)
        lm_eval.simple_evaluate(model=lm, tasks=["lmlab_math"], limit=2, task_manager=tm)  # warm-up (dataset cache)
        t0 = time.perf_counter()  # model already loaded, as for lmlab: task build + generation + scoring
        res = lm_eval.simple_evaluate(model=lm, tasks=["lmlab_math"], task_manager=tm)
        t_le = time.perf_counter() - t0
    em = res["results"]["lmlab_math"].get("exact_match,none")
    out.update(lm_eval_version=lm_eval.__version__, lm_eval_s=round(t_le, 3),
               lm_eval_items_per_s=round(n_items / t_le, 2), lm_eval_exact_match=em,
               ratio_lmlab_over_lmeval_items_per_s=round(t_le / t_lm, 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip-lmeval", action="store_true")
    ap.add_argument("--only-agreement", action="store_true",
                    help="run only the equal-quadrature girth agreement; keep the other results in --out")
    ap.add_argument("--out", default="benchmarks/results/irt.json")
    a = ap.parse_args()
    shapes = [(300, 50), (40, 5000), (100, 1000)]
    prev = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    if a.only_agreement:
        res = {**prev, "girth_agreement": girth_agreement(shapes)}
    else:
        res = {**prev, "python": sys.version.split()[0], "threads": a.threads, "lsat6": lsat_check(),
               "fits": fit_bench(shapes, a.reps), "girth_agreement": girth_agreement(shapes)}
    if not a.skip_lmeval and not a.only_agreement:
        res["exam"] = exam_bench(a.items, a.max_new, a.batch)
        print(res["exam"], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("| items x persons | lmlab CML s | girth CML s | ratio | max abs diff b | lmlab MML s | girth MML s | "
          "ratio | MML diff (21 nodes) | MML diff (61 nodes) | 21 vs 61 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res.get("fits", []):
        print(f"| {r['items']} x {r['persons']} | {r['cml_s']} | {r['girth_cml_s']} | "
              f"{r['cml_ratio_lmlab_over_girth']} | {r['cml_max_abs_diff']:.1e} | {r['mml_s']} | {r['girth_mml_s']} | "
              f"{r['mml_ratio_lmlab_over_girth']} | {r['mml_max_abs_diff']:.3f} | {r['mml61_max_abs_diff']:.3f} | "
              f"{r['mml21_vs_61_max_abs_diff']:.3f} |")
    print("\nEqual quadrature (girth's 41-node Gauss-Legendre on [-4.5, 4.5]):")
    print("| matrix | girth vs marginal-moment re-impl. | lmlab MML vs independent MML | log-lik at girth b | "
          "at lmlab b | lmlab MML vs girth | GH-21 vs Legendre-41 |")
    print("|---|---|---|---|---|---|---|")
    for r in res["girth_agreement"]:
        print(f"| {r['matrix']} | {r['girth_vs_moment_estimator']:.1e} | {r['lmlab_mml_vs_independent_mml']:.1e} | "
              f"{r['loglik_at_girth_b']:.3f} | {r['loglik_at_lmlab_b']:.3f} | {r['lmlab_mml_legendre_vs_girth']:.3f} | "
              f"{r['gh21_vs_legendre41']:.4f} |")


if __name__ == "__main__":
    main()
