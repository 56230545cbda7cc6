"""MoE benchmark: Rectify-Router variants on a small MoE LM, and MoE layer speed vs HF Mixtral's sparse block.

    python benchmarks/moe.py [--steps 300] [--seeds 0,1] [--parts lm,layer,ep] [--out benchmarks/results/moe.json]
    python benchmarks/moe.py --layer-speed-only [--device cuda] [--out PATH]      # < 2 min on one GPU
    python benchmarks/moe.py --parts lm --steps 800 --seeds 0 --grid full --hidden 48 --expert-size 96 --out A.json
    python benchmarks/moe.py --summarize A.json,B.json --out merged.json          # merge per-seed files

``lm``: byte-level MoE LM (d=64, 2 MoE layers, 4 heads, 8 SwiGLU experts of 128, 4 simulated expert-parallel
ranks, B=16 x T=64) on the built-in corpus (code, prose, math; 1 MB per domain), AdamW lr 2e-3 cosine, aux 0.01.
Every variant sees the same batches for a seed. Grid: capacity factor 1.0 x top-1/top-2 x {vanilla, +IR, +FR,
+IR+FR, dropless} x all seeds; capacity factors 0.5 and 1.5 x top-1/top-2 x the four routers x the first seed
(``--grid full`` runs every seed everywhere). Reported: validation loss (64 windows of 64 bytes, same capacity
routing as training), drop/pad/fill/IR rates (validation), expert slots per token (buffer rows + IR rows per token:
the expert compute), all-to-all bytes per training step (dispatch + return, forward + backward, all ranks) and
training tokens/s.

``layer``: fwd+bwd tokens/s of ``lmlab.train.moe.MoELayer`` (cf 1.0, cf 1.0 +IR+FR, dropless) vs ``transformers``'
``MixtralSparseMoeBlock`` (its ``eager`` expert loop, the standalone default, and on CUDA also ``grouped_mm``) at
equal E, k, d, f and identical weights; interleaved repeats, median, ``torch.cuda.synchronize`` around each timed
step. Sizes: small (4096 tokens, d=128, f=256, E=8; the CPU default, 1 thread), medium (16384, 1024, 3584) and
mixtral (8192, 4096, 14336) added on CUDA (bf16 there by default). Also reports the max |dropless - Mixtral|.

``ep``: a real 2-rank gloo run of ``lmlab train moe --nproc 2`` vs the same config simulated in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

VARIANTS = {"vanilla": ("topk", []), "+IR": ("rectify", ["intra-gpu"]), "+FR": ("rectify", ["fill-in"]),
            "+IR+FR": ("rectify", ["intra-gpu", "fill-in"])}
NEXT_VARIANTS = {"+FR(next)": ("rectify", ["fill-in"])}
"""Fill-in restricted to each token's (k+1)-th choice (the authors' top-(k+1) configs), run at cf 1.0 only."""


def lm_grid(steps: int, seeds: list[int], grid: str, limit: int = 0, partial: Path | None = None,
            hidden: int = 64, expert_size: int = 128, resume: list[dict] | None = None,
            only: list[tuple[float, int]] | None = None) -> list[dict]:
    from lmlab.train.moe import MoEOptimConfig, TrainMoEConfig, load_data, train_variant

    base = TrainMoEConfig(device="cpu", tokenizer="bytes", experts=8, ranks=4, hidden_size=hidden, layers=2, heads=4,
                          expert_size=expert_size, max_bytes=1_000_000, save_model=False,
                          optim=MoEOptimConfig(steps=steps, batch_size=16, seq_len=64, lr=2e-3, warmup=30,
                                            eval_every=0, eval_batches=4, log_every=50))
    data = load_data(base)
    jobs = []
    # priority order (an interrupted grid keeps the most useful rows): cf 1.0 (top-1, top-2), then the capacity
    # sweep for top-1 (0.5, 1.5), then for top-2
    order = [(1.0, 1), (1.0, 2), (0.5, 1), (1.5, 1), (0.5, 2), (1.5, 2)]
    order = [o for o in order if not only or o in only]
    for cf, k in order:
        for seed in (seeds if cf == 1.0 or grid == "full" else seeds[:1]):
            for name, (router, rect) in VARIANTS.items():
                jobs.append(dict(capacity_factor=cf, seed=seed, top_k=k, router=router, rectify=rect, _name=name))
            if cf == 1.0:
                jobs.append(dict(capacity_factor=cf, seed=seed, top_k=k, router="topk", dropless=True,
                                 _name="dropless"))
                for name, (router, rect) in NEXT_VARIANTS.items():
                    jobs.append(dict(capacity_factor=cf, seed=seed, top_k=k, router=router, rectify=rect,
                                     fill_from="next", _name=name))
    jobs = jobs[:limit] if limit else jobs
    rows = list(resume or [])
    done = {(r["top_k"], r["cf"], r["router"], r["seed"]) for r in rows}
    for i, job in enumerate(jobs):
        name = job.pop("_name")
        if (job["top_k"], job["capacity_factor"], name, job["seed"]) in done:
            continue
        cfg = dataclasses.replace(base, **job)
        c0 = time.process_time()
        res = train_variant(cfg, None, progress=False, data=data)
        cpu = time.process_time() - c0
        rows.append({"top_k": cfg.top_k, "cf": cfg.capacity_factor, "router": name, "seed": cfg.seed,
                     "val_loss": round(res["val_loss"], 4), "drop": round(res["eval_drop_rate"], 4),
                     "pad": round(res["eval_pad_rate"], 4), "fill": round(res["eval_fill_rate"], 4),
                     "ir": round(res["eval_rectified_rate"], 4), "unrouted": round(res["eval_unrouted_rate"], 4),
                     "slots_per_token": round(res["eval_slots_per_token"], 3),
                     "a2a_MB_per_step": round(res["a2a_bytes_per_step"] / 1e6, 3),
                     "tok_per_s": round(res["tok_per_s"], 1), "cpu_s": round(cpu, 1)})
        print(f"[{i + 1}/{len(jobs)}] {json.dumps(rows[-1])}", flush=True)
        if partial is not None:  # an interrupted grid still leaves its rows
            partial.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def load_rows(paths: str) -> list[dict]:
    """LM rows from earlier (partial or final) result files."""
    rows: list[dict] = []
    for p in filter(None, paths.split(",")):
        d = json.loads(Path(p).read_text())
        rows += d if isinstance(d, list) else d.get("lm", {}).get("rows", [])
    return rows


def summarize(rows: list[dict]) -> dict:
    """Seed-mean per (k, cf, router), and the deltas vs vanilla the issue's targets are about."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["top_k"], r["cf"], r["router"]), []).append(r)
    table = []
    for (k, cf, router), rs in groups.items():
        m = {key: round(statistics.mean(r[key] for r in rs), 4) for key in
             ("val_loss", "drop", "pad", "fill", "ir", "slots_per_token", "a2a_MB_per_step", "tok_per_s")}
        table.append({"top_k": k, "cf": cf, "router": router, "seeds": len(rs),
                      "val_loss_per_seed": [r["val_loss"] for r in rs], **m})
    deltas = {}
    for t in table:
        base = next((b for b in table if b["top_k"] == t["top_k"] and b["cf"] == t["cf"]
                     and b["router"] == "vanilla"), None)
        if base and t["router"] != "vanilla":
            same = [a - b for a, b in zip(t["val_loss_per_seed"], base["val_loss_per_seed"])]
            deltas[f"top{t['top_k']} cf{t['cf']:g} {t['router']}"] = {
                "delta_mean": round(t["val_loss"] - base["val_loss"], 4), "delta_per_seed": [round(d, 4) for d in same]}
    return {"table": table, "delta_vs_vanilla": deltas}


LAYER_SIZES = {  # name -> (tokens, d, f, experts)
    "tiny": (256, 32, 64, 8),  # smoke test
    "lm": (1024, 64, 128, 8),  # one batch (16 x 64 tokens) of the LM grid's MoE layer (d=64, f=128)
    "small": (4096, 128, 256, 8),  # the CPU table
    "e32": (4096, 128, 64, 32),  # fine-grained experts: E x f constant, more and smaller experts
    "e64": (4096, 128, 32, 64),
    "medium": (16384, 1024, 3584, 8),
    "mixtral": (8192, 4096, 14336, 8),  # Mixtral-8x7B's block shapes
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_speed(tokens: int, d: int, f: int, E: int, k: int, repeats: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32, hf_impls: tuple[str, ...] = ("eager",)) -> dict:
    """fwd+bwd tokens/s of MoELayer variants vs transformers' MixtralSparseMoeBlock, same weights, interleaved."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from lmlab.train.moe import MoELayer, MoESettings

    dev = torch.device(device)
    torch.manual_seed(0)
    mods: dict[str, torch.nn.Module] = {}
    errors: dict[str, str] = {}
    hf0 = None
    for impl in hf_impls:  # eager = the loop over experts a standalone block uses; grouped_mm = HF's fused path
        conf = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k)
        conf._experts_implementation = impl
        with dev:  # build on the device: Mixtral-size weights are initialised there, not in host memory
            blk = MixtralSparseMoeBlock(conf).to(dtype)
        if hf0 is None:
            for p in blk.parameters():
                torch.nn.init.normal_(p, std=0.02)
            hf0 = blk
        else:
            blk.load_state_dict(hf0.state_dict())
        mods[f"hf mixtral {impl}"] = blk
    ours = {"lmlab cf1.0": {"capacity_factor": 1.0},
            "lmlab cf1.0 +IR+FR": {"capacity_factor": 1.0, "rectify": ("intra-gpu", "fill-in")},
            "lmlab dropless": {"dropless": True}}
    for name, kw in ours.items():
        with dev:
            m = MoELayer(d, f, MoESettings(experts=E, top_k=k, **kw)).to(dtype)
        with torch.no_grad():  # same weights as the HF block
            m.router.weight.copy_(hf0.gate.weight)
            m.w_in.copy_(hf0.experts.gate_up_proj.transpose(1, 2))
            m.w_out.copy_(hf0.experts.down_proj.transpose(1, 2))
        mods[name] = m
    for m in mods.values():
        m.to(device=dev, dtype=dtype).train()
    x = torch.randn(1, tokens, d, device=dev, dtype=dtype)
    # exactness: dropless top-k with renormalised weights = Mixtral (softmax -> top-k -> renormalise)
    with torch.no_grad():
        ref = mods[f"hf mixtral {hf_impls[0]}"](x).float()
        diff = float((mods["lmlab dropless"](x).float() - ref).abs().max()) if k > 1 else None

    def step(m: torch.nn.Module) -> float:
        xx = x.clone().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        _sync(dev)
        t0 = time.perf_counter()
        m(xx).float().square().mean().backward()
        _sync(dev)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {}
    for n, m in list(mods.items()):
        try:
            for _ in range(2):  # warm-up (kernel selection, allocator)
                step(m)
            times[n] = []
        except Exception as e:  # e.g. grouped_mm unsupported for this device/dtype
            errors[n] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del mods[n]
    for _ in range(repeats):
        for n, m in mods.items():
            times[n].append(step(m))
    med = {n: statistics.median(t) for n, t in times.items()}
    base = med[f"hf mixtral {hf_impls[0]}"]
    res = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "d": d, "f": f,
           "experts": E, "top_k": k, "repeats": repeats, "dropless_vs_mixtral_max_abs_diff": diff,
           "ms": {n: round(t * 1e3, 3) for n, t in med.items()},
           "tok_per_s": {n: round(tokens / t, 1) for n, t in med.items()},
           "speedup_vs_mixtral": {n: round(base / t, 3) for n, t in med.items()}}
    if errors:
        res["errors"] = errors
    mods.clear()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def print_layer_table(rows: list[dict]) -> None:
    names = []
    for r in rows:
        names += [n for n in r["tok_per_s"] if n not in names]
    print(f"{'size (N, d, f, E)':<26} k  " + "  ".join(f"{n:>24}" for n in names))
    for r in rows:
        cells = []
        for n in names:
            t = r["tok_per_s"].get(n)
            cells.append(f"{t:>14,.0f} ({r['speedup_vs_mixtral'][n]:.2f}x)" if t is not None else f"{'-':>24}")
        size = f"{r['tokens']}, {r['d']}, {r['f']}, {r['experts']}"
        print(f"{size:<26} {r['top_k']}  " + "  ".join(f"{c:>24}" for c in cells))


def ep_vs_sim(steps: int) -> dict:
    import tempfile

    from lmlab.train.moe import MoEOptimConfig, TrainMoEConfig, main

    out = Path(tempfile.mkdtemp(prefix="moe-ep-"))
    kw = dict(device="cpu", tokenizer="bytes", router="rectify", top_k=1, experts=8, ranks=2, hidden_size=64,
              layers=2, heads=4, expert_size=128, max_bytes=1_000_000, save_model=False,
              optim=MoEOptimConfig(steps=steps, batch_size=16, seq_len=64, lr=2e-3, warmup=5, eval_every=0,
                                eval_batches=4, log_every=10))
    res = {}
    for nproc in (1, 2):
        t0 = time.perf_counter()
        run = main(TrainMoEConfig(out=str(out / f"n{nproc}"), nproc=nproc, **kw))
        r = json.loads((run / "results.json").read_text())
        res[f"nproc{nproc}"] = {"wall_s": round(time.perf_counter() - t0, 1), "val_loss": r["val_loss"],
                                "train_tok_per_s": round(r["tok_per_s"], 1),
                                "a2a_MB_per_step": round(r["a2a_bytes_per_step"] / 1e6, 3)}
    res["max_abs_val_loss_diff"] = abs(res["nproc1"]["val_loss"] - res["nproc2"]["val_loss"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--grid", choices=["main", "full"], default="main")
    ap.add_argument("--parts", default="layer,ep,lm")
    ap.add_argument("--layer-speed-only", action="store_true",
                    help="only the layer-speed comparison (same as --parts layer); < 2 min on a GPU")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (layer speed runs there; the LM grid stays on cpu)")
    ap.add_argument("--dtype", default="auto", help="layer-speed dtype: auto (float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--layer-sizes", default="auto",
                    help=f"comma list of {list(LAYER_SIZES)} (auto: small on cpu, small,medium,mixtral on cuda)")
    ap.add_argument("--hf-impls", default="auto",
                    help="HF experts implementations to time: auto (eager on cpu, eager,grouped_mm on cuda)")
    ap.add_argument("--repeats", type=int, default=7, help="timed fwd+bwd repeats per module (median)")
    ap.add_argument("--limit", type=int, default=0, help="run only the first N LM jobs (smoke test)")
    ap.add_argument("--hidden", type=int, default=64, help="LM width d")
    ap.add_argument("--only", default="", help="run only these (cf:k) cells of the LM grid, e.g. 1.5:1,0.5:1")
    ap.add_argument("--resume", default="", help="comma list of (partial) result JSONs whose LM rows are kept")
    ap.add_argument("--expert-size", type=int, default=128, help="LM expert width f")
    ap.add_argument("--summarize", default="",
                    help="comma list of result JSONs: merge their LM rows (e.g. one file per seed), print, write")
    ap.add_argument("--out", default="benchmarks/results/moe.json")
    a = ap.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(1)
    parts = ["layer"] if a.layer_speed_only else [] if a.summarize else a.parts.split(",")
    cuda = a.device.startswith("cuda")
    dtype = getattr(torch, "bfloat16" if cuda else "float32") if a.dtype == "auto" else getattr(torch, a.dtype)
    sizes = (["small", "medium", "mixtral"] if cuda else ["small"]) if a.layer_sizes == "auto" else \
        a.layer_sizes.split(",")
    if set(sizes) - set(LAYER_SIZES):
        ap.error(f"unknown --layer-sizes {sorted(set(sizes) - set(LAYER_SIZES))}; choose from {list(LAYER_SIZES)}")
    impls = tuple((["eager", "grouped_mm"] if cuda else ["eager"]) if a.hf_impls == "auto" else
                  a.hf_impls.split(","))
    out: dict = {"command": "python benchmarks/moe.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out"), "torch": torch.__version__}
    t0 = time.time()
    if "layer" in parts:
        out["layer"] = []
        for size in sizes:
            n, d, f, E = LAYER_SIZES[size]
            for k in (1, 2):
                out["layer"].append({"size": size, **layer_speed(n, d, f, E, k, a.repeats, a.device, dtype, impls)})
                print(json.dumps(out["layer"][-1]), flush=True)
        print_layer_table(out["layer"])
    if "ep" in parts:
        out["ep"] = ep_vs_sim(20)
        print(json.dumps(out["ep"], indent=1), flush=True)
    if "lm" in parts or a.summarize:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        if a.summarize:
            rows = load_rows(a.summarize)
        else:
            rows = lm_grid(a.steps, [int(s) for s in a.seeds.split(",")], a.grid, a.limit,
                           Path(a.out).with_suffix(".partial.json"), a.hidden, a.expert_size, load_rows(a.resume),
                           [(float(c.split(":")[0]), int(c.split(":")[1])) for c in a.only.split(",") if c])
        out["lm"] = {"steps": a.steps, "hidden": a.hidden, "expert_size": a.expert_size, "rows": rows,
                     **summarize(rows)}
        for t in out["lm"]["table"]:
            print(f"top{t['top_k']} cf{t['cf']:<4g} {t['router']:<10} val {t['val_loss']:.4f} "
                  f"{t['val_loss_per_seed']} drop {t['drop']:.3f} pad {t['pad']:.3f} fill {t['fill']:.3f} "
                  f"IR {t['ir']:.3f} slots/tok {t['slots_per_token']:.2f} a2a {t['a2a_MB_per_step']:.2f} MB "
                  f"tok/s {t['tok_per_s']:.0f}")
        print(json.dumps(out["lm"]["delta_vs_vanilla"], indent=1))
    out["wall_s"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
