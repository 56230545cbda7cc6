"""Transformer vs Mamba universality benchmark (Wang et al., arXiv 2410.06672), CPU.

    python benchmarks/universality.py [--part induction|mppc|skyline|all] [--sae-tokens 64k] [--steps-dense 4000]
        [--steps-mamba 3000] [--mamba-loop aligned|pretrain] [--skyline-steps N] [--out DIR]

Part ``induction`` (minutes): a small Llama (foundation loop, half length L = 8..24) and a small Mamba-2 (d=64,
2 layers) are trained from scratch on repeated random sequences (vocab 64); ``lmlab.interp.circuits.analyze`` then
reports the induction gain (loss first half - loss second half) at L = 16, per-head induction scores (Transformer),
conv-lag ablations (all channels and by SSM channel x / B / C) and per-layer mixer ablations (Mamba), path patching
(clean [x, x] vs corrupted [x', x]) and the Off-by-One write-offset profile and probes. Plots in the out folder.

Part ``skyline``: ref:dense retrained with seed 1 (zoo recipe, ``--skyline-steps``), SAEs on it with the same
recipe, MPPC ref:dense -> dense seed 1 (the model-seed skyline).

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


def induction(out: Path, steps_dense: int, steps_mamba: int, d_mamba: int, lr_mamba: float,
              mamba_loop: str = "aligned") -> dict:
    from lmlab.core.plotting import bar_plot, heatmap
    from lmlab.interp.circuits import CircuitsConfig, analyze, plot_off_by_one, plot_paths, train_induction_model

    res = {}
    plans = (("dense", steps_dense, 64, 3e-3, "pretrain", None),  # foundation loop, L = 8..24
             ("mamba", steps_mamba, d_mamba, lr_mamba, mamba_loop, (16, 16) if mamba_loop == "aligned" else None))
    for arch, steps, d, lr, loop, hr in plans:
        t = time.process_time()
        model = train_induction_model(arch, vocab=64, half=16, steps=steps, d=d, lr=lr, loop=loop, half_range=hr)
        train_s = time.process_time() - t
        t = time.process_time()
        r = analyze(model, CircuitsConfig(half_len=16, n_seq=64, probe_vocab=32), 64, 0)
        r.update(train_steps=steps, d_model=d, lr=lr, loop=loop, half_range=hr, train_cpu_s=train_s,
                 analyze_cpu_s=time.process_time() - t)
        res[arch] = r
        log.info("%s: induction gain %.3f nats; top path %s", arch, r["induction_gain"], r["path_patching"]["top_path"])
        plot_off_by_one(out / f"off_by_one_{arch}.png", r["off_by_one"], arch)
        plot_paths(out / f"path_patching_{arch}.png", r["path_patching"], arch)
    heatmap(out / "induction_scores_dense.png", res["dense"]["induction_scores"], title="induction score per head",
            xlabel="head", ylabel="layer", vmin=0, vmax=1)
    hh = res["dense"]["path_patching"].get("heads_to_heads_k")
    if hh:
        heatmap(out / "heads_to_heads_k_dense.png", hh["effect"], title="path patching: layer 0 head -> layer 1 "
                "head (keys)", xlabel="receiver head", ylabel="sender head")
    lags = list(res["mamba"]["conv_lag_ablation"])
    bar_plot(out / "conv_lag_ablation_mamba.png", [f"lag {x}" for x in lags],
             {"ablated (all layers)": [res["mamba"]["conv_lag_ablation"][x]["induction_gain"] for x in lags],
              "clean": [res["mamba"]["induction_gain"]] * len(lags)},
             title="Mamba induction gain with one conv tap zeroed", ylabel="nats/token")
    return res


def mppc(out: Path, sae_tokens: str, sim_tokens: int, skyline_steps: int = 0) -> dict:
    from lmlab.interp.sae import SAETrainConfig, main_train
    from lmlab.interp.similarity import SimilarityConfig
    from lmlab.interp.similarity import main as sim_main

    runs = {}
    todo = [("dense", "ref:dense", 0), ("dense_s1", "ref:dense", 1), ("mamba", "ref:mamba", 0)]
    if skyline_steps:  # model-seed skyline: ref:dense retrained with seed 1 (SAE seed 0)
        todo.append(("dense_model_s1", str(train_dense_seed(out, 1, skyline_steps)), 0))
    for name, model, seed in todo:
        d = out / f"sae-{name}"
        if not (d / "results.json").is_file():
            main_train(SAETrainConfig(model=model, hooks=["blocks.*.hook_resid_post"], k=16, expansion=8,
                                      tokens=sae_tokens, batch_size=1024, buffer_tokens=32_768, eval_tokens=4096,
                                      seq_len=128, seed=seed, out=str(d), threads=1))
        runs[name] = d
    t = time.process_time()
    extra = [f"sae_seed={runs['dense_s1']}"]
    if "dense_model_s1" in runs:
        extra.append(f"model_seed={runs['dense_model_s1']}")
    run = sim_main(SimilarityConfig(sae_a=str(runs["dense"]), sae_b=str(runs["mamba"]), extra=extra,
                                    tokens=sim_tokens, seq_len=128, threads=1,
                                    out=str(out / ("similarity_skyline" if skyline_steps else "similarity"))))
    res = json.loads((run / "results.json").read_text())
    res["similarity_cpu_s"] = time.process_time() - t
    return res


def train_dense_seed(out: Path, seed: int, steps: int) -> Path:
    """A second ref:dense with another seed (the zoo recipe, ``lmlab zoo train dense``), not installed in the zoo."""
    import dataclasses

    from lmlab.core.zoo import REF_OPTIM, ZooTrainConfig, train_main

    model = out / f"zoo-dense-s{seed}" / "model"
    if not (model / "config.json").is_file():
        t = time.process_time()
        train_main(ZooTrainConfig(name="dense", seed=seed, install=False, threads=1,
                                  optim=dataclasses.replace(REF_OPTIM, steps=steps, save_every=0),
                                  out=str(model.parent)))
        log.info("dense seed %d: %d steps in %.0f CPU-s", seed, steps, time.process_time() - t)
    return model


def skyline(out: Path, steps: int, sae_tokens: str, sim_tokens: int) -> dict:
    """Model-seed skyline alone (cheaper than ``--part mppc --skyline-steps``): ref:dense retrained with seed 1, the
    same SAE recipe on both models (SAE seed 0, so A's features are those of the mppc part), MPPC dense -> dense
    seed 1 on the same validation tokens (no random baseline; compare with the mppc part's main and skylines)."""
    from lmlab.interp.sae import SAETrainConfig, main_train
    from lmlab.interp.similarity import SimilarityConfig
    from lmlab.interp.similarity import main as sim_main

    runs = {}
    for name, model in (("dense", "ref:dense"), ("dense_model_s1", None)):
        d = out / f"sae-{name}"
        if not (d / "results.json").is_file():
            model = model or str(train_dense_seed(out, 1, steps))
            main_train(SAETrainConfig(model=model, hooks=["blocks.*.hook_resid_post"], k=16, expansion=8,
                                      tokens=sae_tokens, batch_size=1024, buffer_tokens=32_768, eval_tokens=4096,
                                      seq_len=128, seed=0, out=str(d), threads=1))
        runs[name] = d
    t = time.process_time()
    run = sim_main(SimilarityConfig(sae_a=str(runs["dense"]), sae_b=str(runs["dense_model_s1"]), tokens=sim_tokens,
                                    seq_len=128, random_baseline=False, out=str(out / "similarity_model_seed"),
                                    threads=1))
    res = json.loads((run / "results.json").read_text())
    res["similarity_cpu_s"] = time.process_time() - t
    res["model_seed_train_steps"] = steps
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["induction", "mppc", "skyline", "all"])
    ap.add_argument("--steps-dense", type=int, default=4000)
    ap.add_argument("--steps-mamba", type=int, default=3000)
    ap.add_argument("--d-mamba", type=int, default=64)
    ap.add_argument("--lr-mamba", type=float, default=3e-3)
    ap.add_argument("--mamba-loop", default="aligned", choices=["aligned", "pretrain"],
                    help="aligned: whole [BOS, x, x] sequences, fixed L = 16 (forms induction in 3000 steps); "
                         "pretrain: the foundation loop, L = 8..24 (gain 0.95 nats at 3000 steps)")
    ap.add_argument("--sae-tokens", default="64k")
    ap.add_argument("--sim-tokens", type=int, default=16_384)
    ap.add_argument("--skyline-steps", type=int, default=0,
                    help="train ref:dense again with seed 1 for this many steps (zoo recipe: 2000) and add the "
                         "model-seed skyline to the MPPC part (0: skip)")
    ap.add_argument("--out", default=str(HERE / "results" / "universality"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if a.part in ("induction", "all"):
        results["induction"] = induction(out, a.steps_dense, a.steps_mamba, a.d_mamba, a.lr_mamba,
                                          a.mamba_loop)
        (out / "induction.json").write_text(json.dumps(results["induction"], indent=1))
    if a.part in ("mppc", "all"):
        results["mppc"] = mppc(out, a.sae_tokens, a.sim_tokens, a.skyline_steps)
        (out / "mppc.json").write_text(json.dumps(results["mppc"], indent=1))
    if a.part == "skyline":
        results["skyline"] = skyline(out, a.skyline_steps or 1000, a.sae_tokens, a.sim_tokens)
        (out / "skyline.json").write_text(json.dumps(results["skyline"], indent=1))
    print(json.dumps(results, indent=1)[:4000])


if __name__ == "__main__":
    main()
