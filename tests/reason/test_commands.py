"""End to end: reason sft -> rm -> search -> scaling on tiny settings (run dirs, artifacts, plots); HF models
(Llama, Mamba) through the same policy and RM interfaces; the tour section."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.config import ConfigError
from lmlab.reason import policy as P
from lmlab.reason import reward as R
from lmlab.reason import search as S


def test_sft_rm_search_scaling_end_to_end(tmp_path):
    run = P.main(P.SFTConfig(out=str(tmp_path / "sft"), difficulty=3, n_demos=300, steps=20, batch_size=32,
                             n_test=20, pass_k=2, threads=1))
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["eval"]["greedy"] <= 1 and (run / "policy" / "model.safetensors").is_file()
    assert (run / "plots" / "sft_loss.png").is_file() and (run / "samples.jsonl").is_file()
    pol = str(run / "policy")
    rm_run = R.main(R.RMConfig(out=str(tmp_path / "rm"), policy=pol, label="mc_soft", difficulty=3, n_solutions=30,
                               k=2, steps=3, batch_size=8, n_test=10, threads=1))
    rres = json.loads((rm_run / "results.json").read_text())
    assert 0 <= rres["quality"]["step_accuracy"] <= 1 and (rm_run / "rm" / "head.safetensors").is_file()
    s = S.main(S.SearchConfig(out=str(tmp_path / "search"), policy=pol, scorer=str(rm_run / "rm"), algo="beam",
                              difficulty=3, n_test=10, search=S.SearchParams(n=4, m=2), threads=1))
    sres = json.loads((s / "results.json").read_text())
    assert sres["tokens"] > 0 and sres["rm_calls"] > 0 and 0 <= sres["accuracy"] <= sres["pass"] + 1e-9
    sc = S.scaling_main(S.ScalingConfig(out=str(tmp_path / "scaling"), policy=pol, scorer="gold",
                                        methods=["majority", "weighted_bon", "dvts"], budgets=[1, 4], difficulty=3,
                                        n_test=10, threads=1))
    cur = json.loads((sc / "results.json").read_text())["curves"]
    assert set(cur) == {"majority", "weighted_bon", "dvts"} and (sc / "plots" / "scaling.png").is_file()


@pytest.mark.parametrize("kw,msg", [({"policy": "x", "search": S.SearchParams(n=0)}, "budget"),
                                    ({"policy": "x", "algo": "astar"}, "algo")])
def test_search_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        S.SearchConfig(**kw)


def test_missing_policy_fails_before_a_run_dir(tmp_path):
    for fn, cfg in ((S.main, S.SearchConfig(out=str(tmp_path / "a"))), (R.main, R.RMConfig(out=str(tmp_path / "b"))),
                    (S.scaling_main, S.ScalingConfig(out=str(tmp_path / "c")))):
        with pytest.raises(ConfigError, match="policy"):
            fn(cfg)
    assert not any(tmp_path.iterdir())


def test_config_errors():
    with pytest.raises(ConfigError, match="label"):
        R.RMConfig(policy="x", label="vibes")
    with pytest.raises(ConfigError, match="problems"):
        P.SFTConfig(task="jsonl")
    with pytest.raises(ConfigError, match="budgets"):
        S.ScalingConfig(policy="x", budgets=[0])


def test_hf_models_share_the_interfaces(tiny_llama, tiny_mamba):
    from lmlab.reason.tasks import ColumnAdd

    tok = P.CharTokenizer()  # 97 ids fit the tiny models' vocab of 99
    task = ColumnAdd(3)
    import random

    probs = task.sample(3, random.Random(0))
    for model in (tiny_llama, tiny_mamba):
        pol = P.LMPolicy(model, tok)
        out = pol.expand([p.prompt for p in probs], 2, "|", 5, 0.0)
        ref = P.LMPolicy(model, tok)
        ref.use_cache = False
        assert [[e.text for e in r] for r in out] == [[e.text for e in r] for r in ref.expand(
            [p.prompt for p in probs], 2, "|", 5, 0.0)]
        rm = R.RewardModel.from_policy(model)
        torch.nn.init.normal_(rm.head.weight)
        sc = R.RMScorer(rm, tok).score(probs, [task.solution(p) for p in probs])
        assert [len(x) for x in sc] == [3, 3, 3]


@pytest.mark.slow
def test_tour_section(tmp_path):
    from lmlab.tour import TourConfig

    path, text = S.tour_section(TourConfig(threads=1), tmp_path)
    assert (path / "plots" / "scaling.png").is_file() and "weighted_bon" in text
