"""IRT + exam benchmark: lmlab's Rasch fits vs `girth` on the same matrices; exam runner vs lm-eval.

    python benchmarks/irt.py [--reps 3] [--threads 1] [--skip-lmeval] [--out benchmarks/results/irt.json]

* **Fit time and agreement** on simulated Rasch matrices (b ~ U(-2, 2), θ ~ N(0, 1), seed 0), extreme items
  dropped first, both libraries timed in one process, interleaved, best of ``--reps``:
  - CML: ``lmlab.evaluate.irt.cml_fit`` (Newton, exact Hessian, SEs) vs ``girth.rasch_conditional`` (no SEs);
    girth's b is centred to sum 0 before comparing.
  - MML: ``lmlab.evaluate.irt.mml_fit(sigma=1)`` (21-node Gauss-Hermite, Newton, observed-information SEs) vs
    ``girth.rasch_mml`` (discrimination 1, girth's own quadrature); their estimates differ by the quadrature
    (the spec measured ltm -2.872 vs girth -2.893 on LSAT-6 item 1), so the max difference is reported, not
    required to be < 1e-3.
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
    ap.add_argument("--out", default="benchmarks/results/irt.json")
    a = ap.parse_args()
    res = {"python": sys.version.split()[0], "threads": a.threads,
           "lsat6": lsat_check(),
           "fits": fit_bench([(300, 50), (40, 5000), (100, 1000)], a.reps)}
    if not a.skip_lmeval:
        res["exam"] = exam_bench(a.items, a.max_new, a.batch)
        print(res["exam"], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("| items x persons | lmlab CML s | girth CML s | ratio | max abs diff b | lmlab MML s | girth MML s | "
          "ratio | MML diff (21 nodes) | MML diff (61 nodes) | 21 vs 61 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["fits"]:
        print(f"| {r['items']} x {r['persons']} | {r['cml_s']} | {r['girth_cml_s']} | "
              f"{r['cml_ratio_lmlab_over_girth']} | {r['cml_max_abs_diff']:.1e} | {r['mml_s']} | {r['girth_mml_s']} | "
              f"{r['mml_ratio_lmlab_over_girth']} | {r['mml_max_abs_diff']:.3f} | {r['mml61_max_abs_diff']:.3f} | "
              f"{r['mml21_vs_61_max_abs_diff']:.3f} |")


if __name__ == "__main__":
    main()
