"""Search on a scripted policy with oracle scorers (no training): beam/MCTS reach pass@budget, weighted BoN with an
oracle ORM equals pass@N, exact token accounting, bad budgets and max-depth flags."""

from __future__ import annotations

import random

import pytest

from lmlab.config import ConfigError
from lmlab.errors import LmlabError
from lmlab.reason.policy import ScriptedPolicy
from lmlab.reason.reward import GoldScorer, OutcomeScorer
from lmlab.reason.search import (
    SearchParams,
    majority_pick,
    run_search,
    sample_pool,
    scaling_curves,
    select_from_pool,
    summarize,
    weighted_pick,
)
from lmlab.reason.tasks import ColumnAdd

D = 4


@pytest.fixture()
def setup():
    task = ColumnAdd(D)
    probs = task.sample(60, random.Random(5))
    return task, probs, ScriptedPolicy(D, q_sys=0.6, q_rand=0.03, seed=0)


def pass_at(task, probs, policy, n):
    pool = sample_pool(probs, policy, task, n)
    return sum(any(task.check(p, s) for s, _ in row) for p, row in zip(probs, pool)) / len(probs)


def test_selection_rules():
    assert majority_pick(["1", "2", "2", None]) == 1
    assert majority_pick([None, None]) == 0
    assert weighted_pick(["1", "2", "2"], [0.9, 0.5, 0.5]) == 1  # 1.0 for "2" beats 0.9 for "1"
    assert weighted_pick(["1", "2", "2"], [0.9, 0.4, 0.4]) == 0


def test_weighted_bon_with_oracle_orm_equals_pass_at_n(setup):
    task, probs, policy = setup
    pool = sample_pool(probs, policy, task, 16)
    sel = select_from_pool(probs, task, pool, OutcomeScorer(task), ["weighted", "argmax"], [1, 4, 16], SearchParams())
    for n in (1, 4, 16):
        pass_n = sum(any(task.check(p, s) for s, _ in row[:n]) for p, row in zip(probs, pool)) / len(probs)
        for rule in ("weighted", "argmax"):
            acc = summarize(task, probs, sel[rule][n])["accuracy"]
            assert acc == pytest.approx(pass_n, abs=1e-12)


def test_beam_and_mcts_with_oracle_prm_reach_pass_at_budget(setup):
    task, probs, policy = setup
    gold = GoldScorer(task)
    p16 = pass_at(task, probs, policy, 16)
    assert 0.3 < p16 < 1.0  # the teacher is majority-wrong, so the budget matters
    greedy = summarize(task, probs, run_search("greedy", probs, policy, task, None, SearchParams()))["accuracy"]
    assert greedy <= 0.25
    beam = summarize(task, probs, run_search("beam", probs, policy, task, gold, SearchParams(n=16)))
    dvts = summarize(task, probs, run_search("dvts", probs, policy, task, gold, SearchParams(n=16)))
    mcts = summarize(task, probs, run_search("mcts", probs, policy, task, gold, SearchParams(n=16, widen=0.5)))
    assert beam["accuracy"] >= 0.95 * p16
    assert dvts["accuracy"] >= 0.95 * p16
    assert mcts["accuracy"] >= 0.95 * p16
    assert beam["tokens"] <= 16 * D * 4 + 1e-9  # never more than the budget of N * D steps of 4 tokens


def test_token_and_step_accounting_is_exact(setup):
    task, probs, policy = setup
    gold = GoldScorer(task)
    for algo in ("majority", "weighted_bon", "beam", "dvts", "mcts", "revise"):
        policy.reset_counters()
        gold.calls = 0
        res = run_search(algo, probs, policy, task, gold, SearchParams(n=8, widen=0.5))
        assert sum(r.tokens for r in res) == policy.tokens_generated, algo
        if algo in ("majority", "weighted_bon"):
            assert all(r.steps == sum(len(s) for s in r.completions) for r in res)
            assert all(r.tokens == 4 * r.steps for r in res)  # every step of this task is 4 tokens
        if algo != "majority":
            assert sum(r.rm_calls for r in res) == gold.calls, algo


def test_revise_with_external_critic_beats_one_sample(setup):
    task, probs, policy = setup
    one = summarize(task, probs, run_search("majority", probs, policy, task, None, SearchParams(n=1)))["accuracy"]
    rev = summarize(task, probs, run_search("revise", probs, policy, task, GoldScorer(task),
                                            SearchParams(rounds=8)))["accuracy"]
    assert rev >= one + 0.3


def test_bad_budget_and_missing_scorer(setup):
    task, probs, policy = setup
    with pytest.raises(ConfigError, match="budget"):
        run_search("bon", probs, policy, task, GoldScorer(task), SearchParams(n=0))
    with pytest.raises(LmlabError, match="needs a scorer"):
        run_search("beam", probs, policy, task, None, SearchParams())
    with pytest.raises(LmlabError, match="unknown search algo"):
        run_search("astar", probs, policy, task, None, SearchParams())


def test_max_depth_returns_best_partial_with_flag(setup):
    task, probs, policy = setup
    for algo in ("beam", "dvts", "mcts", "weighted_bon"):
        res = run_search(algo, probs[:5], policy, task, GoldScorer(task), SearchParams(n=4, max_depth=2))
        assert all(r.hit_max_depth and r.answer is None and len(r.chosen) == 2 for r in res), algo


def test_scaling_curves_monotone_with_oracle(setup):
    task, probs, policy = setup
    cur = scaling_curves(probs, policy, task, GoldScorer(task), ["majority", "weighted_bon"], [1, 4, 16],
                         SearchParams(), progress=False)
    acc = [cur["weighted_bon"][str(n)]["accuracy"] for n in (1, 4, 16)]
    assert acc[0] < acc[1] < acc[2]
    assert cur["majority"]["16"]["accuracy"] <= cur["majority"]["1"]["accuracy"] + 0.1  # self-consistency trap
    assert cur["weighted_bon"]["16"]["tokens"] == pytest.approx(16 * D * 4)
