"""``lmlab data mix run`` / ``continual`` end to end on the tiny reference zoo (tiny tokenizer, three small text
domains written here): artifacts, predicted-vs-measured verification, caching, and exact resume of a proxy."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmlab.data import mixing as X
from lmlab.errors import LmlabError


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]
    texts = {
        "code": [f"def f{i}(x):\n    return x * {rng.randint(2, 99)} + {rng.randint(0, 9)}\n" * 2 for i in range(300)],
        "prose": [" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(300)],
        "math": [f"{rng.randint(1, 99)} + {rng.randint(1, 99)} = ?" * 3 for _ in range(300)],
    }
    paths = []
    for name, docs in texts.items():
        p = root / f"{name}.txt"
        p.write_text("\n\n".join(docs) + "\n")
        paths.append(str(p))
    return paths


def _cfg(domains, tmp_path, **kw):
    proxy = X.ProxyOptions(sizes=[16, 32, 48], steps=8, batch_size=4, seq_len=16, warmup=2, eval_every=2,
                           eval_windows=4, stream_tokens=3000, save_every=0)
    base = dict(domains=domains, mixtures=5, holdout=1, target_steps=16, target_size=64, proxy=proxy,
                cache=str(tmp_path / "cache"), out=str(tmp_path / "run"), threads=1, device="cpu")
    base.update(kw)
    return X.RunConfig(**base)


@pytest.mark.slow
def test_run_pipeline_end_to_end(ref_zoo, domains, tmp_path):
    run = X.run_main(_cfg(domains, tmp_path))
    res = json.loads((run / "results.json").read_text())
    names = ["code.txt", "prose.txt", "math.txt"]
    assert res["domains"] == names and len(res["mixtures"]) == 5
    assert sorted(res["proxy_params"]) == ["16", "32", "48"] or len(res["proxy_params"]) == 3
    r = np.array(list(res["optimum"]["mixture"].values()))
    assert r.min() >= 0.02 - 1e-9 and r.sum() == pytest.approx(1)
    assert res["optimum"]["predicted"] <= res["uniform"]["predicted"] + 1e-9
    v = res["verification"]
    for k in ("optimum", "uniform"):
        assert np.isfinite(v[k]["measured"]) and v[k]["rel_error"] >= 0
        assert v[k]["step_law_from_quarter"] is None or v[k]["step_law_from_quarter"]["fit_steps"][1] <= 4
    h = res["holdout"]
    assert h["holdout_mixtures"] == 1 and np.isfinite(h["mean_abs_rel_error"])
    rows = (run / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("mixture,r_code.txt") and len(rows) == 1 + 5 * 3 * 4  # 4 evals (steps 2..8)
    law = json.loads((run / "law.json").read_text())
    assert len(law["fits"]) == 3 and law["nested"]["target_hidden"] == 64
    for plot in ("holdout_pred_vs_measured.png", "surface.png", "step_law.png", "size_law.png"):
        assert (run / "plots" / plot).is_file()
    # the user-table path reproduces the pipeline's per-step data: fit on the written runs.csv
    fit = X.fit_main(X.FitConfig(data=str(run / "runs.csv"), out=str(tmp_path / "fit"), target_steps=16,
                                 fit_from=2, folds=0, bootstrap=0))
    assert json.loads((fit / "law.json").read_text())["nested"]["step_fits"] == 5 * 3 * 3
    # cached: a second pipeline reuses every proxy (no new checkpoints are written)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("done.json")}
    X.run_main(_cfg(domains, tmp_path, out=str(tmp_path / "run2")))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("done.json")} == stamps


def test_proxy_resume_is_exact(ref_zoo, domains, tmp_path):
    tok, streams, vals, _ = X.domain_streams(domains, 1_000_000)
    cfg = _cfg(domains, tmp_path)
    opt = X._optim(cfg.proxy, 16)
    kw = dict(mixture=np.array([0.5, 0.3, 0.2]), hidden=16, layers=2, tok=tok, streams=streams, vals=vals,
              opt=opt, stream_tokens=3000, seed=0, eval_windows_n=4)
    X.train_proxy(tmp_path / "a", stop_after=6, **kw)  # "killed" at step 6 ...
    a = X.train_proxy(tmp_path / "a", stop_after=12, **kw)  # ... and continued
    b = X.train_proxy(tmp_path / "b", stop_after=12, **kw)
    assert [e["step"] for e in a["evals"]] == [0, 2, 4, 6, 8, 10, 12]
    assert a["evals"] == b["evals"]


def test_domain_without_data_is_an_error(ref_zoo, domains, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LmlabError, match="empty.txt"):
        X.run_main(_cfg([*domains[:2], str(empty)], tmp_path, out=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_continual_critical_proportion(ref_zoo, domains, tmp_path):
    cfg = X.ContinualConfig(model="ref:dense", original=domains[:2], new=domains[2], proportions=[0.0, 0.5, 1.0],
                            steps=6, batch_size=4, seq_len=16, eval_every=3, eval_windows=4, tolerance=0.5,
                            cache=str(tmp_path / "cache"), out=str(tmp_path / "cpt"), threads=1, device="cpu")
    run = X.continual_main(cfg)
    res = json.loads((run / "results.json").read_text())
    assert res["proportions"] == [0.0, 0.5, 1.0] and len(res["original_loss"]) == 3
    assert res["threshold"] == pytest.approx(res["loss_before"]["original"] + 0.5)
    p = res["critical_proportion"]
    assert p is None or 0.0 <= p <= 1.0
    if p is not None and p > 0:
        f = X.MixFit(**res["law_original"])
        assert float(f.predict(np.array([p, 1 - p]))[0]) == pytest.approx(res["threshold"], abs=1e-6)
    assert (run / "plots" / "critical_proportion.png").is_file()
