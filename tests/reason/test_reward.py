"""Reward design: potential-based shaping invariance, Math-Shepherd MC labels vs the closed form, aggregators, AUC,
RM training and scoring (including a PRM whose tokenizer differs from the policy's)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.reason.policy import CharTokenizer, ScriptedPolicy, tiny_gpt
from lmlab.reason.reward import (
    RewardModel,
    RMScorer,
    aggregate,
    auc,
    discounted_return,
    load_rm,
    mc_labels,
    potential_shaping,
    prm_quality,
    prm_shaped_rewards,
    save_rm,
    train_rm,
)
from lmlab.reason.tasks import ColumnAdd


def test_aggregators():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8 and aggregate(s, "min") == 0.5
    assert aggregate(s, "prod") == pytest.approx(0.36) and aggregate(s, "mean") == pytest.approx(2.2 / 3)
    with pytest.raises(LmlabError):
        aggregate(s, "max")


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_potential_shaping_keeps_argmax_on_enumerated_trajectories(gamma):
    """All 3^4 trajectories of a 4-step tree with random rewards and random potentials: the shaped return differs
    from the true one by -Phi(s_0) only, so the argmax trajectory is unchanged; raw PRM-as-reward is not."""
    g = torch.Generator().manual_seed(0)
    T, A = 4, 3
    trajs = list(itertools.product(range(A), repeat=T))
    phi = {(): 0.7}
    for t in range(1, T + 1):
        for pre in itertools.product(range(A), repeat=t):
            phi[pre] = 0.0 if t == T else float(torch.rand((), generator=g)) * 5  # Phi(terminal) = 0
    r = {tr: torch.rand(T, generator=g) * torch.tensor([0.1, 0.1, 0.1, 1.0]) for tr in trajs}
    true = torch.stack([discounted_return(r[tr], gamma) for tr in trajs])
    pots = {tr: torch.tensor([phi[tr[:t]] for t in range(T + 1)]) for tr in trajs}
    shaped = torch.stack([discounted_return(potential_shaping(r[tr], pots[tr], gamma), gamma) for tr in trajs])
    assert torch.allclose(shaped, true - 0.7, atol=1e-5)
    assert int(shaped.argmax()) == int(true.argmax())
    raw = torch.stack([discounted_return(r[tr] + pots[tr][1:], gamma) for tr in trajs])  # non-potential bonus
    assert int(raw.argmax()) != int(true.argmax())


def test_prm_shaped_rewards_sum_to_outcome_minus_prior():
    out = prm_shaped_rewards(1.0, [0.9, 0.2, 0.8])
    assert len(out) == 3 and sum(out) == pytest.approx(1.0 - 0.5)
    with pytest.raises(LmlabError):
        potential_shaping(torch.zeros(3), torch.zeros(3))


def test_mc_labels_match_closed_form_value():
    task = ColumnAdd(6)
    pol = ScriptedPolicy(6, q_sys=0.6, q_rand=0.03, seed=1)
    probs = task.sample(4, random.Random(2))
    sols = [task.solution(p) for p in probs]
    k = 1500
    soft = mc_labels(pol, task, probs, sols, k=k)
    for p, _s, lab in zip(probs, sols, soft):
        for depth in range(1, 6):
            v = pol.value(p.meta["a"], p.meta["b"], depth)
            se = math.sqrt(max(v * (1 - v), 1e-4) / k)
            assert abs(lab[depth - 1] - v) < 4 * se + 1e-3, (depth, lab[depth - 1], v)
        assert lab[-1] == 1.0  # terminal step: its own outcome
    hard = [[float(x > 0) for x in r] for r in mc_labels(pol, task, probs, sols, k=1)]
    assert all(x in (0.0, 1.0) for r in hard for x in r)


def test_auc():
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.5, 0.5], [0, 1]) == 0.5
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


def _tiny_rm(seed=0):
    torch.manual_seed(seed)
    tok = CharTokenizer()
    lm = tiny_gpt(len(tok), d_model=32, n_head=2)
    return RewardModel.from_policy(lm), tok


def test_prm_learns_gold_labels_and_roundtrips(tmp_path):
    task = ColumnAdd(3)
    rng = random.Random(0)
    probs = task.sample(200, rng)
    pol = ScriptedPolicy(3, q_sys=0.6, q_rand=0.2, seed=0)
    from lmlab.reason.policy import rollout

    sols = [r[0] for r in rollout(pol, task, probs, [[] for _ in probs], 1)]
    labels = [[float(x) for x in task.step_labels(p, s)] for p, s in zip(probs, sols)]
    rm, tok = _tiny_rm()
    before = prm_quality(RMScorer(rm, tok), task, probs, sols)
    losses = train_rm(rm, tok, probs, sols, labels, steps=40, batch_size=32, lr=3e-3, progress=False)
    assert losses[-1] < losses[0] * 0.8
    after = prm_quality(RMScorer(rm, tok), task, probs, sols)
    assert after["auc"] > max(before["auc"], 0.6)
    save_rm(rm, tok, tmp_path / "rm", {"label": "gold"})
    rm2, tok2 = load_rm(tmp_path / "rm")
    a = RMScorer(rm, tok).score(probs[:5], sols[:5])
    b = RMScorer(rm2, tok2).score(probs[:5], sols[:5])
    assert [x for r in a for x in r] == pytest.approx([x for r in b for x in r], abs=1e-5)
    assert [len(x) for x in a] == [len(s) for s in sols[:5]]


def test_prm_with_a_different_tokenizer_retokenizes_text():
    task = ColumnAdd(3)
    probs = task.sample(3, random.Random(0))
    sols = [task.solution(p) for p in probs]
    torch.manual_seed(0)
    other = CharTokenizer("0123456789|+:Q!?")  # a PRM tokenizer unlike the policy's
    rm = RewardModel(tiny_gpt(len(other), d_model=32, n_head=2).base_model, 32)
    torch.nn.init.normal_(rm.head.weight)
    sc = RMScorer(rm, other).score(probs, sols)
    assert [len(x) for x in sc] == [3, 3, 3] and all(0 < v < 1 for x in sc for v in x)
    tiny = CharTokenizer("0123456789|")  # cannot represent the prompt: one clear error
    with pytest.raises(LmlabError, match="not in the reason tokenizer"):
        RMScorer(RewardModel(tiny_gpt(len(tiny), d_model=32, n_head=2).base_model, 32), tiny).score(probs, sols)


def test_mc_labels_need_rollouts():
    task = ColumnAdd(3)
    with pytest.raises(LmlabError, match="k >= 1"):
        mc_labels(ScriptedPolicy(3), task, [], [], k=0)
