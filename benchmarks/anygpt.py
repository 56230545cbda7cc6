"""AnyGPT miniature benchmark: any-to-any among text, image (8x8 digits) and speech (spoken digit words).

    python benchmarks/anygpt.py [--stage1-steps 1200] [--stage2-steps 1000] [--eval-n 100] [--no-ablation]
                                [--text-replay 0.3] [--stage2-replay 0.5] [--text-control] [--tokenizers DIR]
                                [--out benchmarks/results/anygpt]

Pipeline (one thread, CPU): train the digit VQ-VAE (K=64, 4 tokens/image) and k-means log-mel speech units
(K=64) plus the independent judges (logistic regression on real digits; on round-trip speech) -> stage 0:
text-only Llama (d=96, 3 layers, ~0.4M params, BPE 300) -> vocabulary expansion (+136 tokens) -> stage 1:
alignment pairs in the AnyGPT template, packed, 30% of tokens plain text -> evaluate -> stage 2: any-to-any chats with
stage-1 replay (and, unless --no-ablation, the same without replay: the forgetting trap) -> evaluate.
Accuracy per direction on held-out items (n per direction, chance 0.10): text outputs by the digit word,
image/speech outputs by the judges after de-tokenization. Writes results.json, a PNG grid of generated
digits and WAV samples under --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch


def text_control(M, acfg, run) -> dict:
    """The text-only model with stage 1's text exposure: the same stage 0 (same seed), then text-only training
    with stage 1's optimiser for as many text tokens as stage 1 saw (text_replay x stage-1 tokens); its
    perplexity is the bar that separates forgetting from simply training the text longer."""
    import numpy as np

    from lmlab.core.pretrain import train
    from lmlab.train.anygpt import data as D

    tok = M.make_text_tokenizer(acfg)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = M.build_lm(len(tok), acfg, special)
    text_train, _ = D.text_corpus(acfg.seed)
    rng = np.random.default_rng(acfg.seed)
    stage0_docs = [" ".join(rng.choice(text_train, 3)) for _ in range(6000)]
    train(model, M._stream(tok, stage0_docs), None, acfg.stage0, seed=acfg.seed, run=None, progress=False)
    ppl0 = M.text_ppl(model, tok, D.text_eval_docs(acfg.seed))
    s1 = acfg.stage1
    steps = max(1, round(acfg.text_replay * s1.steps))  # same text tokens as stage 1: share x steps x B x T
    rng = np.random.default_rng(acfg.seed + 7)
    docs = [" ".join(rng.choice(text_train, 3)) for _ in range(6000)]
    train(model, M._stream(tok, docs), None, dataclasses.replace(s1, steps=steps), seed=acfg.seed + 1, run=None,
          progress=False)
    return {"ppl_stage0": ppl0, "ppl_text_only_continued": M.text_ppl(model, tok, D.text_eval_docs(acfg.seed)),
            "continued_steps": steps, "continued_tokens": steps * s1.batch_size * s1.seq_len}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage0-steps", type=int, default=300)
    ap.add_argument("--stage1-steps", type=int, default=1200)
    ap.add_argument("--stage1-batch", type=int, default=16)
    ap.add_argument("--stage2-steps", type=int, default=1000)
    ap.add_argument("--vq-steps", type=int, default=2000)
    ap.add_argument("--stage2-replay", type=float, default=0.5, help="stage-2 replay fraction (stage-1 pairs + text)")
    ap.add_argument("--text-replay", type=float, default=None,
                    help="plain-text share of stage-1 tokens (default: AlignConfig.text_replay)")
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ablation", action="store_true", help="skip stage 2 without replay")
    ap.add_argument("--text-control", action="store_true",
                    help="also train the text-only control: stage 0, then text only for as many text tokens as stage 1")
    ap.add_argument("--out", default="benchmarks/results/anygpt")
    ap.add_argument("--tokenizers", default="", help="reuse the tokenizers/ folder of an earlier run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)

    from lmlab.core.runs import RunDir, write_json
    from lmlab.train.anygpt import model as M

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    t0 = time.perf_counter()
    tcfg = M.TokenizersConfig(seed=args.seed, vq_steps=args.vq_steps)
    b = M.load_bundle(args.tokenizers) if args.tokenizers else M.build_tokenizers(tcfg, out / "tokenizers")
    M._sample_grid(out / "image_roundtrip.png", b.images["test_x"][:10],
                   b.image_tok.decode_batch(b.src.image_test[:10]),
                   "held-out digits (top) and their VQ-VAE round trip (bottom)")
    acfg = M.AlignConfig(seed=args.seed, eval_n=args.eval_n)
    if args.text_replay is not None:
        acfg = dataclasses.replace(acfg, text_replay=args.text_replay)
    acfg.stage0 = dataclasses.replace(acfg.stage0, steps=args.stage0_steps)
    acfg.stage1 = dataclasses.replace(acfg.stage1, steps=args.stage1_steps, batch_size=args.stage1_batch)
    t1 = time.perf_counter()
    r1 = M.run_align(acfg, run, b)
    t_align = time.perf_counter() - t1
    res = {"tokenizers": b.metrics, "stage1": r1["results"], "align_seconds": round(t_align, 1),
           "config": {"stage0_steps": args.stage0_steps, "stage1_steps": args.stage1_steps,
                      "stage1_batch": args.stage1_batch, "stage1_seq_len": acfg.stage1.seq_len,
                      "stage2_steps": args.stage2_steps, "eval_n": args.eval_n, "seed": args.seed,
                      "text_replay": acfg.text_replay, "stage2_replay": args.stage2_replay}}
    if args.text_control:
        res["text_control"] = text_control(M, acfg, run)
    write_json(out / "results.json", res)
    stage1_outs = r1["outs"]
    model1 = r1["model"]
    variants = [("stage2", args.stage2_replay)] + ([] if args.no_ablation else [("stage2_no_replay", 0.0)])
    outs2 = {}
    for name, replay in variants:
        m = copy.deepcopy(model1)
        icfg = M.InstructConfig(init="-", seed=args.seed, steps=args.stage2_steps, replay=replay, eval_n=args.eval_n)
        t2 = time.perf_counter()
        r2 = M.run_instruct(icfg, run, m, r1["tok"], r1["vm"], b)
        res[name] = {**r2["results"], "seconds": round(time.perf_counter() - t2, 1)}
        outs2[name] = r2["outs"]
        write_json(out / "results.json", res)
    # artifacts: PNG grid (rows: direction x stage), WAVs
    rows = {}
    for stage, outs in (("stage 1", stage1_outs), ("stage 2", outs2.get("stage2", {}))):
        for d in ("text->image", "text->image greedy", "speech->image"):
            if d in outs:
                per = max(1, len(outs[d]) // 10)
                rows[f"{stage} {d}"] = [outs[d][k * per] for k in range(10)]
    M.image_grid(out / "generated_images.png", rows, "generated digits, columns = requested digit 0..9")
    from lmlab.train.anygpt.tokenizers import DIGIT_WORDS, write_wav

    for stage, outs in (("stage1", stage1_outs), ("stage2", outs2.get("stage2", {}))):
        for d in ("text->speech", "image->speech"):
            if d in outs:
                per = max(1, len(outs[d]) // 10)
                for k in (0, 3, 7):
                    w = outs[d][k * per]
                    if w.any():
                        write_wav(out / f"{stage}_{d.replace('->', '_to_')}_{DIGIT_WORDS[k]}.wav", w)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "results.json", res)
    dirs = list(M.DIRECTIONS_STAGE1) + ["text->image greedy"] + list(M.DIRECTIONS_STAGE2)
    cols = [("stage 1", res["stage1"]["accuracy"])] + [(n, res[n]["accuracy"]) for n, _ in variants]
    print(f"\n{'direction':<22}" + "".join(f"{c:>18}" for c, _ in cols))
    for d in dirs:
        print(f"{d:<22}" + "".join(f"{a.get(d, float('nan')):>18.3f}" for _, a in cols))
    ppl = [res["stage1"]["ppl_stage0"], res["stage1"]["ppl_stage1"]] + [res[n]["ppl_stage2"] for n, _ in variants]
    print(f"{'text ppl':<22}" + f"stage0 {ppl[0]:.3f}  " + "  ".join(f"{p:.3f}" for p in ppl[1:]))
    if "text_control" in res:
        tc = res["text_control"]
        print(f"text-only control (stage 0 + {tc['continued_tokens']} text tokens): "
              f"ppl {tc['ppl_text_only_continued']:.3f}")
    print(json.dumps(b.metrics))
    print(f"total {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
