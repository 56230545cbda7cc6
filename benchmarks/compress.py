"""Compression benchmark on ref:dense: one bytes-vs-quality table and curve for every method, plus the gates.

    python benchmarks/compress.py [--niter 16] [--sort-samples 16] [--max-tokens 4096]
                                  [--out benchmarks/results/compress.json] [--part all|jra|lowbit|orders]

Methods (all on the same held-out text: the reference corpus' validation split, code/prose/math, bits/byte
averaged over the three domains; bytes = all weight bytes, uncompressed tensors at fp16):

* BitStack (activation-aware, ``niter`` blocks of k=auto per linear) in its sorted ("average") order, a random
  order, and uniform allocation (every linear at the same number of blocks: the largest that fits the budget);
  the decompose + sort + first load is timed (wall and CPU seconds);
* RTN at w1..w8 with per-row, g64 and g32 groups; GPTQ w2..w4 (per-row and g64; 32 x 256-token calibration);
* data-free rank-k at keep 0.8/0.6/0.4/0.25, joint vs separate, for {q,k,v} and {gate,up} separately, and
  joint {q,k,v}+{gate,up} followed by RTN w4 g64 of the factors.

Follow-ups (``--part``, each writes ``benchmarks/results/compress_<part>.json``; differences come with a paired
standard error from per-chunk bits on the same text, ``quant.paired_bpb_diff``):

* ``jra``: joint vs separate rank-k for {q,k}, {q,k,v}, {gate,up} at equal parameters, with the weight error;
* ``lowbit``: BitStack (default, greedy order, no scaling, more sorting / calibration text, k=2) against RTN and
  GPTQ at their bytes, RTN/GPTQ accounted with b-bit zeros (the issue's ``b + (16+b)/g``) and with fp16 zeros;
* ``orders``: sorted vs ``--random-seeds`` random orders vs uniform between every two levels.

Gates (printed as PASS/FAIL): sorted beats random and uniform at every matched budget; at <= 2.1 bits/param
BitStack beats RTN by >= 0.5 bits/byte; the sorted curve does not rise over steps of >= 5% of the size range
(tolerance 1e-3); joint <= separate + 0.005 bits/byte at keep 0.8/0.6/0.4; decompose + sort + load < 180 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def plot(png: Path, xs: dict, ys: dict, fp: float, model: str) -> None:
    """bits/byte vs bits/param, y clipped near fp (RTN w1 is off the chart) and the full range in an inset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {"BitStack": ("-", "o"), "RTN": (":", "s"), "GPTQ": ("--", "^"), "rank-k": ("-.", "D")}
    for name in xs:
        ls, mk = styles[name.split()[0]]
        ax.plot(xs[name], ys[name], linestyle=ls, marker=mk, markersize=3.5, linewidth=1.6 if "sorted" in name
                else 1.0, label=name)
    ax.axhline(fp, color="black", linewidth=0.8, linestyle="--", label=f"fp32 {fp:.3f}")
    ax.set_xlim(1.0, 16.0)
    ax.set_ylim(fp - 0.02, fp + 0.45)
    ax.set_xlabel("bits/param of the compressed linears (total bytes incl. the fp16 rest)")
    ax.set_ylabel("validation bits/byte (code, prose, math)")
    ax.set_title(f"{model}: quality vs weight bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def series(res: dict) -> tuple[dict, dict]:
    """Plot series (x = bits/param, y = bits/byte) from a results dict."""
    extra, n_params = res["extra_bytes_fp16"], res["params_compressed"]

    def bpp(total_bytes: float) -> float:
        return (total_bytes - extra) * 8 / n_params

    compare = res["bitstack_compare"]
    pts = sorted({(g["bytes"], g["bpb"]) for g in res["bitstack_grid"]}
                 | {(c["sorted_bytes"], c["sorted"]) for c in compare})
    xs: dict = {"BitStack sorted": [bpp(b) for b, _ in pts]}
    ys: dict = {"BitStack sorted": [v for _, v in pts]}
    cr = sorted({(c["random_bytes"], c["random"]) for c in compare})
    xs["BitStack random"], ys["BitStack random"] = [bpp(b) for b, _ in cr], [v for _, v in cr]
    un = sorted({(c["uniform_bytes"], c["uniform"]) for c in compare})
    xs["BitStack uniform"], ys["BitStack uniform"] = [bpp(b) for b, _ in un], [v for _, v in un]
    for method, groups in (("rtn", (0, 64, 32)), ("gptq", (0, 64))):
        for g in groups:
            rows = [r for r in res[method] if r["group"] == g]
            name = f"{method.upper()} {'per-row' if g == 0 else f'g{g}'}"
            xs[name], ys[name] = [r["bits_per_param"] for r in rows], [r["bpb"] for r in rows]
    for grp in ("qkv", "gate_up"):
        for mode in ("joint", "separate"):
            sub = sorted((r for r in res["rankk"] if r["mode"] == mode and r["groups"] == grp),
                         key=lambda r: r["total_bytes"])
            xs[f"rank-k {grp} {mode}"] = [bpp(r["total_bytes"]) for r in sub]
            ys[f"rank-k {grp} {mode}"] = [r["bpb"] for r in sub]
    rq = [r for r in res["rankk"] if r["mode"] == "joint+rtn4g64"]
    xs["rank-k joint + RTN w4"], ys["rank-k joint + RTN w4"] = [bpp(r["total_bytes"]) for r in rq], [r["bpb"]
                                                                                                 for r in rq]
    return xs, ys


# ==================================================================================================================
# follow-up parts (``--part jra|lowbit|orders``): the three gates the main run misses, measured with paired standard
# errors (per-chunk bits on the same held-out text; see ``quant.paired_bpb_diff``).


def _bpb(chunks: dict, evalset) -> float:
    """bits/byte (mean over sources) from :meth:`EvalSet.chunk_bits` output."""
    return float(sum(chunks[n].sum() / nb for n, (_, nb) in evalset.streams.items()) / len(evalset.streams))


def _group_rel_err(orig: dict, m) -> float:
    """``sum ||W - A B||_F^2 / sum ||W||_F^2`` over the replaced linears of ``m`` (original weights ``orig``)."""
    from lmlab.compress.rankk import LowRankLinear

    num = den = 0.0
    for name, mod in m.named_modules():
        if isinstance(mod, LowRankLinear):
            W = orig[name]
            num += float(((W - mod.A.float() @ mod.proj.weight.float()) ** 2).sum())
            den += float((W ** 2).sum())
    return num / den


def part_jra(args, model, evalset, res: dict) -> None:
    """Joint vs separate rank-k at an equal parameter count, per group and keep ratio, with paired SEs."""
    from lmlab.compress import quant, rankk

    orig = {n: lin.weight.detach().float().clone() for n, lin in model.named_modules()
            if isinstance(lin, torch.nn.Linear)}
    rows = []
    for grp in args.jra_groups:
        for keep in (0.8, 0.6, 0.4, 0.25):
            ch, info = {}, {}
            for mode in ("joint", "separate"):
                m = copy.deepcopy(model)
                acct = rankk.compress_model(m, [grp], keep, mode)
                ch[mode] = evalset.chunk_bits(m)
                info[mode] = {"params_after": acct["params_after"], "ranks": sorted(set(acct["ranks"])),
                              "rel_frob_err": _group_rel_err(orig, m), "bpb": _bpb(ch[mode], evalset)}
            d = quant.paired_bpb_diff(ch["joint"], ch["separate"], evalset)
            rows.append({"group": grp, "keep": keep, **{f"{mo}_{k}": v for mo in info for k, v in info[mo].items()},
                         "joint_minus_separate": d["diff"], "se": d["se"]})
            r = rows[-1]
            print(f"| {grp} | {keep} | {r['joint_params_after']:,} / {r['separate_params_after']:,} | "
                  f"{r['joint_ranks']} / {r['separate_ranks']} | {r['joint_rel_frob_err']:.4f} / "
                  f"{r['separate_rel_frob_err']:.4f} | {r['joint_bpb']:.4f} | {r['separate_bpb']:.4f} | "
                  f"{d['diff']:+.4f} +/- {d['se']:.4f} |", flush=True)
    res["jra"] = rows
    res["gates"]["joint_<=_separate+0.005 (qkv, gate_up; keep 0.8/0.6/0.4)"] = all(
        r["joint_minus_separate"] <= 0.005 for r in rows if r["group"] in ("qkv", "gate_up") and r["keep"] >= 0.4)


def part_lowbit(args, model, tok, evalset, res: dict) -> None:
    """BitStack vs RTN/GPTQ at <= 2.1 (and ~2.3) bits/param: accounting variants, BitStack variants, paired SEs.

    Only the first blocks matter below ~2.5 bits/param, and the sort scores of level b depend only on blocks
    <= b+1, so the stacks here use niter 4: their first 3 levels (and their order) equal those of a niter-16 stack
    built with the same calibration and sorting text."""
    from lmlab.compress import bitstack as bs
    from lmlab.compress import quant

    lins = quant.find_linears(model, quant.DEFAULT_MODULES)
    n_params = sum(lin.weight.numel() for lin in lins.values())
    extra = quant.extra_bytes(model, lins)

    def bpp(total: float) -> float:
        return (total - extra) * 8 / n_params

    def fp16_zero_bytes(bits: int, g: int) -> int:  # b-bit codes + fp16 scale + fp16 zero per group
        total = 0.0
        for lin in lins.values():
            ge = quant.effective_group(g, lin.in_features) or lin.in_features
            total += lin.weight.numel() * (bits + 32 / ge)
        return extra + int(math.ceil(total / 8))

    base_chunks = {}
    quants = []
    calib = quant.token_windows(tok, quant.texts_for("code,prose,math", "train"), 32, 256, seed=0)
    for method, bits, g in (("rtn", 1, 64), ("rtn", 1, 32), ("rtn", 2, 0), ("gptq", 2, 0), ("rtn", 2, 64),
                            ("gptq", 2, 64)):
        q, acct = quant.quantize_copy(model, quant.DEFAULT_MODULES, method, bits, g,
                                      calib if method == "gptq" else None)
        name = f"{method} w{bits} {'per-row' if g == 0 else f'g{g}'}"
        base_chunks[name] = evalset.chunk_bits(q)
        quants.append({"name": name, "bytes": acct["total_bytes"], "bits_per_param": acct["bits_per_param"],
                       "bytes_fp16_zero": fp16_zero_bytes(bits, g),
                       "bits_per_param_fp16_zero": bpp(fp16_zero_bytes(bits, g)),
                       "bpb": _bpb(base_chunks[name], evalset)})
        print(f"{name}: {acct['bits_per_param']:.3f} bits/param ({quants[-1]['bits_per_param_fp16_zero']:.3f} with "
              f"fp16 zeros), {quants[-1]['bpb']:.4f}", flush=True)
    variants = [(f"default: scaled, {args.calib_samples} calib, {args.sort_samples} sort, k=1", {}, "average"),
                ("greedy order", {}, "greedy"),
                ("no scaling", {"scale": False}, "average"),
                ("4 sort", {"sort_samples": 4}, "average"),
                ("16 sort", {"sort_samples": 16}, "average"),
                ("128 calib, 16 sort", {"calib_samples": 128, "sort_samples": 16}, "average"),
                ("no scaling, 4 sort", {"scale": False, "sort_samples": 4}, "average"),
                ("k=2", {"k": 2}, "average")]
    stacks: dict = {}
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bitstack-lowbit-"))
    try:
        for vname, kw, order in variants:
            key = json.dumps(kw, sort_keys=True)
            if key not in stacks:
                t0 = time.perf_counter()
                cfg = bs.BitStackConfig(model=args.model, out=str(tmp / f"s{len(stacks)}"), niter=4,
                                        threads=args.threads, **{"calib_samples": args.calib_samples,
                                                                 "sort_samples": args.sort_samples, **kw})
                stacks[key] = bs.main(cfg)
                print(f"built {vname} stack in {time.perf_counter() - t0:.0f} s", flush=True)
            stack = stacks[key]
            if order == "average" and not kw:
                res["lowbit_order_prefix"] = bs.read_order(stack)["orders"]["average"]
            sizes = bs.read_order(stack)["sizes"][order]
            seen: dict = {}
            for qrow in quants:
                for acc in ("bytes", "bytes_fp16_zero"):
                    budget = qrow[acc]
                    steps = bs.pick_steps(sizes, budget)
                    if steps < 0 or steps >= len(sizes) - 1:
                        continue
                    if steps not in seen:
                        seen[steps] = evalset.chunk_bits(bs.load(stack, sizes[steps], order=order))
                    ch = seen[steps]
                    d = quant.paired_bpb_diff(ch, base_chunks[qrow["name"]], evalset)
                    rows.append({"variant": vname, "vs": qrow["name"], "accounting": acc, "budget": budget,
                                 "bitstack_bytes": sizes[steps], "bits_per_param": bpp(budget),
                                 "bitstack_bpb": _bpb(ch, evalset), "other_bpb": qrow["bpb"],
                                 "bitstack_minus_other": d["diff"], "se": d["se"]})
                    r = rows[-1]
                    print(f"| {vname} | {qrow['name']} ({'b-bit' if acc == 'bytes' else 'fp16'} zero) | "
                          f"{r['bits_per_param']:.3f} | {r['bitstack_bpb']:.4f} | {r['other_bpb']:.4f} | "
                          f"{d['diff']:+.4f} +/- {d['se']:.4f} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["lowbit_quant"] = quants
    res["lowbit"] = rows
    low = [r for r in rows if r["variant"].startswith("default") and r["accounting"] == "bytes"
           and r["bits_per_param"] <= 2.1]
    res["gates"]["bitstack_beats_rtn_gptq_by_0.5_at_<=2.1_bits (issue accounting)"] = all(
        r["bitstack_minus_other"] <= -0.5 for r in low)


def part_orders(args, model, evalset, res: dict) -> None:
    """Sorted vs random (several seeds) vs uniform at budgets across the range, with paired SEs."""
    from lmlab.compress import bitstack as bs
    from lmlab.compress import quant

    lins = quant.find_linears(model, quant.DEFAULT_MODULES)
    n_params = sum(lin.weight.numel() for lin in lins.values())
    extra = quant.extra_bytes(model, lins)
    tmp = Path(args.stack) if args.stack else Path(tempfile.mkdtemp(prefix="bitstack-orders-")) / "stack"
    try:
        if not (tmp / "order.json").is_file():
            t0 = time.perf_counter()
            bs.main(bs.BitStackConfig(model=args.model, out=str(tmp), niter=args.niter,
                                      calib_samples=args.calib_samples, sort_samples=args.sort_samples,
                                      threads=args.threads))
            print(f"built the stack in {time.perf_counter() - t0:.0f} s", flush=True)
        meta = bs.read_meta(tmp)
        n = len(meta["stacks"])
        bb = [s["block_bytes"] for s in meta["stacks"]]
        orders = {"sorted": bs.read_order(tmp)["orders"]["average"]}
        for seed in range(args.random_seeds):
            orders[f"random{seed}"] = bs.order_random(n, args.niter - 1, seed)
        sizes = {k: bs.size_table(meta["base_bytes"], bb, v) for k, v in orders.items()}
        level_bytes = [meta["base_bytes"] + b * sum(bb) for b in range(args.niter)]

        def bits(total: float) -> float:
            return (total - extra) * 8 / n_params

        budgets = [(level_bytes[i] + level_bytes[i + 1]) // 2 for i in range(args.niter - 1)]
        rows = []
        for budget in budgets:
            ch = {}
            for name, seq in orders.items():
                steps = bs.pick_steps(sizes[name], budget)
                ch[name] = evalset.chunk_bits(bs.build(tmp, bs.counts_at(seq, n, steps)))
            ub = max(i for i, lb in enumerate(level_bytes) if lb <= budget) + 1
            ch["uniform"] = evalset.chunk_bits(bs.build(tmp, [ub] * n))
            vs = {name: quant.paired_bpb_diff(ch["sorted"], ch[name], evalset) for name in ch if name != "sorted"}
            rnd = [vs[k]["diff"] for k in vs if k.startswith("random")]
            row = {"budget": budget, "bits_per_param": bits(budget), "sorted": _bpb(ch["sorted"], evalset),
                   "uniform": _bpb(ch["uniform"], evalset), "uniform_blocks": ub,
                   "random": {k: _bpb(ch[k], evalset) for k in ch if k.startswith("random")},
                   "sorted_minus": vs, "sorted_minus_random_mean": float(np.mean(rnd)),
                   "sorted_minus_random_sd_over_seeds": float(np.std(rnd, ddof=1)) if len(rnd) > 1 else 0.0,
                   "random_wins": sum(d > 0 for d in rnd)}
            rows.append(row)
            print(f"| {row['bits_per_param']:.2f} | {row['sorted']:.5f} | {np.mean(list(row['random'].values())):.5f}"
                  f" | {row['sorted_minus_random_mean']:+.5f} (seed sd {row['sorted_minus_random_sd_over_seeds']:.5f}"
                  f"; {row['random_wins']}/{len(rnd)} seeds better) | {vs['uniform']['diff']:+.5f} +/- "
                  f"{vs['uniform']['se']:.5f} ({ub}) | max paired se vs random "
                  f"{max(vs[k]['se'] for k in vs if k.startswith('random')):.5f} |", flush=True)
        res["orders"] = rows
    finally:
        if not args.stack:
            shutil.rmtree(tmp.parent, ignore_errors=True)


def followup(args) -> None:
    from lmlab.compress import quant
    from lmlab.core.models import load

    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    evalset = quant.EvalSet.build(tok, "code,prose,math", args.max_tokens)
    out = Path(args.out)
    if out.name == "compress.json":
        out = out.with_name(f"compress_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": args.model, "settings": vars(args), "gates": {},
                 "eval_tokens_per_source": {k: int(v[0].size) for k, v in evalset.streams.items()}}
    t0 = time.perf_counter()
    if args.part == "jra":
        print("| group | keep | params joint / separate | ranks | rel. Frobenius error | joint | separate | "
              "joint - separate (paired se) |\n|---|---|---|---|---|---|---|---|")
        part_jra(args, model, evalset, res)
    elif args.part == "lowbit":
        print("| BitStack variant | vs | bits/param | BitStack | other | BitStack - other (paired se) |\n"
              "|---|---|---|---|---|---|")
        part_lowbit(args, model, tok, evalset, res)
    else:
        print("| bits/param | sorted | random (mean) | sorted - random | sorted - uniform (blocks) | |\n"
              "|---|---|---|---|---|---|")
        part_orders(args, model, evalset, res)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(res, indent=1) + "\n")
    for k, v in res["gates"].items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    print(f"wrote {out} ({res['seconds']} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref:dense")
    ap.add_argument("--niter", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--sort-samples", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/compress.json")
    ap.add_argument("--stack", default=None, help="keep the BitStack folder here (default: a temp dir)")
    ap.add_argument("--part", default="all", choices=["all", "jra", "lowbit", "orders"],
                    help="all: the full table; jra / lowbit / orders: one follow-up with paired standard errors "
                         "(writes compress_<part>.json)")
    ap.add_argument("--jra-groups", nargs="+", default=["qk", "qkv", "gate_up"])
    ap.add_argument("--random-seeds", type=int, default=5, help="random orders compared in --part orders")
    args = ap.parse_args()
    if args.part != "all":
        logging.basicConfig(level=logging.WARNING)
        followup(args)
        return
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from lmlab.compress import bitstack as bs
    from lmlab.compress import quant, rankk
    from lmlab.core import zoo
    from lmlab.core.models import load

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load(args.model)
    card = zoo.card(args.model[4:]) if args.model.startswith("ref:") else {}
    evalset = quant.EvalSet.build(tok, "code,prose,math", args.max_tokens)
    fp = evalset.evaluate(model)
    lins = quant.find_linears(model, quant.DEFAULT_MODULES)
    n_params = sum(lin.weight.numel() for lin in lins.values())
    extra = quant.extra_bytes(model, lins)
    res: dict = {"model": args.model, "train_tokens": card.get("train_tokens"), "params_compressed": n_params,
                 "extra_bytes_fp16": extra, "fp32": fp, "fp16_bytes": extra + 2 * n_params,
                 "settings": vars(args)}

    def bpp(total_bytes: float) -> float:
        return (total_bytes - extra) * 8 / n_params

    # ---------------------------------------------------------------- BitStack: build (timed)
    tmp = Path(args.stack) if args.stack else Path(tempfile.mkdtemp(prefix="bitstack-bench-")) / "stack"
    if tmp.exists():
        shutil.rmtree(tmp)
    t0, c0 = time.perf_counter(), time.process_time()
    stack = bs.main(bs.BitStackConfig(model=args.model, out=str(tmp), niter=args.niter,
                                      calib_samples=args.calib_samples, sort_samples=args.sort_samples,
                                      threads=args.threads))
    sizes = bs.read_order(stack)["sizes"]["average"]
    m_bs = bs.load(stack, sizes[len(sizes) // 2])
    build_wall, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    meta = bs.read_meta(stack)
    res["bitstack_build"] = {"wall_s": round(build_wall, 1), "cpu_s": round(build_cpu, 1),
                             "decompose_s": json.loads((stack / "results.json").read_text())["decompose_seconds"],
                             "sort_s": json.loads((stack / "results.json").read_text())["sort_seconds"],
                             "steps": len(sizes), "min_bytes": sizes[0], "max_bytes": sizes[-1],
                             "k": sorted({s["k"] for s in meta["stacks"]})}
    print(f"BitStack decompose+sort+load: {build_wall:.1f} s wall, {build_cpu:.1f} s CPU; {len(sizes)} sizes "
          f"{sizes[0]:,}..{sizes[-1]:,} B", flush=True)

    orders = bs.read_order(stack)
    models = {o: bs.load(stack, sizes[0], order=o) for o in ("average", "random")}
    del m_bs
    cache: dict = {}

    def eval_order(order: str, budget: int) -> tuple[int, float]:
        sz = orders["sizes"][order]
        steps = bs.pick_steps(sz, budget)
        key = (order, steps)
        if key not in cache:
            m = models[order]
            m.bitstack.resize(sz[steps])
            cache[key] = evalset.evaluate(m)["bpb"]
        return sz[steps], cache[key]

    level_bytes = [meta["base_bytes"] + b * sum(s["block_bytes"] for s in meta["stacks"]) for b in range(args.niter)]
    uni_cache: dict = {}

    def eval_uniform(budget: int) -> tuple[int, float, int]:
        b = max(i for i, lb in enumerate(level_bytes) if lb <= budget) + 1
        if b not in uni_cache:
            uni_cache[b] = evalset.evaluate(bs.build(stack, [b] * len(meta["stacks"])))["bpb"]
        return level_bytes[b - 1], uni_cache[b], b

    # ---------------------------------------------------------------- RTN / GPTQ
    rtn = []
    for g in (0, 64, 32):
        for b in range(1, 9):
            q, acct = quant.quantize_copy(model, quant.DEFAULT_MODULES, "rtn", b, g)
            rtn.append({"method": "rtn", "bits": b, "group": g, **acct, "bpb": evalset.evaluate(q)["bpb"]})
    print("RTN done", flush=True)
    calib = quant.token_windows(tok, quant.texts_for("code,prose,math", "train"), 32, 256, seed=0)
    gptq = []
    for g in (0, 64):
        for b in (2, 3, 4):
            q, acct = quant.quantize_copy(model, quant.DEFAULT_MODULES, "gptq", b, g, calib)
            gptq.append({"method": "gptq", "bits": b, "group": g, **acct, "bpb": evalset.evaluate(q)["bpb"]})
    print("GPTQ done", flush=True)
    res["rtn"], res["gptq"] = rtn, gptq

    # ---------------------------------------------------------------- BitStack curves
    lo, hi = sizes[0], sizes[-1]
    grid = [lo + round(i * (hi - lo) / 20) for i in range(21)]  # steps of 5% of the size range
    sorted_grid = [eval_order("average", b) for b in grid]
    matched = sorted({r["total_bytes"] for r in rtn + gptq if lo <= r["total_bytes"] <= hi})
    mids = [(level_bytes[i] + level_bytes[i + 1]) // 2 for i in range(args.niter - 1)]
    compare = []
    for budget in sorted(set(matched) | set(mids)):
        sb, sv = eval_order("average", budget)
        rb, rv = eval_order("random", budget)
        ub, uv, ublocks = eval_uniform(budget)
        compare.append({"budget": budget, "bits_per_param": bpp(budget), "sorted_bytes": sb, "sorted": sv,
                        "random_bytes": rb, "random": rv, "uniform_bytes": ub, "uniform": uv,
                        "uniform_blocks": ublocks})
    res["bitstack_grid"] = [{"budget": g, "bytes": b, "bits_per_param": bpp(b), "bpb": v}
                            for g, (b, v) in zip(grid, sorted_grid)]
    res["bitstack_compare"] = compare
    print("BitStack curves done", flush=True)

    # ---------------------------------------------------------------- rank-k
    jra = []
    for groups in (["qkv"], ["gate_up"]):
        for keep in (0.8, 0.6, 0.4, 0.25):
            for mode in ("joint", "separate"):
                m = copy.deepcopy(model)
                acct = rankk.compress_model(m, groups, keep, mode)
                total = extra + 2 * n_params - acct["bytes_before"] + acct["bytes_after"]
                jra.append({"groups": "+".join(groups), "keep": keep, "mode": mode, "params_after":
                            acct["params_after"], "total_bytes": total, "bpb": evalset.evaluate(m)["bpb"]})
    for keep in (0.8, 0.6, 0.4):
        for rb in (0, 4):
            m = copy.deepcopy(model)
            acct = rankk.compress_model(m, ["qkv", "gate_up"], keep, "joint", rtn_bits=rb, rtn_group=64)
            total = extra + 2 * n_params - acct["bytes_before"] + acct["bytes_after"]
            jra.append({"groups": "qkv+gate_up", "keep": keep, "mode": "joint" + (f"+rtn{rb}g64" if rb else ""),
                        "params_after": acct["params_after"], "total_bytes": total,
                        "bpb": evalset.evaluate(m)["bpb"]})
    res["rankk"] = jra
    print("rank-k done", flush=True)

    # ---------------------------------------------------------------- gates
    gates = {}
    tie = 1e-9
    gates["sorted_beats_random_every_budget"] = all(c["sorted"] < c["random"] + tie for c in compare)
    gates["sorted_beats_uniform_every_budget"] = all(c["sorted"] < c["uniform"] + tie for c in compare)
    gates["sorted_<=_random+1e-3_every_budget"] = all(c["sorted"] <= c["random"] + 1e-3 for c in compare)
    gates["sorted_<=_uniform+1e-3_every_budget"] = all(c["sorted"] <= c["uniform"] + 1e-3 for c in compare)
    # the issue's "matched budgets" (spec gate 5): the RTN/GPTQ byte counts; at a level boundary the only
    # configuration that fits is the uniform one, so sorted == uniform there (<=, not <)
    matched_set = set(matched)
    at_rtn = [c for c in compare if c["budget"] in matched_set]
    gates["sorted_beats_random_and_<=_uniform_at_rtn_matched_budgets"] = bool(at_rtn) and all(
        c["sorted"] < c["random"] and c["sorted"] <= c["uniform"] + tie for c in at_rtn)
    res["worst_sorted_minus_random"] = max(c["sorted"] - c["random"] for c in compare)
    res["worst_sorted_minus_uniform"] = max(c["sorted"] - c["uniform"] for c in compare)
    below4 = [c for c in compare if c["bits_per_param"] <= 4.0]
    gates["sorted_beats_random_and_uniform_<=4_bits"] = all(
        c["sorted"] < c["random"] and c["sorted"] <= c["uniform"] + tie for c in below4)
    gates["sorted_strictly_better_than_uniform_between_levels"] = all(
        c["sorted"] < c["uniform"] for c in compare if c["budget"] in mids)
    low = [r for r in rtn + gptq if r["bits_per_param"] <= 2.1 and lo <= r["total_bytes"] <= hi]
    margins = []
    for r in low:
        _, v = eval_order("average", r["total_bytes"])
        margins.append({"rtn": f"{r['method']} w{r['bits']} g{r['group']}", "bits_per_param": r["bits_per_param"],
                        "rtn_bpb": r["bpb"], "bitstack_bpb": v, "margin": r["bpb"] - v})
    res["low_bit_margins"] = margins
    gates["bitstack_beats_rtn_by_0.5_at_<=2.1_bits"] = bool(margins) and all(m["margin"] >= 0.5 for m in margins)
    vals = [v for _, v in sorted_grid]
    gates["curve_non_increasing_over_5pct_steps"] = all(b <= a + 1e-3 for a, b in zip(vals, vals[1:]))
    jj = {(r["groups"], r["keep"], r["mode"]): r["bpb"] for r in jra}
    gates["joint_<=_separate+0.005"] = all(jj[(g, k, "joint")] <= jj[(g, k, "separate")] + 0.005
                                           for g in ("qkv", "gate_up") for k in (0.8, 0.6, 0.4))
    gates["decompose_sort_load_<_180s"] = build_wall < 180
    res["gates"] = gates

    # ---------------------------------------------------------------- table + plot
    series_x, series_y = series(res)
    png = out.with_suffix(".png")
    plot(png, series_x, series_y, fp["bpb"], args.model)
    res["plot"] = str(png)
    out.write_text(json.dumps(res, indent=1) + "\n")

    print(f"\n{args.model} ({card.get('train_tokens', '?')} train tokens): fp32 {fp['bpb']:.4f} bits/byte; "
          f"{n_params:,} params in compressed linears; rest {extra:,} B at fp16")
    print("\n| budget B | bits/param | BitStack sorted | random | uniform (blocks) |")
    print("|---|---|---|---|---|")
    for c in compare:
        print(f"| {c['budget']:,} | {c['bits_per_param']:.2f} | {c['sorted']:.4f} | {c['random']:.4f} | "
              f"{c['uniform']:.4f} ({c['uniform_blocks']}) |")
    print("\n| method | bits/param | bytes | bits/byte | BitStack at same bytes |")
    print("|---|---|---|---|---|")
    for r in rtn + gptq:
        bsv = eval_order("average", r["total_bytes"])[1] if lo <= r["total_bytes"] <= hi else float("nan")
        g = "per-row" if r["group"] == 0 else f"g{r['group']}"
        print(f"| {r['method']} w{r['bits']} {g} | {r['bits_per_param']:.3f} | {r['total_bytes']:,} | "
              f"{r['bpb']:.4f} | {bsv:.4f} |")
    print("\n| rank-k groups | keep | mode | bytes | bits/byte |")
    print("|---|---|---|---|---|")
    for r in jra:
        print(f"| {r['groups']} | {r['keep']} | {r['mode']} | {r['total_bytes']:,} | {r['bpb']:.4f} |")
    print("\nBitStack sorted curve (5% steps):", ", ".join(f"{bpp(b):.2f}:{v:.4f}" for b, v in sorted_grid))
    print("low-bit margins:", json.dumps(margins))
    print(f"worst sorted-random {res['worst_sorted_minus_random']:+.4f}, "
          f"worst sorted-uniform {res['worst_sorted_minus_uniform']:+.4f} bits/byte")
    print("\ngates:")
    for k, v in gates.items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    print(f"\nwrote {out} and {png}")
    if not args.stack:
        shutil.rmtree(tmp.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
