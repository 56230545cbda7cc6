"""Reasoning benchmark (o1 roadmap testbed): policy init, reward models, search scaling, expansion speed.

    python benchmarks/reason_search.py [--n-test 300] [--seeds 0 1] [--threads 1] [--sft-steps 1500]
                                       [--rm-steps 300] [--gold-rm-steps 300] [--only B1 speed B3 B4 weak]
                                       [--skip-mcts] [--out benchmarks/results/reason_search.json]

Pipeline (6-digit column addition with a visible carry, spec section 3):
  B1  SFT a from-scratch ~110k-param GPT (1500 steps) on clean demos (q_sys = 0, q_rand = 0.03) and on a
      majority-wrong teacher (q_sys = 0.6): greedy accuracy and pass@16 on held-out problems. (600 steps, the
      spec's value, left the sampling distribution too flat: clean greedy 0.913 on seed 1, gold PRM 0.868.)
  B2  self-consistency trap: majority@N for N in {1, 4, 16, 64} from the noisy policy.
  B3  reward models initialized from the noisy policy, 300 steps each: PRM on 10k gold-labelled solutions, Math-Shepherd
      hard / soft PRMs (2k solutions, K = 8), ORM (2k): step accuracy at 0.5 and AUC vs gold first-error labels.
  B4  search scaling with the gold-10k PRM: weighted BoN, beam (M = 4), DVTS, MCTS (PUCT c = 1.5, width 4,
      progressive widening 0.5 and off), greedy.
  B5  over-optimization with the weak MC-soft PRM: argmax-BoN@16 vs @64; the search gap pass@N - selected@N.
  S   speed: batched KV-cached ``LMPolicy.expand`` vs one-sequence-at-a-time HF ``generate`` on the same model
      and prompts (same number of new tokens), tokens/s.
Seeds: B1 trains the policies with every ``--policy-seeds`` entry; later stages use the first. The search evaluation
runs for every ``--seeds`` entry (fresh sampling): the first runs the full comparison (all methods with the gold-10k
PRM, BoN family with every RM, MCTS without widening); further seeds repeat the near-threshold bars only (BoN family,
beam@4, MCTS@4/@N_max). Step-level search with the weak RMs is not in the default run (CPU budget).
Trained models are cached under ``--cache`` (default runs/reason_bench_cache; folder names carry the SFT / RM step
counts) so a rerun only repeats the evaluation. ``--only`` runs a subset of the parts (the noisy seed-0 policy and
the gold-10k PRM are always built, since every later part needs them).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("reason_bench")


def get_policy(cache: Path, name: str, q_sys: float, seed: int = 0):
    from lmlab.reason.policy import build_task, demonstrations, load_lm, save_lm, sft, split_problems

    folder = cache / f"{name}_sft{SIZES['sft_steps']}"
    if (folder / "model.safetensors").is_file():
        return load_lm(str(folder))
    task = build_task("column_add", 6, q_sys=q_sys, q_rand=0.03)
    train, _ = split_problems(task, 60_000, 300, seed)
    prompts, comps = demonstrations(task, train, seed)
    torch.manual_seed(seed)
    model, tok = load_lm("tiny")
    t0 = time.time()
    sft(model, tok, prompts, comps, steps=SIZES["sft_steps"], batch_size=128, lr=3e-3, warmup=100, seed=seed)
    log.info("SFT %s: %.0f s", name, time.time() - t0)
    save_lm(model, tok, folder)
    return model, tok


_SOFT: dict = {}
PARTS = {"B1", "speed", "B3", "B4", "weak"}
SIZES = {"sft_steps": 1500, "rm_steps": 300, "rm_steps_gold": 300, "n_gold": 10_000, "n_mc": 2000}


def get_rm(cache: Path, name: str, model, tok, task, policy, probs, sols, label: str, k: int = 8):
    """Train (or load from the cache) one RM; Math-Shepherd soft labels are computed once for hard and soft."""
    from lmlab.reason.reward import RewardModel, RMScorer, label_solutions, load_rm, mc_labels, save_rm, train_rm

    steps = SIZES["rm_steps_gold"] if label == "gold" else SIZES["rm_steps"]
    folder = cache / f"{name}_sft{SIZES['sft_steps']}_rm{steps}"
    if (folder / "rm.json").is_file():
        rm, rtok = load_rm(folder)
        return RMScorer(rm, rtok), json.loads((folder / "rm.json").read_text()).get("label_stats", {})
    t0 = time.time()
    if label.startswith("mc"):
        if len(probs) not in _SOFT:
            _SOFT[len(probs)] = mc_labels(policy, task, probs, sols, k)
        soft, masks = _SOFT[len(probs)], None
        targets = soft if label == "mc_soft" else [[float(x > 0) for x in r] for r in soft]
    else:
        targets, masks = label_solutions(label, policy, task, probs, sols, k)
    stats = {"label_seconds": round(time.time() - t0, 1)}
    if label.startswith("mc"):
        gold = [task.step_labels(p, s) for p, s in zip(probs, sols)]
        hard = [float(x > 0) for r in targets for x in r]
        stats["mc_label_agreement_with_gold"] = sum(h == g for h, g in zip(hard, [y for r in gold for y in r])) / len(
            hard)
    rm = RewardModel.from_policy(model)
    torch.manual_seed(0)
    train_rm(rm, tok, probs, sols, targets, masks, steps=steps, batch_size=256, lr=2e-3)
    stats["train_seconds"] = round(time.time() - t0 - stats["label_seconds"], 1)
    save_rm(rm, tok, folder, {"label": label, "label_stats": stats})
    return RMScorer(rm, tok), stats


def speed(model, tok, prompts: list[str], new_tokens: int) -> dict:
    """Batched KV-cached expand vs HF generate one sequence at a time (greedy, same prompts, same token count)."""
    from lmlab.reason.policy import LMPolicy

    pol = LMPolicy(model, tok)
    t0 = time.perf_counter()
    out = pol.expand(prompts, 1, stop=None, max_new_tokens=new_tokens, temperature=0.0)
    t_batch = time.perf_counter() - t0
    n_batch = sum(e.n_tokens for r in out for e in r)
    t0 = time.perf_counter()
    n_hf = 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            n_hf += g.shape[1] - ids.shape[1]
    t_hf = time.perf_counter() - t0
    same = all(tok.decode(model.generate(torch.tensor([tok.encode(p)]), max_new_tokens=new_tokens,
                                         do_sample=False, pad_token_id=0)[0, len(tok.encode(p)):].tolist())
               == r[0].text for p, r in zip(prompts[:8], out[:8]))
    return {"prompts": len(prompts), "new_tokens": new_tokens, "expand_tok_per_s": round(n_batch / t_batch, 1),
            "hf_generate_tok_per_s": round(n_hf / t_hf, 1), "speedup": round((n_batch / t_batch) / (n_hf / t_hf), 2),
            "greedy_text_identical_first8": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--policy-seeds", type=int, nargs="+", default=[0, 1],
                    help="SFT seeds for B1 (the first one is the policy every later stage uses)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--out", default="benchmarks/results/reason_search.json")
    ap.add_argument("--cache", default="runs/reason_bench_cache", help="trained policies / RMs (reused if present)")
    ap.add_argument("--sft-steps", type=int, default=SIZES["sft_steps"], help="SFT steps of every policy")
    ap.add_argument("--rm-steps", type=int, default=SIZES["rm_steps"], help="training steps of the 2k MC / ORM RMs")
    ap.add_argument("--gold-rm-steps", type=int, default=SIZES["rm_steps_gold"],
                    help="training steps of the gold-10k PRM")
    ap.add_argument("--only", nargs="+", choices=sorted(PARTS), default=sorted(PARTS),
                    help="parts to run: B1 (all policy seeds), speed, B3 (gold-10k PRM), B4 (search with it, also "
                         "gives B2), weak (MC/ORM RMs, their BoN curves = B5, MCTS without widening, DVTS)")
    ap.add_argument("--skip-mcts", action="store_true", help="no MCTS runs (the slowest part: Python tree code)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes to check the script runs (numbers meaningless)")
    args = ap.parse_args()
    SIZES.update(sft_steps=args.sft_steps, rm_steps=args.rm_steps, rm_steps_gold=args.gold_rm_steps)
    if args.smoke:
        SIZES.update(sft_steps=10, rm_steps=3, rm_steps_gold=3, n_gold=200, n_mc=100)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from lmlab.core.plotting import line_plot
    from lmlab.reason.policy import LMPolicy, build_task, evaluate_policy, rollout, split_problems
    from lmlab.reason.reward import prm_quality
    from lmlab.reason.search import SearchParams, scaling_curves

    out = Path(args.out)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    T0, C0 = time.time(), time.process_time()
    parts = set(args.only)
    res: dict = {"setup": {"digits": 6, "n_test": args.n_test, "seeds": args.seeds, "budgets": args.budgets,
                           "threads": args.threads, "parts": sorted(parts), **SIZES}}
    task = build_task("column_add", 6)
    train, test = split_problems(task, SIZES["n_gold"], args.n_test, 0)

    # B1 policy initialization
    res["B1"] = {}
    for ps in args.policy_seeds if "B1" in parts else args.policy_seeds[:1]:
        sfx = "" if ps == 0 else f"_seed{ps}"
        for kind, q in (("clean", 0.0), ("noisy", 0.6)) if "B1" in parts else (("noisy", 0.6),):
            m, tok = get_policy(cache, f"policy_{kind}{sfx}", q, seed=ps)
            torch.manual_seed(0)
            ev = evaluate_policy(LMPolicy(m, tok), task, test, 16)
            res["B1"][f"{kind}{sfx}"] = ev
            if ps == args.policy_seeds[0]:
                res["B1"][kind] = ev
                if kind == "noisy":
                    noisy_m = m
    log.info("B1 clean greedy %.3f | noisy greedy %.3f pass@16 %.3f", res["B1"].get("clean", {}).get("greedy", -1),
             res["B1"]["noisy"]["greedy"], res["B1"]["noisy"]["pass@16"])
    if "speed" in parts:
        res["speed"] = speed(noisy_m, tok, [p.prompt for p in test[:64]], 24)
        log.info("speed %s", res["speed"])

    # B3 reward models (from noisy-policy solutions to training problems)
    policy = LMPolicy(noisy_m, tok)
    torch.manual_seed(0)
    sols = [r[0] for r in rollout(policy, task, train, [[] for _ in train], 1)]
    tsols = [r[0] for r in rollout(policy, task, test, [[] for _ in test], 1)]
    rms, res["B3"] = {}, {}
    ng, nm = SIZES["n_gold"], SIZES["n_mc"]
    weak = "weak" in parts
    for name, label, n in (("gold10k", "gold", ng), ("mc_hard2k", "mc_hard", nm), ("mc_soft2k", "mc_soft", nm),
                           ("orm2k", "orm", nm))[: 4 if weak else 1]:
        rms[name], stats = get_rm(cache, name, noisy_m, tok, task, policy, train[:n], sols[:n], label)
        q = prm_quality(rms[name], task, test, tsols)
        res["B3"][name] = {**q, **stats}
        log.info("B3 %s: step acc %.3f AUC %.3f", name, q["step_accuracy"], q["auc"])

    # B2 + B4 + B5 search
    res["search"] = {}
    for seed in args.seeds:
        torch.manual_seed(1000 + seed)
        r: dict = {}
        t0 = time.time()
        first = seed == args.seeds[0]
        # the full method comparison once; further seeds repeat the near-threshold bars only (CPU budget)
        step_budgets = args.budgets if first else [4, max(args.budgets)]
        if "B4" not in parts:
            break
        r["gold10k"] = scaling_curves(test, policy, task, rms["gold10k"], ["greedy", "majority", "bon", "weighted_bon"],
                                      args.budgets, SearchParams(agg="min"))
        for m, bud in (("beam", [4] if not first else step_budgets),
                       ("dvts", step_budgets if first and weak else []),
                       ("mcts", [] if args.skip_mcts else step_budgets)):
            if bud:
                r["gold10k"].update(scaling_curves(test, policy, task, rms["gold10k"], [m], bud,
                                                   SearchParams(agg="min", widen=0.5)))
        if first and weak and not args.skip_mcts:
            r["gold10k_mcts_nowiden"] = scaling_curves(test, policy, task, rms["gold10k"], ["mcts"],
                                                       [4, max(args.budgets)], SearchParams(widen=0.0))
            r["mc_hard2k"] = scaling_curves(test, policy, task, rms["mc_hard2k"], ["bon", "weighted_bon"],
                                            args.budgets, SearchParams(agg="min"))
            r["orm2k"] = scaling_curves(test, policy, task, rms["orm2k"], ["bon", "weighted_bon"], args.budgets,
                                        SearchParams(agg="last"))
        if weak:
            r["mc_soft2k"] = scaling_curves(test, policy, task, rms["mc_soft2k"], ["bon", "weighted_bon"],
                                            args.budgets, SearchParams(agg="last"))
        r["seconds"] = round(time.time() - t0, 1)
        res["search"][str(seed)] = r
        log.info("search seed %d done in %.0f s", seed, r["seconds"])

    # bars
    def acc(seed, rm, m, n):
        return res["search"].get(str(seed), {}).get(rm, {}).get(m, {}).get(str(n), {}).get("accuracy", float("nan"))

    nmax = str(max(args.budgets))
    bars = {}
    for ps in args.policy_seeds if "B1" in parts else []:
        sfx = "" if ps == 0 else f"_seed{ps}"
        bars[f"B1_policyseed{ps}_clean_greedy>=0.95"] = res["B1"][f"clean{sfx}"]["greedy"]
        bars[f"B1_policyseed{ps}_noisy_greedy<=0.15"] = res["B1"][f"noisy{sfx}"]["greedy"]
        bars[f"B1_policyseed{ps}_noisy_pass@16>=0.5"] = res["B1"][f"noisy{sfx}"]["pass@16"]
    for s in args.seeds if "B4" in parts else []:
        bars[f"B2_seed{s}_majority@{nmax}-majority@1<=0.05"] = acc(s, "gold10k", "majority", nmax) - acc(
            s, "gold10k", "majority", 1)
        bars[f"B4_seed{s}_weighted_bon@{nmax}>=0.65"] = acc(s, "gold10k", "weighted_bon", nmax)
        bars[f"B4_seed{s}_weighted_bon_monotone"] = all(
            acc(s, "gold10k", "weighted_bon", a) <= acc(s, "gold10k", "weighted_bon", b)
            for a, b in zip(args.budgets, args.budgets[1:]))
        bars[f"B4_seed{s}_beam@4/greedy>=3"] = acc(s, "gold10k", "beam", 4) / max(acc(s, "gold10k", "greedy", 1),
                                                                                  1e-9)
        if not args.skip_mcts:
            bars[f"B4_seed{s}_mcts@{nmax}-mcts@4>=0.15"] = acc(s, "gold10k", "mcts", nmax) - acc(s, "gold10k", "mcts",
                                                                                                 4)
        if weak:
            bars[f"B5_seed{s}_argmax_bon@{nmax}<argmax_bon@16 (mc_soft)"] = [acc(s, "mc_soft2k", "bon", nmax),
                                                                              acc(s, "mc_soft2k", "bon", 16)]
    bars["B3_gold10k_step_acc>=0.90"] = res["B3"]["gold10k"]["step_accuracy"]
    if weak:
        bars["B3_mc_hard2k_step_acc>=0.70"] = res["B3"]["mc_hard2k"]["step_accuracy"]
    if "speed" in parts:
        bars["speed_expand/hf_generate>=3"] = res["speed"]["speedup"]
    res["bars"] = bars
    res["wall_seconds"] = round(time.time() - T0, 1)
    res["cpu_seconds"] = round(time.process_time() - C0, 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float))
    print(json.dumps(bars, indent=1, default=float))
    if "B4" not in parts:
        print(f"wrote {out}; wall {res['wall_seconds']} s, cpu {res['cpu_seconds']} s")
        return
    s0 = str(args.seeds[0])
    curves = res["search"][s0]["gold10k"]
    plot = out.with_suffix(".png")
    xs = {m: [c[k]["tokens"] for k in sorted(c, key=int)] for m, c in curves.items() if len(c) > 1}
    ys = {m: [c[k]["accuracy"] for k in sorted(c, key=int)] for m, c in curves.items() if len(c) > 1}
    xs["pass@N"] = xs["weighted_bon"]
    ys["pass@N"] = [curves["weighted_bon"][k]["pass"] for k in sorted(curves["weighted_bon"], key=int)]
    line_plot(plot, xs, ys, title="6-digit addition, noisy-teacher policy, gold-10k PRM", logx=True,
              xlabel="generated tokens / problem", ylabel="accuracy")
    print(f"wrote {out} and {plot}; wall {res['wall_seconds']} s, cpu {res['cpu_seconds']} s")


if __name__ == "__main__":
    main()
