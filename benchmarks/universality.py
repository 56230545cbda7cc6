"""Transformer vs Mamba universality benchmark (Wang et al., arXiv 2410.06672), CPU.

    python benchmarks/universality.py [--part induction|mppc|all] [--sae-tokens 64k] [--steps-dense 400]
        [--steps-mamba 1500] [--out benchmarks/results/universality]

Part ``induction`` (minutes): a small Llama and a small Mamba-2 (d=64, 2 layers) are trained from scratch on
repeated random 16-token sequences (vocab 64); ``lmlab.interp.circuits.analyze`` then reports the induction gain
(loss first half - loss second half), per-head induction scores (Transformer), conv-lag and per-layer mixer
ablations (Mamba) and the Off-by-One probe by offset. Plots in the out folder.

Part ``mppc`` (tens of minutes on 2 shared cores): Top-K SAEs (k=16, 8x) on every resid_post layer of ref:dense
(SAE seeds 0 and 1) and ref:mamba (seed 0) with ``lmlab interp sae train``; then ``lmlab interp similarity``
dense->mamba with the random-weights baseline and the SAE-seed skyline (bootstrap 95% CIs of the mean MPPC).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.universality")


def induction(out: Path, steps_dense: int, steps_mamba: int, d_mamba: int, lr_mamba: float) -> dict:
    from lmlab.core.plotting import bar_plot, heatmap, line_plot
    from lmlab.interp.circuits import CircuitsConfig, analyze, train_induction_model

    res = {}
    for arch, steps, d, lr in (("dense", steps_dense, 64, 3e-3), ("mamba", steps_mamba, d_mamba, lr_mamba)):
        t = time.process_time()
        model = train_induction_model(arch, vocab=64, half=16, steps=steps, d=d, lr=lr)
        r = analyze(model, CircuitsConfig(half_len=16, n_seq=64, probe_vocab=32), 64, 0)
        r.update(train_steps=steps, d_model=d, lr=lr, train_cpu_s=time.process_time() - t)
        res[arch] = r
        log.info("%s: induction gain %.3f nats", arch, r["induction_gain"])
        obo = r["off_by_one"]
        line_plot(out / f"off_by_one_{arch}.png", {n: obo["offsets"] for n in obo["accuracy"]}, obo["accuracy"],
                  title=f"{arch}: decode x_t from {obo['component']} at t + offset", xlabel="offset",
                  ylabel="accuracy")
    heatmap(out / "induction_scores_dense.png", res["dense"]["induction_scores"], title="induction score per head",
            xlabel="head", ylabel="layer", vmin=0, vmax=1)
    lags = list(res["mamba"]["conv_lag_ablation"])
    bar_plot(out / "conv_lag_ablation_mamba.png", [f"lag {x}" for x in lags],
             {"ablated (all layers)": [res["mamba"]["conv_lag_ablation"][x]["induction_gain"] for x in lags],
              "clean": [res["mamba"]["induction_gain"]] * len(lags)},
             title="Mamba induction gain with one conv tap zeroed", ylabel="nats/token")
    return res


def mppc(out: Path, sae_tokens: str, sim_tokens: int) -> dict:
    from lmlab.interp.sae import SAETrainConfig, main_train
    from lmlab.interp.similarity import SimilarityConfig
    from lmlab.interp.similarity import main as sim_main

    runs = {}
    for name, model, seed in (("dense", "ref:dense", 0), ("dense_s1", "ref:dense", 1), ("mamba", "ref:mamba", 0)):
        d = out / f"sae-{name}"
        if not (d / "results.json").is_file():
            main_train(SAETrainConfig(model=model, hooks=["blocks.*.hook_resid_post"], k=16, expansion=8,
                                      tokens=sae_tokens, batch_size=1024, buffer_tokens=32_768, eval_tokens=4096,
                                      seq_len=128, seed=seed, out=str(d), threads=1))
        runs[name] = d
    t = time.process_time()
    run = sim_main(SimilarityConfig(sae_a=str(runs["dense"]), sae_b=str(runs["mamba"]),
                                    extra=[f"sae_seed={runs['dense_s1']}"], tokens=sim_tokens, seq_len=128,
                                    out=str(out / "similarity"), threads=1))
    res = json.loads((run / "results.json").read_text())
    res["similarity_cpu_s"] = time.process_time() - t
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["induction", "mppc", "all"])
    ap.add_argument("--steps-dense", type=int, default=400)
    ap.add_argument("--steps-mamba", type=int, default=1500)
    ap.add_argument("--d-mamba", type=int, default=64)
    ap.add_argument("--lr-mamba", type=float, default=3e-3)
    ap.add_argument("--sae-tokens", default="64k")
    ap.add_argument("--sim-tokens", type=int, default=16_384)
    ap.add_argument("--out", default=str(HERE / "results" / "universality"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if a.part in ("induction", "all"):
        results["induction"] = induction(out, a.steps_dense, a.steps_mamba, a.d_mamba, a.lr_mamba)
        (out / "induction.json").write_text(json.dumps(results["induction"], indent=1))
    if a.part in ("mppc", "all"):
        results["mppc"] = mppc(out, a.sae_tokens, a.sim_tokens)
        (out / "mppc.json").write_text(json.dumps(results["mppc"], indent=1))
    print(json.dumps(results, indent=1)[:4000])


if __name__ == "__main__":
    main()
