"""Compression benchmark on ref:dense: one bytes-vs-quality table and curve for every method, plus the gates.

    python benchmarks/compress.py [--niter 16] [--sort-samples 4] [--max-tokens 4096]
                                  [--out benchmarks/results/compress.json]

Methods (all on the same held-out text: the reference corpus' validation split, code/prose/math, bits/byte
averaged over the three domains; bytes = all weight bytes, uncompressed tensors at fp16):

* BitStack (activation-aware, ``niter`` blocks of k=auto per linear) in its sorted ("average") order, a random
  order, and uniform allocation (every linear at the same number of blocks: the largest that fits the budget);
  the decompose + sort + first load is timed (wall and CPU seconds);
* RTN at w1..w8 with per-row, g64 and g32 groups; GPTQ w2..w4 (per-row and g64; 32 x 256-token calibration);
* data-free rank-k at keep 0.8/0.6/0.4/0.25, joint vs separate, for {q,k,v} and {gate,up} separately, and
  joint {q,k,v}+{gate,up} followed by RTN w4 g64 of the factors.

Gates (printed as PASS/FAIL): sorted beats random and uniform at every matched budget; at <= 2.1 bits/param
BitStack beats RTN by >= 0.5 bits/byte; the sorted curve does not rise over steps of >= 5% of the size range
(tolerance 1e-3); joint <= separate + 0.005 bits/byte at keep 0.8/0.6/0.4; decompose + sort + load < 180 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref:dense")
    ap.add_argument("--niter", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--sort-samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/compress.json")
    ap.add_argument("--stack", default=None, help="keep the BitStack folder here (default: a temp dir)")
    args = ap.parse_args()
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
