"""MoE benchmark: Rectify-Router variants on a small MoE LM, and MoE layer speed vs HF Mixtral's sparse block.

    python benchmarks/moe.py [--steps 300] [--seeds 0,1] [--parts lm,layer,ep] [--out benchmarks/results/moe.json]

``lm``: byte-level MoE LM (d=64, 2 MoE layers, 4 heads, 8 SwiGLU experts of 128, 4 simulated expert-parallel
ranks, B=16 x T=64) on the built-in corpus (code, prose, math; 1 MB per domain), AdamW lr 2e-3 cosine, aux 0.01.
Every variant sees the same batches for a seed. Grid: capacity factor 1.0 x top-1/top-2 x {vanilla, +IR, +FR,
+IR+FR, dropless} x all seeds; capacity factors 0.5 and 1.5 x top-1/top-2 x the four routers x the first seed
(``--grid full`` runs every seed everywhere). Reported: validation loss (64 windows of 64 bytes, same capacity
routing as training), drop/pad/fill/IR rates (validation), expert slots per token (buffer rows + IR rows per token:
the expert compute), all-to-all bytes per training step (dispatch + return, forward + backward, all ranks) and
training tokens/s.

``layer``: fwd+bwd tokens/s of ``lmlab.train.moe.MoELayer`` vs ``transformers``' ``MixtralSparseMoeBlock`` at equal
E, k, d, f (N tokens, 1 thread, interleaved repeats, median).

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


def lm_grid(steps: int, seeds: list[int], grid: str, limit: int = 0, partial: Path | None = None) -> list[dict]:
    from lmlab.train.moe import MoEOptimConfig, TrainMoEConfig, load_data, train_variant

    base = TrainMoEConfig(device="cpu", tokenizer="bytes", experts=8, ranks=4, hidden_size=64, layers=2, heads=4,
                          expert_size=128, max_bytes=1_000_000, save_model=False,
                          optim=MoEOptimConfig(steps=steps, batch_size=16, seq_len=64, lr=2e-3, warmup=30,
                                            eval_every=0, eval_batches=4, log_every=50))
    data = load_data(base)
    jobs = []
    for cf in (1.0, 0.5, 1.5):
        for seed in (seeds if cf == 1.0 or grid == "full" else seeds[:1]):
            for k in (1, 2):
                for name, (router, rect) in VARIANTS.items():
                    jobs.append(dict(capacity_factor=cf, seed=seed, top_k=k, router=router, rectify=rect,
                                     _name=name))
                if cf == 1.0:
                    jobs.append(dict(capacity_factor=cf, seed=seed, top_k=k, router="topk", dropless=True,
                                     _name="dropless"))
    jobs = jobs[:limit] if limit else jobs
    rows = []
    for i, job in enumerate(jobs):
        name = job.pop("_name")
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


def layer_speed(tokens: int, d: int, f: int, E: int, k: int, repeats: int) -> dict:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from lmlab.train.moe import MoELayer, MoESettings

    torch.manual_seed(0)
    hf_conf = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k)
    hf = MixtralSparseMoeBlock(hf_conf)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours = {name: MoELayer(d, f, MoESettings(experts=E, top_k=k, **kw)).train() for name, kw in
            {"lmlab cf1.0": {"capacity_factor": 1.0}, "lmlab cf1.0 +IR+FR": {"capacity_factor": 1.0,
             "rectify": ("intra-gpu", "fill-in")}, "lmlab dropless": {"dropless": True}}.items()}
    for m in ours.values():  # same weights as the HF block
        with torch.no_grad():
            m.router.weight.copy_(hf.gate.weight)
            m.w_in.copy_(hf.experts.gate_up_proj.transpose(1, 2))
            m.w_out.copy_(hf.experts.down_proj.transpose(1, 2))
    x = torch.randn(1, tokens, d)
    # exactness check: dropless top-k with renormalised weights = Mixtral (softmax -> top-k -> renormalise)
    with torch.no_grad():
        same = torch.allclose(ours["lmlab dropless"](x), hf(x), atol=1e-5) if k > 1 else None
    mods = {"hf mixtral": hf, **ours}

    def step(m) -> float:
        xx = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        m(xx).square().mean().backward()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in mods}
    for m in mods.values():
        step(m)  # warm-up
    for _ in range(repeats):
        for n, m in mods.items():
            times[n].append(step(m))
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"tokens": tokens, "d": d, "f": f, "experts": E, "top_k": k, "dropless_equals_mixtral": same,
            "tok_per_s": {n: round(tokens / t, 1) for n, t in med.items()},
            "speedup_vs_mixtral": {n: round(med["hf mixtral"] / t, 2) for n, t in med.items()}}


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
    ap.add_argument("--layer-tokens", type=int, default=4096)
    ap.add_argument("--limit", type=int, default=0, help="run only the first N LM jobs (smoke test)")
    ap.add_argument("--out", default="benchmarks/results/moe.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    parts = a.parts.split(",")
    out: dict = {"command": "python benchmarks/moe.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out"), "torch": torch.__version__}
    t0 = time.time()
    if "layer" in parts:
        out["layer"] = [layer_speed(a.layer_tokens, 128, 256, 8, k, 7) for k in (1, 2)]
        print(json.dumps(out["layer"], indent=1), flush=True)
    if "ep" in parts:
        out["ep"] = ep_vs_sim(20)
        print(json.dumps(out["ep"], indent=1), flush=True)
    if "lm" in parts:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        rows = lm_grid(a.steps, [int(s) for s in a.seeds.split(",")], a.grid, a.limit,
                       Path(a.out).with_suffix(".partial.json"))
        out["lm"] = {"steps": a.steps, "rows": rows, **summarize(rows)}
        for t in out["lm"]["table"]:
            print(f"top{t['top_k']} cf{t['cf']:<4g} {t['router']:<9} val {t['val_loss']:.4f} "
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
