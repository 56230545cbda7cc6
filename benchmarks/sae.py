"""SAE benchmarks (issue 4): training speed against sparsify and SAELens, and quality on the reference models.

    python benchmarks/sae.py speed                  # d=512, 4096 latents, k=32, batch 2048, AuxK active
    python benchmarks/sae.py quality --tokens 1M    # ref:dense + ref:mamba, middle-layer resid_post

speed: the three trainers run one training step (forward + backward + Adam) on the *same* cached activations
(2048 x 512 fp32 rows drawn from a fixed sparse dictionary, 10% of latents marked dead so AuxK is active in all
three), one torch thread, interleaved rounds; tokens per CPU-second (``time.process_time``) and wall.
Anchors: EleutherAI sparsify (PyPI ``eai-sparsify``; ``SparseCoder`` with its fused encoder and embedding_bag
decoder) and SAELens (PyPI ``sae-lens``; ``TopKTrainingSAE.training_forward_pass``). Both are optional
(``pip install eai-sparsify sae-lens``); a missing one is reported as such.

quality: ``lmlab interp sae train`` on ``blocks.{L/2}.hook_resid_post`` of ref:dense and ref:mamba with AuxK on
and off (the second run reads the first one's on-disk activation shards), then ``lmlab interp sae eval`` on
held-out tokens (EV, L0, dead fraction, delta CE, KL, CE score) with both JumpReLU conversions.
Results go to ``benchmarks/results/sae_*.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def cached_activations(n: int = 2048, d: int = 512, seed: int = 0) -> torch.Tensor:
    """(n, d) activations from 4d sparse unit directions with heavy-tailed magnitudes plus a mean offset."""
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(4 * d, d, generator=g)
    dic /= dic.norm(dim=1, keepdim=True)
    codes = (torch.rand(n, 4 * d, generator=g) < 0.01).float() * torch.rand(n, 4 * d, generator=g).exp()
    return codes @ dic + 0.5 * torch.randn(d, generator=g)


def _lmlab_step(d: int, n_lat: int, k: int, dead: torch.Tensor):
    from lmlab.interp.sae import SAE, train_step

    sae = SAE(d, n_lat, k).init_llama_scope(0.5, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.9999))

    def step(x: torch.Tensor) -> float:
        out = train_step(sae, x, x, k, dead, d // 2, 1 / 32)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return float(out["fvu"])

    return step


def _sparsify_step(d: int, n_lat: int, k: int, dead: torch.Tensor):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n_lat, k=k), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> float:
        out = sae(x, dead_mask=dead)
        loss = out.fvu + (1 / 32) * out.auxk_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        return float(out.fvu)

    return step


def _saelens_step(d: int, n_lat: int, k: int, dead: torch.Tensor):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n_lat, k=k, dtype="float32", device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> float:
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return float(out.loss)

    return step


TRAINERS = {"lmlab": _lmlab_step, "sparsify": _sparsify_step, "saelens": _saelens_step}


def speed(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    x = cached_activations(args.batch, args.d)
    dead = torch.zeros(args.latents, dtype=torch.bool)
    dead[torch.randperm(args.latents, generator=torch.Generator().manual_seed(1))[: args.latents // 10]] = True
    steps, errors = {}, {}
    for name, make in TRAINERS.items():
        try:
            steps[name] = make(args.d, args.latents, args.k, dead)
            steps[name](x)  # warm-up
        except Exception as e:  # noqa: BLE001 - an anchor that is not installed is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: unavailable ({errors[name]})", file=sys.stderr)
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    wall: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.rounds):  # interleaved, so load from other tenants hits all trainers alike
        for name, step in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(args.steps):
                step(x)
            cpu[name].append(args.steps * args.batch / (time.process_time() - c0))
            wall[name].append(args.steps * args.batch / (time.perf_counter() - w0))
    res = {n: {"tokens_per_cpu_s": statistics.median(cpu[n]), "tokens_per_wall_s": statistics.median(wall[n])}
           for n in steps}
    for n in res:
        for a in ("sparsify", "saelens"):
            if a in res and n == "lmlab":
                res[n][f"x_{a}"] = res[n]["tokens_per_cpu_s"] / res[a]["tokens_per_cpu_s"]
    out = {"settings": vars(args), "results": res, "unavailable": errors, "versions": _versions()}
    print("| trainer | tokens / CPU-s | tokens / wall-s | lmlab speed-up |")
    print("|---|---|---|---|")
    for n, r in res.items():
        up = "" if n == "lmlab" else f"{res['lmlab']['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}x"
        print(f"| {n} | {r['tokens_per_cpu_s']:.0f} | {r['tokens_per_wall_s']:.0f} | {up} |")
    return out


def _versions() -> dict:
    from importlib import metadata

    v = {}
    for p in ("torch", "eai-sparsify", "sae-lens", "lmlab"):
        try:
            v[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            v[p] = None
    return v


def quality(args: argparse.Namespace) -> dict:
    from lmlab.core.hooks import n_layers
    from lmlab.core.models import load_model
    from lmlab.interp.sae import SAEEvalConfig, SAETrainConfig, main_eval, main_train

    out: dict = {"settings": vars(args), "runs": {}}
    base = Path(args.out)
    for model in args.models:
        if model.startswith("ref:"):
            from lmlab.core.zoo import card

            c = card(model[4:])
            out.setdefault("model_cards", {})[model] = {k: c.get(k) for k in ("params", "steps", "train_tokens")}
        layer = n_layers(load_model(model)) // 2
        hook = f"blocks.{layer}.hook_resid_post"
        for auxk in {"both": (True, False), "on": (True,), "off": (False,)}[args.auxk]:
            tag = f"{model.replace(':', '_')}-k{args.k}-{'auxk' if auxk else 'noauxk'}{args.tag}"
            cache = args.cache.get(model, str(base / f"cache-{model.replace(':', '_')}"))
            t0 = time.process_time()
            run = main_train(SAETrainConfig(model=model, hooks=[hook], k=args.k, expansion=args.expansion,
                                            tokens=args.tokens, batch_size=args.batch, lr=args.lr, auxk=auxk,
                                            eval_tokens=0, threads=1, out=str(base / f"train-{tag}"),
                                            seq_len=args.seq_len, buffer_tokens=args.buffer,
                                            init_b_dec=args.init_b_dec, init_decoder_norm=args.decoder_norm,
                                            k_anneal=args.k_anneal,
                                            cache=cache))
            train_cpu = time.process_time() - t0
            ev = main_eval(SAEEvalConfig(sae=[str(run)], tokens=args.eval_tokens, splice="each", threads=1,
                                         out=str(base / f"eval-{tag}"), seq_len=args.seq_len))
            res = json.loads((ev / "results.json").read_text())
            key = next(iter(res["topk"]["saes"]))
            row = {"hook": hook, "auxk": auxk, "train_cpu_s": train_cpu, "topk": res["topk"]["saes"][key],
                   "jumprelu": {m: r["saes"][key] for m, r in res["jumprelu"].items()}}
            out["runs"][tag] = row
            t = row["topk"]
            print(f"{tag}: EV {t['explained_variance']:.3f} L0 {t['l0']:.1f} dead {t['dead_frac']:.3f} "
                  f"dCE {t['delta_ce']:.4f} KL {t['kl']:.4f} CEscore {t['ce_score']:.3f} | " + " | ".join(
                      f"JumpReLU {m}: EV {r['explained_variance']:.3f} L0 {r['l0']:.1f} dCE {r['delta_ce']:.4f}"
                      for m, r in row["jumprelu"].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--d", type=int, default=512)
    sp.add_argument("--latents", type=int, default=4096)
    sp.add_argument("--k", type=int, default=32)
    sp.add_argument("--batch", type=int, default=2048)
    sp.add_argument("--steps", type=int, default=5)
    sp.add_argument("--rounds", type=int, default=5)
    q = sub.add_parser("quality")
    q.add_argument("--models", nargs="+", default=["ref:dense", "ref:mamba"])
    q.add_argument("--k", type=int, default=16)
    q.add_argument("--expansion", type=int, default=8)
    q.add_argument("--tokens", default="1M")
    q.add_argument("--batch", type=int, default=2048)
    q.add_argument("--lr", type=float, default=8e-4)
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--buffer", type=int, default=200_000)
    q.add_argument("--eval-tokens", type=int, default=131_072)
    q.add_argument("--auxk", choices=("both", "on", "off"), default="both", help="AuxK settings to train")
    q.add_argument("--init-b-dec", default="zero", help="zero (Llama Scope) | mean | geometric_median")
    q.add_argument("--decoder-norm", type=float, default=0.5, help="initial decoder row norm")
    q.add_argument("--k-anneal", type=float, default=0.1, help="fraction of steps for the K annealing")
    q.add_argument("--tag", default="", help="suffix for the run folders")
    q.add_argument("--cache", nargs="*", default=[], metavar="MODEL=DIR",
                   help="reuse an existing activation cache per model (default: OUT/cache-MODEL)")
    q.add_argument("--out", default="runs/bench-sae")
    q.add_argument("--result", default="sae_quality", help="name of the JSON under benchmarks/results/")
    args = ap.parse_args()
    if args.what == "quality":
        args.cache = dict(c.split("=", 1) for c in args.cache)
    res = speed(args) if args.what == "speed" else quality(args)
    OUT.mkdir(parents=True, exist_ok=True)
    name = getattr(args, "result", None) or f"sae_{args.what}"
    (OUT / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
