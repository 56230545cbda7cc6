"""SAE generalization and feature splitting benchmark (issue 13; Llama Scope, arXiv 2410.20526).

    python benchmarks/sae_generalization.py                       # defaults below, ~5 CPU-minutes
    python benchmarks/sae_generalization.py --tokens 200k --contexts 64,256,1024   # quicker

On ref:dense ``blocks.2.hook_resid_post`` (middle layer), all with ``lmlab interp sae`` library calls:

1. train an 8x and a 32x Top-K SAE (k=16, AuxK on) at **context 64** (``sae train --seq-len 64``);
2. context-length generalization of the 8x SAE: ``sae eval --context 64,128,256,512,1024`` (EV, L0, delta CE per
   context and per token-position bin; ref:dense itself was trained at context 256, max 1024);
3. fine-tuned transfer: ``sae transfer`` fine-tunes ref:dense on the math domain (``--ft-steps`` 300 at lr 2e-3, the
   foundation's training loop), splices the base 8x SAE into it, and trains an 8x SAE with the same recipe on the
   fine-tuned model (evaluated on held-out math);
4. feature splitting: ``sae geometry 8x 32x`` (decoder nearest-neighbour cosines vs random directions,
   small->large matching, detected splits with examples).

Prints tables and writes ``benchmarks/results/sae_generalization.json`` plus the plots under
``benchmarks/results/sae_generalization/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def _cpu() -> float:
    return time.process_time()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref:dense")
    ap.add_argument("--hook", default="blocks.2.hook_resid_post")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--small", type=int, default=8, help="expansion of the small SAE")
    ap.add_argument("--large", type=int, default=32, help="expansion of the large SAE")
    ap.add_argument("--tokens", default="500k", help="training tokens per SAE")
    ap.add_argument("--train-context", type=int, default=64)
    ap.add_argument("--contexts", default="64,128,256,512,1024")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--ft-lr", type=float, default=2e-3)
    ap.add_argument("--ft-seq-len", type=int, default=128)
    ap.add_argument("--geo-tokens", type=int, default=32_768)
    ap.add_argument("--work", default="/tmp/lmlab-bench-sae-generalization", help="run dirs (recreated)")
    ap.add_argument("--result", default="sae_generalization")
    ap.add_argument("--keep", action="store_true", help="reuse complete run dirs in --work (resume a benchmark)")
    ap.add_argument("--redo", default="", help="with --keep: stages to rerun (comma list of train-8x, train-32x, "
                    "context, transfer, geometry)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from lmlab.interp.generalization import TransferConfig, context_table, main_transfer, transfer_table
    from lmlab.interp.geometry import GeometryConfig, splits_table
    from lmlab.interp.geometry import main as geometry_main
    from lmlab.interp.sae import SAEEvalConfig, SAETrainConfig, main_eval, main_train

    work = Path(args.work)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    for name in filter(None, args.redo.split(",")):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    def done(name: str) -> Path | None:
        return work / name if (work / name / "results.json").is_file() else None
    common = dict(seed=0, device="cpu", dtype="float32", threads=1)
    timing: dict[str, float] = {}
    runs = {}
    for seed, e in enumerate((args.small, args.large)):  # different seeds: same-seed SAEs share initial rows
        t = _cpu()
        tcfg = SAETrainConfig(model=args.model, hooks=[args.hook], k=args.k, expansion=e, tokens=args.tokens,
                              batch_size=1024, seq_len=args.train_context, lm_batch=32, buffer_tokens=100_000,
                              eval_tokens=args.eval_tokens, out=str(work / f"train-{e}x"), **{**common, "seed": seed})
        runs[e] = done(f"train-{e}x") or main_train(tcfg)
        timing[f"train_{e}x_cpu_s"] = _cpu() - t
    train_res = {e: json.loads((r / "results.json").read_text())["saes"][args.hook] for e, r in runs.items()}

    t = _cpu()
    contexts = [int(c) for c in args.contexts.split(",")]
    ecfg = SAEEvalConfig(sae=[str(runs[args.small])], context=contexts, tokens=args.eval_tokens, jumprelu=[],
                         splice="each", seq_len=args.train_context, out=str(work / "context"), **common)
    ev = done("context") or main_eval(ecfg)
    timing["context_cpu_s"] = _cpu() - t
    ctx = json.loads((ev / "results.json").read_text())["context"]

    t = _cpu()
    xcfg = TransferConfig(sae=[str(runs[args.small])], finetune_data="math", finetune_steps=args.ft_steps,
                          finetune_lr=args.ft_lr, finetune_seq_len=args.ft_seq_len, tokens=args.eval_tokens,
                          sae_tokens=args.tokens, seq_len=args.train_context, out=str(work / "transfer"), **common)
    tr = done("transfer") or main_transfer(xcfg)
    timing["transfer_cpu_s"] = _cpu() - t
    trans = json.loads((tr / "results.json").read_text())

    t = _cpu()
    gcfg = GeometryConfig(small=str(runs[args.small]), large=str(runs[args.large]), tokens=args.geo_tokens,
                          seq_len=args.train_context, out=str(work / "geometry"), **common)
    geo = done("geometry") or geometry_main(gcfg)
    timing["geometry_cpu_s"] = _cpu() - t
    g = json.loads((geo / "results.json").read_text())

    print(f"## SAEs ({args.model} {args.hook}, k={args.k}, {args.tokens} tokens, context {args.train_context})")
    for e, r in train_res.items():
        m = r["eval"]
        print(f"{e}x: EV {m['explained_variance']:.3f}, delta CE {m['delta_ce']:.4f}, dead {m['dead_frac']:.3f}, "
              f"train {timing[f'train_{e}x_cpu_s']:.0f} CPU-s")
    print("\n## Context-length generalization (8x SAE)\n")
    print(context_table(ctx))
    clean = {c: ctx["by_context"][str(c)]["clean_ce"] for c in contexts}
    print("clean CE by context:", {c: round(v, 4) for c, v in clean.items()})
    print("\n## Fine-tuned transfer (eval on held-out math)\n")
    ft = trans.get("finetune", {})
    print(f"fine-tune: {ft.get('steps')} steps, {ft.get('tokens')} tokens, math val loss "
          f"{ft.get('val_loss_before', float('nan')):.4f} -> {ft.get('val_loss_after', float('nan')):.4f}, "
          f"relative weight change {ft.get('relative_weight_change', float('nan')):.3f}")
    print(transfer_table(trans))
    sh = trans["density_shift"][args.hook]
    print(f"latents: dead on base {sh['dead_base']}, on fine-tuned {sh['dead_ft']} (newly dead {sh['newly_dead']}), "
          f"over-active {sh['overactive']}, log-density corr {sh['log_density_corr']:.3f}")
    print("\n## Feature geometry and splitting\n")
    print(splits_table(g, n=8))
    print("\ntiming (CPU-s):", {k: round(v, 1) for k, v in timing.items()})

    out = {"settings": vars(args), "timing_cpu_s": timing,
           "train": {str(e): r for e, r in train_res.items()},
           "context": ctx, "transfer": {k: v for k, v in trans.items() if k != "density_shift"},
           "density_shift": trans["density_shift"],
           "geometry": {k: v for k, v in g.items() if k != "matches"}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.result}.json").write_text(json.dumps(out, indent=1) + "\n")
    plots = OUT / args.result
    plots.mkdir(exist_ok=True)
    for run in (ev, tr, geo):
        for png in (run / "plots").glob("*.png"):
            shutil.copy(png, plots / png.name)
    shutil.copy(geo / "splits.html", plots / "splits.html")
    print(f"\nwrote {OUT / (args.result + '.json')} and {plots}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
