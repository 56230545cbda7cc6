"""Learning from search: GRPO/RLOO/DPO maths on hand-computed numbers, one trainer step moves every parameter,
GRPO learns a bandit, expert iteration beats the noisy teacher, the rl loop writes datasets and resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.config import ConfigError
from lmlab.errors import LmlabError
from lmlab.reason import learn as L
from lmlab.reason.policy import LMPolicy, demonstrations, load_lm, save_lm, sft, split_problems
from lmlab.reason.tasks import make_task, split_steps


def test_grpo_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    a = L.grpo_advantages(r, eps=0.0 + 1e-12)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s, atol=1e-6)
    assert torch.all(a[1] == 0)  # a solved group carries no signal
    assert torch.allclose(L.grpo_advantages(r, "none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.allclose(L.rloo_advantages(torch.tensor([[1.0, 0.0, 0.0]])), torch.tensor([[1.0, -0.5, -0.5]]))
    with pytest.raises(LmlabError):
        L.rloo_advantages(torch.tensor([[1.0]]))


def test_clipped_loss_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.3], [0.2, 0.4, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.3], [0.4, 0.4, 0.9]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    # ratios: row0 (2, 1, -) -> clipped min(2, 1.2)*1 = 1.2, 1 ; row1 (0.5, 1, 1) with A=-2: min(-1, 0.8*-2=-1.6)=-1.6
    t0 = [-1.2, -1.0]
    t1 = [1.6, 2.0, 2.0]
    grpo = L.clipped_pg_loss(logp, old, adv, mask, 0.2)
    assert grpo.item() == pytest.approx((sum(t0) / 2 + sum(t1) / 3) / 2, abs=1e-6)
    dapo = L.clipped_pg_loss(logp, old, adv, mask, 0.2, loss_type="dapo")
    assert dapo.item() == pytest.approx((sum(t0) + sum(t1)) / 5, abs=1e-6)
    ref = logp + 0.1  # k3 = exp(0.1) - 0.1 - 1 per token
    kl = L.clipped_pg_loss(logp, old, adv, mask, 0.2, beta=0.5, ref_logp=ref)
    assert kl.item() == pytest.approx(grpo.item() + 0.5 * (math.exp(0.1) - 1.1), abs=1e-6)
    with pytest.raises(LmlabError, match="reference"):
        L.clipped_pg_loss(logp, old, adv, mask, beta=0.1)


def test_dpo_loss_matches_formula():
    c, r = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    rc, rr = torch.tensor([-2.5, -1.5]), torch.tensor([-2.0, -3.0])
    got = L.dpo_loss(c, r, rc, rr, beta=0.1)
    z = [0.1 * ((-3 + 2.5) - (-2 + 2.0)), 0.1 * ((-1 + 1.5) - (-4 + 3))]
    want = sum(-math.log(1 / (1 + math.exp(-x))) for x in z) / 2
    assert got.item() == pytest.approx(want, abs=1e-6)
    assert L.dpo_loss(c, r, c, r).item() == pytest.approx(math.log(2), abs=1e-6)  # policy == ref


class Bandit:
    """A one-step bandit: reward 1 iff the first generated character is a digit (p ~ 0.1 under a random model)."""

    step_sep, step_chars = "|", 2

    def max_steps(self, p):
        return 1

    def is_terminal(self, p, steps):
        return len(steps) >= 1

    def extract_answer(self, p, steps):
        return steps[0][:-1] if steps and steps[0].endswith("|") else None

    def check(self, p, steps):
        return bool(steps) and steps[0][:1].isdigit()


def _bandit():
    from lmlab.reason.tasks import Problem

    return Bandit(), [Problem(f"Q{i}:", "7") for i in range(8)]


def test_grpo_step_changes_every_parameter_and_learns_a_bandit():
    torch.manual_seed(0)
    task, probs = _bandit()
    model, tok = load_lm("tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = L.GRPOTrainer(model, tok, task, L.outcome_reward(task),
                       L.GRPOParams(num_generations=8, prompts_per_step=8, lr=3e-2, beta=0.04), seed=0)
    first = tr.step(probs)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), set(before) - set(changed)
    rewards = [first["reward"]] + [tr.step(probs)["reward"] for _ in range(14)]
    assert sum(rewards[-3:]) / 3 > max(0.5, rewards[0] + 0.3), rewards


def test_reward_error_names_the_sample():
    task, probs = _bandit()

    def bad(p, s):
        raise ValueError("boom")

    with pytest.raises(LmlabError, match=r"Q0:.*boom"):
        L.safe_rewards(bad, probs[:1], [["3|"]])


def test_datasets_round_trip_through_trainers(tmp_path):
    task = make_task("column_add", 2)
    train, _ = split_problems(task, 20, 5, 0)
    groups = [[task.solution(p), ["000|", "000|"]] for p in train]
    sw = L.read_jsonl(L.write_jsonl(tmp_path / "s.jsonl", L.stepwise_rows(task, train, groups)))
    assert len(sw) == 40 and sw[0]["labels"] == [True, True] and set(sw[0]) == {"prompt", "completions", "labels"}
    pref = L.read_jsonl(L.write_jsonl(tmp_path / "p.jsonl", L.preference_rows(task, train, groups)))
    assert len(pref) == len(train) and pref[0]["chosen"] == "".join(task.solution(train[0]))
    torch.manual_seed(0)
    model, tok = load_lm("tiny")
    losses = L.dpo_train(model, tok, pref, steps=15, batch_size=20, lr=3e-3, progress=False)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0] - 0.1
    prompts, comps = L.expert_iteration_data(task, train, groups)
    assert comps == ["".join(task.solution(p)) for p in train] and prompts == [p.prompt for p in train]
    sft(model, tok, prompts, comps, steps=2, batch_size=8, warmup=1, progress=False)


@pytest.fixture(scope="module")
def noisy_policy(tmp_path_factory):
    """A 3-digit noisy-teacher policy (forgets the carry 60% of the time)."""
    torch.manual_seed(0)
    task = make_task("column_add", 3, q_sys=0.6, q_rand=0.03)
    train, _ = split_problems(task, 3000, 10, 0)
    prompts, comps = demonstrations(task, train, 0)
    model, tok = load_lm("tiny")
    sft(model, tok, prompts, comps, steps=200, batch_size=64, lr=1e-2, warmup=20, progress=False)
    return save_lm(model, tok, tmp_path_factory.mktemp("pol") / "policy")


def test_expert_iteration_raises_accuracy(noisy_policy):
    torch.manual_seed(1)
    task = make_task("column_add", 3)
    train, test = split_problems(task, 300, 100, 1)
    model, tok = load_lm(str(noisy_policy))
    pol = LMPolicy(model, tok)
    g0 = sum(task.check(p, s) for p, s in zip(test, [r[0] for r in L.sample_groups(pol, task, test, 1, 0.0)]))
    groups = L.sample_groups(pol, task, train, 8)
    prompts, comps = L.expert_iteration_data(task, train, groups)
    assert comps and all(task.check(p, split_steps(c, "|")) for p, c in zip(
        [{q.prompt: q for q in train}[x] for x in prompts], comps))
    sft(model, tok, prompts, comps, steps=150, batch_size=64, lr=3e-3, warmup=10, progress=False)
    g1 = sum(task.check(p, s) for p, s in zip(test, [r[0] for r in L.sample_groups(pol, task, test, 1, 0.0)]))
    assert g1 >= g0 + 12, (g0, g1)  # one RFT round: measured 35 -> 52..67 of 100


def test_rl_loop_writes_rounds_and_resumes(noisy_policy, tmp_path):
    out = tmp_path / "rl"
    kw = dict(out=str(out), policy=str(noisy_policy), algo="expert-iter", difficulty=3, n_train=40, k=4,
              sft_steps=5, batch_size=16, n_test=10, eval_k=2, threads=1)
    with pytest.raises(RuntimeError):  # interrupted in round 2 (after round 1 finished)
        orig = L.expert_iteration_data

        def crash(task, probs, groups, *a, **k):
            if (out / "rounds" / "r01" / "done.json").is_file():
                raise RuntimeError("killed")
            return orig(task, probs, groups, *a, **k)

        L.expert_iteration_data = crash
        try:
            L.main(L.RLConfig(rounds=2, **kw))
        finally:
            L.expert_iteration_data = orig
    r1 = (out / "rounds" / "r01" / "stepwise.jsonl").read_text()
    assert not (out / "rounds" / "r02" / "done.json").exists()
    run = L.main(L.RLConfig(rounds=2, **kw))
    res = json.loads((run / "results.json").read_text())
    assert [h["round"] for h in res["history"]] == [0, 1, 2]
    assert (out / "rounds" / "r01" / "stepwise.jsonl").read_text() == r1  # round 1 data untouched
    rows = L.read_jsonl(out / "rounds" / "r02" / "stepwise.jsonl")
    assert len(rows) == 40 * 4  # no duplicated data
    assert (out / "rounds" / "r02" / "policy" / "model.safetensors").is_file()
    assert (run / "plots" / "accuracy_per_round.png").is_file()


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_rl_loop_other_algos(noisy_policy, tmp_path, algo):
    run = L.main(L.RLConfig(out=str(tmp_path / algo), policy=str(noisy_policy), algo=algo, rounds=1,
                            difficulty=3, n_train=40, k=4, grpo_steps=2, dpo_steps=2, n_test=10, eval_k=2,
                            grpo=L.GRPOParams(num_generations=4, prompts_per_step=8), threads=1))
    res = json.loads((run / "results.json").read_text())
    assert len(res["history"]) == 2 and (run / "rounds" / "r01" / "preference.jsonl").is_file()


@pytest.mark.parametrize("kw,msg", [({"algo": "ppox"}, "algo"), ({"rounds": 0}, ">= 1"), ({"filter": "x"}, "filter"),
                                    ({"grpo": L.GRPOParams(num_generations=1)}, "num_generations")])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        L.RLConfig(policy="x", **kw)


def test_missing_policy_fails_before_a_run_dir(tmp_path):
    with pytest.raises(ConfigError, match="policy"):
        L.main(L.RLConfig(out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_tour_section(tmp_path):
    from lmlab.tour import TourConfig

    run, text = L.tour_section(TourConfig(threads=1), tmp_path)
    res = json.loads((run / "results.json").read_text())
    assert res["rounds"][-1]["greedy"] > res["rounds"][0]["greedy"] and "greedy accuracy per round" in text


def test_cli_leaf_row(noisy_policy, tmp_path, capsys):
    """The Leaf row proposed for cli.COMMANDS parses flags, nested grpo.* overrides and reports bad input."""
    from lmlab.cli import Leaf, run_leaf

    leaf = Leaf("reason rl", "lmlab.reason.learn:main", "lmlab.reason.learn:RLConfig", "search -> learn loop",
                ("policy",))
    out = tmp_path / "cli"
    rc = run_leaf(leaf, [str(noisy_policy), "--algo", "rloo", "--rounds", "1", "--difficulty", "3", "--n-train",
                         "20", "--grpo-steps", "1", "--n-test", "5", "--eval-k", "2", "--out", str(out),
                         "grpo.num_generations=4", "grpo.prompts_per_step=4", "grpo.loss_type=dapo"])
    assert rc == 0 and (out / "rounds" / "r01" / "done.json").is_file()
    assert run_leaf(leaf, [str(noisy_policy), "--algo", "ppox"]) == 2
    assert "algo must be one of" in capsys.readouterr().err
