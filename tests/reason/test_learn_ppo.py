"""PPO (GAE, KL-in-reward, clipped value loss) on hand-computed numbers; PPO learns a bandit and moves every policy
and value parameter; process-reward plumbing (potential terms, token placement, PRM-shaped GRPO); step-level DPO
pairs mined from a hand-built tree; the rl loop with ppo / step-dpo / PRM retraining."""

from __future__ import annotations

import json

import pytest
import torch
from test_learn import Bandit  # the one-step bandit shared with the GRPO tests

from lmlab.config import ConfigError
from lmlab.errors import LmlabError
from lmlab.reason import learn as L
from lmlab.reason.policy import CharTokenizer, demonstrations, load_lm, save_lm, sft, split_problems
from lmlab.reason.reward import GoldScorer, RewardModel, save_rm
from lmlab.reason.tasks import Problem, make_task


def test_gae_hand_computed():
    # one row, T = 5: position 0 is prompt, 1..3 completion, 4 padding; values off the mask must not leak
    r = torch.tensor([[7.0, 0.0, 0.0, 1.0, 7.0]])
    v = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    m = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = L.gae(r, v, m, gamma=0.9, lam=0.8)
    d3 = 1.0 - 0.7
    d2 = 0.9 * 0.7 - 0.6
    d1 = 0.9 * 0.6 - 0.5
    a3 = d3
    a2 = d2 + 0.72 * a3
    a1 = d1 + 0.72 * a2
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.6, a3 + 0.7, 0.0]]), atol=1e-6)
    mc, _ = L.gae(r, v, m, gamma=1.0, lam=1.0)  # lambda = 1: Monte-Carlo return minus V
    assert torch.allclose(mc[0, 1:4], torch.tensor([0.5, 0.4, 0.3]), atol=1e-6)
    td, _ = L.gae(r, v, m, gamma=0.9, lam=0.0)  # lambda = 0: one-step TD error
    assert torch.allclose(td[0, 1:4], torch.tensor([d1, d2, d3]), atol=1e-6)


def test_ppo_token_rewards_and_value_loss_hand_computed():
    lp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    m = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    dense = torch.tensor([[0.0, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    r = L.ppo_token_rewards(torch.tensor([1.0, -1.0]), lp, ref, m, kl_coef=0.1, dense=dense)
    want = torch.tensor([[0.0, -0.1 * 0.5 + 0.25, -0.1 * -1.0 + 1.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    assert torch.allclose(r, want, atol=1e-6)
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]), torch.tensor([[0.0, 1.0]])
    # entry 0: unclipped (1-0)^2 = 1, clipped (0.7-0)^2 = 0.49 -> 1 ; entry 1: (0-1)^2 = 1, (0-1)^2 -> clip(-0.1)=0 -> 1
    got = L.value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    assert got.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2, abs=1e-6)
    v2 = torch.tensor([[0.2, 0.8]])  # clipped to 0.3 and 0.3: max(0.2^2, 0.3^2) = 0.09 ; max(0.2^2, 0.7^2) = 0.49
    assert L.value_loss(v2, old, ret, torch.ones(1, 2)).item() == pytest.approx(0.5 * (0.09 + 0.49) / 2, abs=1e-6)
    w = L.masked_whiten(torch.tensor([[5.0, 1.0, 3.0]]), torch.tensor([[0, 1, 1]]))
    assert torch.allclose(w, torch.tensor([[0.0, -1.0, 1.0]]), atol=1e-4)


def test_process_terms_and_token_placement():
    assert L.step_potential_terms([0.9, 0.2, 1.0]) == pytest.approx([0.4, -0.7, 0.8])
    assert L.step_potential_terms([0.9, 0.2], "raw") == [0.9, 0.2]
    with pytest.raises(LmlabError):
        L.step_potential_terms([0.1], "x")
    tok = CharTokenizer()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0]])
    sols = [["ab|", "c"], ["x|", "y|"]]
    spread = L.place_step_values(tok, mask, sols, [[1.0, 2.0], [3.0, 4.0]], spread=True)
    assert spread.tolist() == [[0, 0, 1, 1, 1, 2, 0], [0, 3, 3, 4, 4, 0, 0]]
    ends = L.place_step_values(tok, mask, sols, [[1.0, 2.0], [3.0, 4.0]], spread=False)
    assert ends.tolist() == [[0, 0, 0, 0, 1, 2, 0], [0, 0, 3, 0, 4, 0, 0]]


def test_ppo_step_changes_every_parameter_and_learns_a_bandit():
    torch.manual_seed(0)
    task, probs = Bandit(), [Problem(f"Q{i}:", "7") for i in range(8)]
    model, tok = load_lm("tiny")
    tr = L.PPOTrainer(model, tok, task, L.outcome_reward(task),
                      L.PPOParams(prompts_per_step=8, samples_per_prompt=4, lr=1e-2, ppo_epochs=2), seed=0)
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *tr.critic.named_parameters()]}
    first = tr.step(probs)
    after = dict([*model.named_parameters(), *tr.critic.named_parameters()])
    assert len(before) == len(after)
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert len(changed) == len(before), set(before) - set(changed)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # pi_old == ref at the first step
    rewards = [first["reward"]] + [tr.step(probs)["reward"] for _ in range(9)]  # measured 0.12 -> 0.84..0.94
    assert sum(rewards[-3:]) / 3 > max(0.5, rewards[0] + 0.3), rewards


def test_ppo_params_validated():
    with pytest.raises(ConfigError, match="lam"):
        L.PPOParams(lam=2.0).validate()
    with pytest.raises(LmlabError, match="scorer"):
        m, t = load_lm("tiny")
        L.PPOTrainer(m, t, Bandit(), lambda p, s: 1.0, L.PPOParams(process_alpha=0.5))


def test_prm_shaped_grpo_uses_the_prm_on_solved_groups():
    """With the outcome reward constant (every group has zero advantage) outcome-only GRPO has no gradient,
    while the potential-shaped advantage still moves every parameter."""
    torch.manual_seed(0)
    task = make_task("column_add", 2)
    probs = split_problems(task, 8, 1, 0)[0]
    model, tok = load_lm("tiny")
    const = L.GRPOTrainer(model, tok, task, lambda p, s: 1.0, L.GRPOParams(num_generations=4, prompts_per_step=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    const.step(probs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    tr = L.GRPOTrainer(model, tok, task, lambda p, s: 1.0, L.GRPOParams(num_generations=4, prompts_per_step=4,
                                                                         process_alpha=1.0), scorer=GoldScorer(task))
    out = tr.step(probs)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert out["process_return"] != 0.0
    with pytest.raises(LmlabError, match="scorer"):
        L.GRPOTrainer(model, tok, task, lambda p, s: 1.0, L.GRPOParams(process_alpha=1.0))


class TwoStep:
    """Steps 'a|'/'b|' then 'x|'/'y|'; correct iff the solution is a|x|."""

    def check(self, p, s):
        return s == ["a|", "x|"]


class StepScorer:
    def score(self, problems, step_lists):
        return [[{"a|": 0.9, "b|": 0.1, "x|": 0.8, "y|": 0.7}[x] for x in s] for s in step_lists]


def test_step_preference_rows_from_a_tree():
    p = Problem("Q:", "")
    row = [["a|", "x|"], ["a|", "y|"], ["b|", "x|"], ["a|", "x|"]]
    rows = L.step_preference_rows(TwoStep(), [p], [row], per_prompt=5)
    # root: Q(a) = 2/3, Q(b) = 0 -> pair; after a|: Q(x) = 1, Q(y) = 0 -> pair; after b|: one child -> none
    assert rows == [{"prompt": "Q:", "chosen": "a|", "rejected": "b|"},
                    {"prompt": "Q:a|", "chosen": "x|", "rejected": "y|"}]
    assert L.step_preference_rows(TwoStep(), [p], [row], per_prompt=1) == rows[:1]
    assert L.step_preference_rows(TwoStep(), [p], [row], min_gap=0.9) == rows[1:]
    # no checker: the PRM's step scores decide (0.8 vs 0.7 < min_gap 0.5 after a|)
    assert L.step_preference_rows(TwoStep(), [p], [row], StepScorer(), per_prompt=5) == rows[:1]


@pytest.fixture(scope="module")
def noisy_policy(tmp_path_factory):
    torch.manual_seed(0)
    task = make_task("column_add", 3, q_sys=0.6, q_rand=0.03)
    train, _ = split_problems(task, 3000, 10, 0)
    prompts, comps = demonstrations(task, train, 0)
    model, tok = load_lm("tiny")
    sft(model, tok, prompts, comps, steps=150, batch_size=64, lr=1e-2, warmup=20, progress=False)
    folder = save_lm(model, tok, tmp_path_factory.mktemp("pol") / "policy")
    save_rm(RewardModel.from_policy(model), tok, folder.parent / "prm", {"label": "untrained"})
    return folder


@pytest.mark.parametrize("algo,extra", [("ppo", {}), ("step-dpo", {}), ("step-dpo", {"step_filter": "scorer"}),
                                        ("grpo", {"grpo": L.GRPOParams(num_generations=4, prompts_per_step=8,
                                                                       process_alpha=0.5)})])
def test_rl_loop_new_algos(noisy_policy, tmp_path, algo, extra):
    kw = dict(grpo=L.GRPOParams(num_generations=4, prompts_per_step=8)) | extra
    run = L.main(L.RLConfig(out=str(tmp_path / algo), policy=str(noisy_policy), algo=algo, rounds=1, difficulty=3,
                            n_train=40, k=4, grpo_steps=2, dpo_steps=2, n_test=10, eval_k=2, threads=1,
                            ppo=L.PPOParams(prompts_per_step=8, samples_per_prompt=4, ppo_epochs=1),
                            step_min_gap=0.0, **kw))
    res = json.loads((run / "results.json").read_text())
    assert len(res["history"]) == 2
    if algo == "step-dpo":
        rows = L.read_jsonl(run / "rounds" / "r01" / "step_preference.jsonl")
        assert rows and all(r["prompt"].startswith("Q") and r["chosen"] != r["rejected"] for r in rows)


def test_rl_loop_retrains_the_prm_and_resumes_from_it(noisy_policy, tmp_path):
    prm = noisy_policy.parent / "prm"
    kw = dict(out=str(tmp_path / "r"), policy=str(noisy_policy), algo="expert-iter", difficulty=3, n_train=40, k=8,
              sft_steps=2, batch_size=16, n_test=10, eval_k=2, threads=1, scorer=str(prm), retrain_prm=True,
              prm_k=2, prm_steps=3, prm_max_solutions=50)
    orig = L.expert_iteration_data

    def crash(task, probs, groups, *a, **k):  # interrupted in round 2, after round 1 finished
        if (tmp_path / "r" / "rounds" / "r01" / "done.json").is_file():
            raise RuntimeError("killed")
        return orig(task, probs, groups, *a, **k)

    L.expert_iteration_data = crash
    try:
        with pytest.raises(RuntimeError):
            L.main(L.RLConfig(rounds=2, **kw))
    finally:
        L.expert_iteration_data = orig
    r1 = tmp_path / "r" / "rounds" / "r01"
    h = json.loads((r1 / "done.json").read_text())
    assert h["prm_trained_on"] == 50 and 0 <= h["prm_step_accuracy"] <= 1
    assert (r1 / "prm" / "head.safetensors").read_bytes() != (prm / "head.safetensors").read_bytes()  # it moved
    r1_head = (r1 / "prm" / "head.safetensors").read_bytes()
    run = L.main(L.RLConfig(rounds=2, **kw))  # resumes from round 1's policy and PRM
    assert (run / "rounds" / "r02" / "prm" / "rm.json").is_file()
    assert (r1 / "prm" / "head.safetensors").read_bytes() == r1_head
    assert [x["round"] for x in json.loads((run / "results.json").read_text())["history"]] == [0, 1, 2]
    with pytest.raises(ConfigError, match="reward-model folder"):
        L.RLConfig(policy="x", retrain_prm=True)
