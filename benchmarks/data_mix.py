"""Data mixing laws benchmark: RegMix real proxy runs (law vs guarded law vs LightGBM) + the nested pipeline on
the built-in domains (proxy runs with the foundation's training loop, optimum verified by training).

    python benchmarks/data_mix.py [--regmix ../shared/data/regmix] [--skip-pipeline]
        [--pipeline-config configs/data/mix_bench.yaml] [--out benchmarks/results/data_mix.json]

Part A (seconds, CPU): RegMix (sail-sg/regmix, MIT) TinyLlama proxies over 17 Pile training domains with 13 Pile
validation losses. 1B: 64 runs, 4-fold cross-validation repeated over 5 fold seeds; 1M: 512 runs fit -> 256 test.
Per validation domain: the paper's law (variable projection + soft-L1 polish), the law with the range guard
(ridge 1e-4 on the centred coefficients + clip to the fitted loss range ±50%), and a LightGBM regressor (RegMix's
choice: gbdt, lr 0.01, 1000 rounds; min_data_in_leaf 5 because 48 runs are few). Aggregate (mean of the 13
losses): explicit aggregation of the 13 laws vs one law fitted to the average vs implicit aggregation (K units).

Part B (minutes, CPU): ``lmlab data mix run -c configs/data/mix_bench.yaml`` - code/prose/math, K mixtures x 3
proxy widths trained for the first quarter of the target schedule, step + size laws, mixing law, optimum, and two
verification trainings (optimum, uniform) at the target width/length.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from lmlab.data import mixing as X

HERE = Path(__file__).resolve().parent


def lgb_predict(Rtr, ytr, Rte, seed=0):
    import lightgbm as lgb

    params = {"objective": "regression", "boosting_type": "gbdt", "learning_rate": 0.01, "num_iterations": 1000,
              "min_data_in_leaf": 5, "seed": seed, "verbosity": -1, "num_threads": 1, "deterministic": True}
    m = lgb.train(params, lgb.Dataset(Rtr, ytr))
    return m.predict(Rte)


def cv_all(R, y, folds, seeds, fn):
    """fn(Rtr, ytr, Rte) -> pred; returns mean MAE and mean Spearman over fold seeds."""
    maes, rhos = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        fold = np.empty(len(y), int)
        fold[rng.permutation(len(y))] = np.arange(len(y)) % folds
        pred = np.zeros(len(y))
        for f in range(folds):
            tr, te = fold != f, fold == f
            pred[te] = fn(R[tr], y[tr], R[te])
        maes.append(X.mae(pred, y))
        rhos.append(X.spearman(pred, y))
    return {"mae": float(np.mean(maes)), "mae_per_seed": [round(m, 4) for m in maes],
            "spearman": float(np.mean(rhos)), "spearman_min": float(np.min(rhos))}


def law_fn(**kw):
    clip = kw.pop("clip_margin", None)

    def fn(Rtr, ytr, Rte):
        f = X.fit_mix_law(Rtr, ytr, **kw)
        return X.guarded_predict(f, Rte, clip_margin=clip)[0]
    return fn


def implicit_fn(K):
    def fn(Rtr, ytr, Rte):
        return X.guarded_predict(X.fit_implicit(Rtr, ytr, K=K), Rte, clip_margin=0.5)[0]
    return fn


def regmix(root: Path, seeds=range(5)) -> dict:
    d = root / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", X.FitWarning)
        b = X.load_runs(d / "test_mixture_1B.csv", d / "test_pile_loss_1B.csv")
        tr1m = X.load_runs(d / "train_mixture_1m.csv", d / "train_pile_loss_1m.csv")
        te1m = X.load_runs(d / "test_mixture_1m.csv", d / "test_pile_loss_1m.csv")
    short = [t.replace("metric/the_pile_", "").replace("_val_loss", "") for t in b.targets]
    out: dict = {"1B": {"runs": len(b.R), "train_domains": len(b.domains), "val_domains": len(b.targets),
                        "folds": 4, "fold_seeds": list(seeds), "per_domain": {}}}
    t_law = 0.0
    for j, name in enumerate(short):
        y = b.Y[:, j]
        t0 = time.perf_counter()
        law = cv_all(b.R, y, 4, seeds, law_fn())
        t_law += time.perf_counter() - t0
        guarded = cv_all(b.R, y, 4, seeds, law_fn(ridge=1e-4, clip_margin=0.5))
        own = X.own_index(b.targets[j], b.domains)
        zero = cv_all(b.R, y, 4, seeds, law_fn(ridge=1e-4, clip_margin=0.5, own=own, zero_indicator=True))
        lgbm = cv_all(b.R, y, 4, seeds, lambda a, c, e: lgb_predict(a, c, e))
        out["1B"]["per_domain"][name] = {"law": law, "law_guarded": guarded, "law_guarded_zero": zero,
                                         "lightgbm": lgbm, "runs_with_own_zero": int((b.R[:, own] == 0).sum())}
        logging.info("1B %-18s law %.4f/%.3f  guarded %.4f/%.3f  +zero %.4f/%.3f  lgbm %.4f/%.3f", name,
                     law["mae"], law["spearman"], guarded["mae"], guarded["spearman"], zero["mae"], zero["spearman"],
                     lgbm["mae"], lgbm["spearman"])
    out["1B"]["law_fit_seconds_per_fit"] = t_law / (len(short) * 4 * len(seeds))
    avg = b.Y.mean(1)
    explicit = {"mae": [], "spearman": []}
    for seed in seeds:  # explicit aggregation: mean of the 13 guarded-law CV predictions
        rng = np.random.default_rng(seed)
        fold = np.empty(len(avg), int)
        fold[rng.permutation(len(avg))] = np.arange(len(avg)) % 4
        pred = np.zeros(len(avg))
        for f in range(4):
            tr, te = fold != f, fold == f
            pred[te] = np.mean([law_fn(ridge=1e-4, clip_margin=0.5, own=X.own_index(b.targets[j], b.domains),
                                       zero_indicator=True)(b.R[tr], b.Y[tr, j], b.R[te])
                                for j in range(len(short))], axis=0)
        explicit["mae"].append(X.mae(pred, avg))
        explicit["spearman"].append(X.spearman(pred, avg))
    out["1B"]["aggregate_mean_of_13"] = {
        "explicit_13_laws": {"mae": float(np.mean(explicit["mae"])), "spearman": float(np.mean(explicit["spearman"]))},
        "single_law_on_average": cv_all(b.R, avg, 4, seeds, law_fn(ridge=1e-4, clip_margin=0.5)),
        "single_law_on_average_plain": cv_all(b.R, avg, 4, seeds, law_fn()),
        "implicit_K2": cv_all(b.R, avg, 4, list(seeds)[:2], implicit_fn(2)),
        "lightgbm_on_average": cv_all(b.R, avg, 4, seeds, lambda a, c, e: lgb_predict(a, c, e)),
    }
    # 1M: 512 fit -> 256 test, Pile-CC
    j = next(i for i, t in enumerate(tr1m.targets) if "pile_cc" in t)
    y_tr, y_te = tr1m.Y[:, j], te1m.Y[:, j]
    f = X.fit_mix_law(tr1m.R, y_tr)
    p_law = f.predict(te1m.R)
    p_lgb = lgb_predict(tr1m.R, y_tr, te1m.R)
    out["1M_pile_cc_512_to_256"] = {"law": {"mae": X.mae(p_law, y_te), "spearman": X.spearman(p_law, y_te)},
                                    "lightgbm": {"mae": X.mae(p_lgb, y_te), "spearman": X.spearman(p_lgb, y_te)}}
    return out


def pipeline(config: str, out_dir: str, overrides: list[str] | None = None) -> dict:
    from lmlab.config import resolve

    cfg = resolve(X.RunConfig, config, [*(overrides or []), f"out={out_dir}"])
    t0 = time.perf_counter()
    run = X.run_main(cfg)
    res = json.loads((run / "results.json").read_text())
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["run_dir"] = str(run)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regmix", default=str(HERE.parents[1] / "shared" / "data" / "regmix"))
    ap.add_argument("--skip-regmix", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--pipeline-config", default=str(HERE.parent / "configs" / "data" / "mix_bench.yaml"))
    ap.add_argument("--pipeline-out", default=f"runs/bench-data-mix-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--pipeline-key", default="pipeline", help="results key for this pipeline run")
    ap.add_argument("--override", action="append", default=[], help="key=value for the pipeline config")
    ap.add_argument("--out", default=str(HERE / "results" / "data_mix.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(1)
    out: dict = {}
    prev = Path(args.out)
    if prev.is_file():
        out = json.loads(prev.read_text())
    if not args.skip_regmix:
        if Path(args.regmix).is_dir():
            out["regmix"] = regmix(Path(args.regmix))
        else:
            logging.warning("RegMix data not found at %s; skipping part A", args.regmix)
    if not args.skip_pipeline:
        out[args.pipeline_key] = pipeline(args.pipeline_config, args.pipeline_out, args.override)
        out[args.pipeline_key]["overrides"] = args.override
    prev.parent.mkdir(parents=True, exist_ok=True)
    prev.write_text(json.dumps(out, indent=2) + "\n")
    print(summary(out))


def summary(out: dict) -> str:
    lines = []
    if "regmix" in out:
        r = out["regmix"]["1B"]
        lines.append("RegMix 1B, 4-fold CV x 5 seeds: MAE / Spearman per validation domain")
        lines.append(f"{'domain':<20}{'law':>18}{'law+guard':>18}{'+zero ind.':>18}{'LightGBM':>18}")
        for d, v in r["per_domain"].items():
            lines.append(f"{d:<20}" + "".join(
                (f"{v[k]['mae']:>10.4f} / {v[k]['spearman']:.3f}" if v[k]["mae"] < 1e3 else f"{'diverges':>10} / "
                 f"{v[k]['spearman']:.3f}") for k in ("law", "law_guarded", "law_guarded_zero", "lightgbm")))
        a = r["aggregate_mean_of_13"]
        lines.append("mean of 13: " + ", ".join(f"{k} {v['mae']:.4f}/{v['spearman']:.3f}" for k, v in a.items()))
        m = out["regmix"]["1M_pile_cc_512_to_256"]
        lines.append(f"1M Pile-CC 512->256: law {m['law']['mae']:.4f}/{m['law']['spearman']:.3f}, "
                     f"LightGBM {m['lightgbm']['mae']:.4f}/{m['lightgbm']['spearman']:.3f}")
    for key in sorted(k for k in out if k.startswith("pipeline")):
        p = out[key]
        h = p["holdout"]
        lines.append(f"{key} {p.get('overrides') or ''}: held-out MARE {100 * h['mean_abs_rel_error']:.2f}% "
                     f"({h['fit_mixtures']} fit / {h['holdout_mixtures']} held out)"
                     + (f"; leave-one-out over all {h['fit_mixtures'] + h['holdout_mixtures']}: "
                        f"{100 * h['loo_mean_abs_rel_error']:.2f}%" if "loo_mean_abs_rel_error" in h else "")
                     + (f"; {h['seeds']} seeds, per-run seed sd " + ", ".join(f"{d} {v:.3f}" for d, v in
                                                                             h["seed_sd"].items())
                        if h.get("seed_sd") else ""))
        if "verification" in p:
            v = p["verification"]
            for k in ("optimum", "uniform"):
                s = v[k]["step_law_from_quarter"]
                lines.append(f"  {k} {p[k]['mixture'] if k in p else ''}: measured {v[k]['measured']:.4f} "
                             f"predicted {v[k]['predicted']:.4f} (rel err {100 * v[k]['rel_error']:.2f}%); "
                             "step law from 1/4: " + (f"{100 * s['rel_error']:.2f}%" if s else "n/a")
                             + (f"; per-domain {v[k]['per_domain']}, seed sd {v[k]['seed_sd']}"
                                if v[k].get("seed_sd") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
