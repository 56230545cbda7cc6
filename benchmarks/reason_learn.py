"""Learning-from-search benchmark (o1 roadmap testbed, spec section 3.2 "Learning"): 6-digit column addition,
start = the noisy-teacher policy (forgets the carry 60% of the time; greedy ~0.05).

    python benchmarks/reason_learn.py [--n-test 300] [--grpo-steps 100] [--threads 1]
                                      [--out benchmarks/results/reason_learn.json]

  L1  expert iteration (RFT) round 1 with the outcome checker: 1,500 problems x 8 samples, keep unique verified,
      300 SFT steps (lr 3e-3, batch 128). Bar: greedy >= 0.90.
  L2  GRPO (G = 8, 32 prompts/step, lr 1e-4, beta 0, 0/1 outcome reward), greedy every 25 steps, CPU seconds.
      Bar: greedy >= 0.85 within 100 steps.
  L3  behaviour cloning on PRM-guided beam search (N = 16, M = 4, weighted pick) with a *trained* PRM and no
      checker at train time: 1,500 problems, 1 pick each, 300 SFT steps. Bar: greedy >= 0.6. --bc-rounds R
      repeats it (search with the cloned policy, clone again; never a checker).
  L4  test-time scaling (weighted BoN with the same PRM, N = 1, 4, 16) before and after L1 (plot).
  L5  PPO with a value model + GAE (32 prompts x 8 samples/step, lr 1e-4, kl_coef 0.05, lam 0.95, 4 epochs),
      greedy every 25 steps and CPU seconds (same rollout cost per step as L2).
  L6  process rewards inside GRPO: outcome-only vs + alpha * (Phi(s_k) - Phi(s_{k-1})) (potential, Phi = the
      gold-10k PRM) vs + alpha * Phi(s_k) (raw) vs the PRM alone as the reward (no checker; reward hacking shows
      as PRM reward up, gold accuracy not), greedy per CPU second.
  L7  step-level DPO: pairs of next steps at the same prefix of 8 sampled solutions per problem (Q = mean
      outcome below the step), 1,500 problems, --dpo-steps DPO steps (beta 0.1, --dpo-lr); the checker-free variant
      (Q = PRM score of the step); solution-level DPO on the same samples.
  L8  GRPO stability at 100+ steps: lr 1e-4 beta 0 (L2) vs beta 0.04 vs lr 5e-5 vs beta 0.04 + reference reset
      every 25 steps, greedy every 25 steps up to --stab-steps.
The noisy policy and the gold-10k PRM are reused from benchmarks/reason_search.py's cache when present
(runs/reason_bench_cache), else trained here (SFT 600 steps; PRM 300 steps on 10k gold-labelled policy samples).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("reason_learn_bench")


def greedy_acc(model, tok, task, test) -> float:
    from lmlab.reason.learn import sample_groups
    from lmlab.reason.policy import LMPolicy

    g = sample_groups(LMPolicy(model, tok), task, test, 1, 0.0)
    return sum(task.check(p, r[0]) for p, r in zip(test, g)) / len(test)


def get_policy_and_prm(cache: Path, shared: Path, policy_name: str = "policy_noisy", prm_name: str = "gold10k"):
    from lmlab.reason.policy import LMPolicy, build_task, demonstrations, load_lm, rollout, save_lm, sft, split_problems
    from lmlab.reason.reward import RewardModel, RMScorer, load_rm, save_rm, train_rm

    for root in (shared, cache):
        if (root / policy_name / "model.safetensors").is_file():
            model, tok = load_lm(str(root / policy_name))
            break
    else:
        task = build_task("column_add", 6, q_sys=0.6, q_rand=0.03)
        train, _ = split_problems(task, 60_000, 300, 0)
        prompts, comps = demonstrations(task, train, 0)
        torch.manual_seed(0)
        model, tok = load_lm("tiny")
        sft(model, tok, prompts, comps, steps=600, batch_size=128, lr=3e-3, warmup=100)
        save_lm(model, tok, cache / policy_name)
    for root in (shared, cache):
        if (root / prm_name / "rm.json").is_file():
            rm, rtok = load_rm(root / prm_name)
            return model, tok, RMScorer(rm, rtok)
    task = build_task("column_add", 6)
    train, _ = split_problems(task, 12_000, 300, 0)
    probs = train[-10_000:]
    sols = [r[0] for r in rollout(LMPolicy(model, tok), task, probs, [[] for _ in probs], 1)]
    rm = RewardModel.from_policy(model)
    train_rm(rm, tok, probs, sols, [[float(x) for x in task.step_labels(p, s)] for p, s in zip(probs, sols)],
             steps=300)
    save_rm(rm, tok, cache / prm_name, {"label": "gold", "n": len(probs)})
    return model, tok, RMScorer(rm, tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--grpo-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="runs/reason_learn_cache")
    ap.add_argument("--shared-cache", default="runs/reason_bench_cache")
    ap.add_argument("--out", default="benchmarks/results/reason_learn.json")
    ap.add_argument("--bc-search", default="beam", help="L3 search: beam | dvts (N = 16, M = 4, weighted pick)")
    ap.add_argument("--skip", nargs="*", default=[], help="stages to skip: L1 ... L8")
    ap.add_argument("--only", nargs="*", default=[], help="run only these stages (e.g. L5 L6)")
    ap.add_argument("--stab-steps", type=int, default=150)
    ap.add_argument("--bc-rounds", type=int, default=1, help="L3: no-checker expert-iteration rounds")
    ap.add_argument("--dpo-lr", type=float, default=1e-3, help="L7: DPO learning rate")
    ap.add_argument("--dpo-steps", type=int, default=200, help="L7: DPO steps")
    ap.add_argument("--dpo-nll", type=float, default=0.0, help="L7: NLL weight on chosen (RPO); 0 = plain DPO")
    ap.add_argument("--l6-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy-name", default="policy_noisy",
                    help="cached noisy policy folder (reason_search.py names: policy_noisy = 600 SFT steps, "
                         "policy_noisy_sft1500 = 1500)")
    ap.add_argument("--prm-name", default="gold10k", help="cached gold PRM folder (e.g. gold10k_sft1500_rm300)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lmlab.core.plotting import line_plot
    from lmlab.reason import learn as L
    from lmlab.reason.policy import LMPolicy, build_task, sft, split_problems
    from lmlab.reason.search import SearchParams, run_search, scaling_curves

    if args.only:
        args.skip = [f"L{i}" for i in range(1, 9) if f"L{i}" not in args.only]
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    base, tok, prm = get_policy_and_prm(cache, Path(args.shared_cache), args.policy_name, args.prm_name)
    task = build_task("column_add", 6)
    train, test = split_problems(task, 3 * args.n_train, args.n_test, 0)
    res: dict = {"n_test": args.n_test, "init_greedy": greedy_acc(base, tok, task, test)}
    log.info("init greedy %.3f", res["init_greedy"])

    def save():
        out.write_text(json.dumps(res, indent=1))

    rft = None
    if "L1" not in args.skip:
        t0 = time.process_time()
        rft = copy.deepcopy(base)
        probs = train[: args.n_train]
        groups = L.sample_groups(LMPolicy(rft, tok), task, probs, 8)
        prompts, comps = L.expert_iteration_data(task, probs, groups)
        sft(rft, tok, prompts, comps, steps=300, batch_size=128, lr=3e-3, warmup=30)
        res["rft_round1"] = {"n_clone": len(comps), "greedy": greedy_acc(rft, tok, task, test),
                             "cpu_s": round(time.process_time() - t0, 1)}
        log.info("RFT round 1: %s", res["rft_round1"])
        save()
    if "L2" not in args.skip:
        model = copy.deepcopy(base)
        tr = L.GRPOTrainer(model, tok, task, L.outcome_reward(task), L.GRPOParams(), seed=0)
        curve, t0, cpu = {0: res["init_greedy"]}, time.process_time(), {0: 0.0}
        rewards = []
        for s in range(1, args.grpo_steps + 1):
            rewards.append(tr.step(train[args.n_train: 2 * args.n_train])["reward"])
            if s % 25 == 0:
                cpu[s] = round(time.process_time() - t0, 1)
                curve[s] = greedy_acc(model, tok, task, test)
                log.info("GRPO step %d: greedy %.3f (train reward %.3f, %.0f cpu-s)", s, curve[s], rewards[-1], cpu[s])
        res["grpo"] = {"greedy": curve, "cpu_s": cpu, "train_reward": rewards}
        save()
        line_plot(out.with_name("reason_learn_grpo.png"), list(curve), {"greedy": list(curve.values())},
                  title="GRPO (G=8, 32 prompts/step, beta 0)", xlabel="step", ylabel="greedy accuracy")
    if "L3" not in args.skip:
        t0 = time.process_time()
        model = copy.deepcopy(base)
        per_round = []
        for rnd in range(args.bc_rounds):  # round 2+: search again with the cloned policy (still no checker)
            sl = (2 + rnd) % 3
            probs = train[sl * args.n_train: (sl + 1) * args.n_train]
            r = run_search(args.bc_search, probs, LMPolicy(model, tok), task, prm, SearchParams(n=16, m=4))
            picks = [x.chosen for x in r]
            prompts, comps = L.expert_iteration_data(task, probs, [x.completions for x in r], "none", picks)
            sft(model, tok, prompts, comps, steps=300, batch_size=128, lr=3e-3, warmup=30)
            data_ok = sum(task.check(p, s) for p, s in zip(probs, picks)) / len(probs)
            per_round.append({"data_correct": data_ok, "greedy": greedy_acc(model, tok, task, test),
                              "cpu_s": round(time.process_time() - t0, 1)})
            log.info("BC on PRM-%s(16), no checker, round %d: %s", args.bc_search, rnd + 1, per_round[-1])
        key = f"bc_prm_{args.bc_search}" + (f"_{args.bc_rounds}rounds" if args.bc_rounds > 1 else "")
        res[key] = per_round[0] if args.bc_rounds == 1 else per_round
        save()
    if "L4" not in args.skip and rft is not None:
        curves = {}
        for name, m in (("before (noisy SFT)", base), ("after RFT round 1", rft)):
            c = scaling_curves(test[:100], LMPolicy(m, tok), task, prm, ["weighted_bon"], [1, 4, 16], SearchParams())
            curves[name] = {n: v["accuracy"] for n, v in c["weighted_bon"].items()}
        res["scaling_weighted_bon"] = curves
        save()
        xs = [1, 4, 16]
        line_plot(out.with_name("reason_learn_scaling.png"), xs,
                  {k: [v[str(n)] for n in xs] for k, v in curves.items()},
                  title="weighted BoN (gold-10k PRM) before / after learning", xlabel="N", ylabel="accuracy")
    pool = train[args.n_train: 2 * args.n_train]

    def curve(trainer, steps: int, every: int = 25) -> dict:
        """greedy every `every` steps, CPU seconds, train reward (+ process return / kl when reported)."""
        m = trainer.model
        c, cpu, rew, extra = {0: res["init_greedy"]}, {0: 0.0}, [], []
        t0 = time.process_time()
        for s in range(1, steps + 1):
            torch.manual_seed(args.seed * 1000 + s)
            o = trainer.step(pool)
            rew.append(round(o["reward"], 4))
            extra.append({k: round(v, 4) for k, v in o.items() if isinstance(v, float) and k != "reward"})
            if s % every == 0:
                cpu[s] = round(time.process_time() - t0, 1)
                c[s] = greedy_acc(m, tok, task, test)
                log.info("step %d: greedy %.3f (train reward %.3f, %.0f cpu-s)", s, c[s], rew[-1], cpu[s])
        return {"greedy": c, "cpu_s": cpu, "train_reward": rew, "last": extra[-1] if extra else {}}

    if "L5" not in args.skip:
        torch.manual_seed(args.seed)
        tr = L.PPOTrainer(copy.deepcopy(base), tok, task, L.outcome_reward(task), L.PPOParams(), seed=args.seed)
        log.info("L5 PPO")
        res["ppo"] = curve(tr, args.grpo_steps)
        save()
    if "L6" not in args.skip:
        def prm_reward(p, s):
            sc = prm.score([p], [s])[0]
            return float(sc[-1]) if sc else 0.0

        runs = {"outcome only": (L.outcome_reward(task), {}),
                "outcome + 0.5 potential": (L.outcome_reward(task), {"process_alpha": 0.5}),
                "outcome + 0.5 raw PRM": (L.outcome_reward(task), {"process_alpha": 0.5, "process_mode": "raw"}),
                "PRM score only (no checker)": (prm_reward, {})}
        res["shaping"] = {}
        for name, (fn, kw) in runs.items():
            torch.manual_seed(args.seed)
            tr = L.GRPOTrainer(copy.deepcopy(base), tok, task, fn, L.GRPOParams(**kw), seed=args.seed, scorer=prm)
            log.info("L6 %s", name)
            res["shaping"][name] = curve(tr, args.l6_steps)
            if fn is prm_reward:  # gold accuracy of the samples the PRM rewarded
                res["shaping"][name]["note"] = "train_reward = PRM last-step score"
            save()
        line_plot(out.with_name("reason_learn_shaping.png"), list(res["shaping"]["outcome only"]["cpu_s"].values()),
                  {k: list(v["greedy"].values()) for k, v in res["shaping"].items()},
                  title="GRPO: outcome-only vs PRM-shaped (greedy per CPU-s of the outcome run)", xlabel="CPU s",
                  ylabel="greedy accuracy")
    if "L7" not in args.skip:
        from lmlab.reason.policy import LMPolicy as _P
        from lmlab.reason.tasks import split_steps

        probs = train[2 * args.n_train: 3 * args.n_train]
        res["step_dpo"] = {}
        torch.manual_seed(args.seed)
        groups = L.sample_groups(_P(base, tok), task, probs, 8)
        for name, sc in (("outcome Q", None), ("PRM Q (no checker)", prm)):
            t0 = time.process_time()
            model = copy.deepcopy(base)
            rows = L.step_preference_rows(task, probs, groups, sc, min_gap=0.5 if sc is None else 0.3)
            by_prompt = {q.prompt: q for q in probs}
            good = 0  # pairs whose chosen step is gold-correct and rejected step gold-wrong at that prefix
            for r in rows:
                head = r["prompt"].index(":") + 1
                q, pre = by_prompt[r["prompt"][:head]], split_steps(r["prompt"][head:], task.step_sep)
                good += task.step_labels(q, pre + [r["chosen"]])[-1] > task.step_labels(q, pre + [r["rejected"]])[-1]
            losses = L.dpo_train(model, tok, rows, steps=args.dpo_steps, batch_size=64, lr=args.dpo_lr, beta=0.1,
                                 seed=args.seed, progress=False, nll_weight=args.dpo_nll)
            res["step_dpo"][name] = {"n_pairs": len(rows), "final_loss": round(losses[-1], 4),
                                     "greedy": greedy_acc(model, tok, task, test),
                                     "cpu_s": round(time.process_time() - t0, 1),
                                     "pairs_gold_consistent": round(good / max(len(rows), 1), 3)}
            log.info("L7 step-DPO %s: %s", name, res["step_dpo"][name])
            save()
        t0 = time.process_time()
        model = copy.deepcopy(base)
        rows = L.preference_rows(task, probs, groups)
        losses = L.dpo_train(model, tok, rows, steps=args.dpo_steps, batch_size=64, lr=args.dpo_lr, beta=0.1,
                             seed=args.seed, progress=False, nll_weight=args.dpo_nll)
        res["step_dpo"]["solution-level DPO (same samples)"] = {"n_pairs": len(rows),
                                                               "greedy": greedy_acc(model, tok, task, test),
                                                               "cpu_s": round(time.process_time() - t0, 1)}
        save()
    if "L8" not in args.skip:
        variants = {"lr 1e-4, beta 0": {}, "lr 1e-4, beta 0.04": {"beta": 0.04}, "lr 5e-5, beta 0": {"lr": 5e-5},
                    "lr 1e-4, beta 0.04, ref reset 25": {"beta": 0.04, "ref_reset": 25}}
        res["grpo_stability"] = {}
        for name, kw in variants.items():
            torch.manual_seed(args.seed)
            tr = L.GRPOTrainer(copy.deepcopy(base), tok, task, L.outcome_reward(task), L.GRPOParams(**kw),
                               seed=args.seed)
            log.info("L8 %s", name)
            res["grpo_stability"][name] = curve(tr, args.stab_steps)
            save()
    save()
    print(json.dumps({k: v for k, v in res.items() if k not in ("grpo", "ppo", "shaping", "grpo_stability")},
                     indent=1))
    for key in ("grpo", "ppo"):
        if key in res:
            print(key, "greedy", res[key]["greedy"], "cpu_s", res[key]["cpu_s"])
    for key in ("shaping", "grpo_stability"):
        for name, v in res.get(key, {}).items():
            print(f"{key:15s} {name:38s} greedy {v['greedy']} cpu_s {v['cpu_s']}")


if __name__ == "__main__":
    main()
