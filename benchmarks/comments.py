"""Comment augmentation benchmark (Song et al., arXiv 2402.13013) on the stdlib corpus, CPU.

    python benchmarks/comments.py [--skip-e2e] [--sft-steps 80] [--files 40] [--cpt-steps 120]
        [--out benchmarks/results/comments.json]

Part A (seconds): comment density of lmlab's code domain (the stdlib .py files: median, p10, p90, kept fraction under
the bigcode range [0.01, 0.8], unparsable files) and density-scoring throughput (MB/s on one core) of
``lmlab.data.comments.python_density`` side by side with a bigcode-style reference (bigcode-dataset
``preprocessing/utils/text_extraction.py:get_nl_ratio`` re-implemented: ``tokenize`` comments joined with
``tokenize.untokenize`` + ``ast.get_docstring`` of module/class/function nodes) on the same files, and the same
scoring run as a datatrove pipeline (reader + annotator, LocalPipelineExecutor, 1 task).

Part B (minutes): end to end. (1) commenter = ref:dense instruction-tuned on (stripped, commented) pairs from
well-commented stdlib train files (density >= 0.25); (2) it comments low-density train files (density < 0.05):
``rewrite`` mode (the paper) on the short ones and ``docstrings`` mode (lmlab's constrained mode) on ``--files``
files, the preservation filter counts accepts/rejects with reasons; (3) ref:dense is continued-pretrained on those
files un-augmented vs augmented with the same token budget (steps x batch x seq_len) and both are compared on
held-out documented functions of the code validation split: loss of code given its docstring, of code alone, and
of the docstring given the code.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import statistics
import time
import tokenize
from pathlib import Path

import numpy as np

from lmlab.data import comments as C

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.comments")


# -- the bigcode-style reference (get_nl_ratio for Python) -------------------------------------------------------
def _bigcode_comments(s: str) -> str:
    toks = [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(s).readline)
            if t.type == tokenize.COMMENT]
    return tokenize.untokenize(toks)


def _bigcode_docstrings(s: str) -> str:
    tree = ast.parse(s)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            d = ast.get_docstring(node)
            if d:
                docs.append(d)
    return "\n".join(docs)


def bigcode_nl_ratio(s: str) -> float:
    return (len(_bigcode_comments(s)) + len(_bigcode_docstrings(s))) / max(1, len(s))


def part_a(out: dict) -> None:
    from lmlab.core.corpus import stdlib_files

    files = stdlib_files()
    texts = []
    for p in files:
        with contextlib.suppress(UnicodeDecodeError):
            texts.append(p.read_bytes().decode("utf-8"))
    dens, bad = [], 0
    t0 = time.process_time()
    for t in texts:
        try:
            dens.append(C.python_density(t)["density"])
        except C.DensityError:
            bad += 1
    t_ours = time.process_time() - t0
    ref, ref_bad = [], 0
    t0 = time.process_time()
    for t in texts:
        try:
            ref.append(bigcode_nl_ratio(t))
        except (SyntaxError, tokenize.TokenError, ValueError):
            ref_bad += 1
    t_ref = time.process_time() - t0
    mb = sum(len(t.encode()) for t in texts) / 1e6
    summ = C.density_summary(dens, *C.KEEP_RANGE)
    summ_ref = C.density_summary(ref, *C.KEEP_RANGE)
    # the same scoring as a datatrove pipeline (reader + annotator + writer), one task
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        t0w, t0c = time.perf_counter(), time.process_time()
        C.run_pipeline([C.SourceReader(["stdlib"]), C.ReadErrorFilter(), C.DensityAnnotator(),
                        C.writer(Path(d) / "docs")], Path(d) / "logs")
        t_pipe = time.process_time() - t0c
        wall_pipe = time.perf_counter() - t0w
    out["density"] = {"files": len(files), "utf8_files": len(texts), "MB": round(mb, 2), "unparsable": bad,
                      **{k: round(v, 4) if isinstance(v, float) else v for k, v in summ.items()},
                      "bigcode_ref": {k: round(v, 4) if isinstance(v, float) else v for k, v in summ_ref.items()}}
    out["throughput"] = {"ours_MB_per_cpu_s": round(mb / t_ours, 3), "bigcode_ref_MB_per_cpu_s": round(mb / t_ref, 3),
                         "ratio_ours_over_ref": round(t_ref / t_ours, 3),
                         "datatrove_pipeline_MB_per_cpu_s": round(mb / t_pipe, 3),
                         "datatrove_pipeline_wall_s": round(wall_pipe, 1),
                         "note": "CPU seconds (process_time) of this process; the pipeline runs in-process "
                                 "(workers=1)"}
    C._density_plot(HERE / "results" / "comments_density.png", {"stdlib code": dens},
                    "comment density of the stdlib code domain")
    log.info("density: %s", out["density"])
    log.info("throughput: %s", out["throughput"])


def part_b(out: dict, args) -> None:
    import random

    import torch

    from lmlab.core.models import load

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    train_texts, val_texts = C.code_split(0)
    rng = random.Random(0)
    # (1) commenter SFT
    pairs = C.make_pairs(train_texts, 0.25, max_chars=900)
    rng.shuffle(pairs)
    pairs = pairs[:4000]
    commenter, ctok = load("ref:dense")
    t0 = time.perf_counter()
    losses = C.sft_train(commenter, ctok, pairs, steps=args.sft_steps, batch_size=8, lr=2e-3, max_len=768)
    out["sft"] = {"pairs": len(pairs), "steps": args.sft_steps, "loss_first10": round(float(np.mean(losses[:10])), 3),
                  "loss_last10": round(float(np.mean(losses[-10:])), 3), "seconds": round(time.perf_counter() - t0)}
    log.info("sft: %s", out["sft"])
    # (2) augmentation of low-density train files
    low = []
    for i, t in enumerate(train_texts):
        try:
            d = C.python_density(t)["density"]
        except C.DensityError:
            continue
        if d < args.max_density and 300 <= len(t) <= 20000 and C.docstring_sites(t):
            low.append(i)
    rng.shuffle(low)
    chosen = low[:args.files]
    out["low_density_train_files"] = len(low)
    # rewrite mode (the paper) needs the whole file in context: at this scale, on short undocumented functions of
    # the low-density files (whole-file rewrites exceed the tiny model's ability and context)
    snippets = [s for i in low for s in C.function_snippets(train_texts[i], 400)
                if C.python_density(s)["density"] == 0 and len(ctok(s)["input_ids"]) <= 160]
    rng.shuffle(snippets)
    snippets = snippets[:args.rewrite_files]
    t0 = time.perf_counter()
    rw = C.HFCommenter(model_obj=commenter, tokenizer_obj=ctok, mode="rewrite", batch_size=8, max_new_tokens=240,
                       max_input_tokens=160)
    rw_out, rw_info = C.augment_texts(snippets, rw, 1.01, len(snippets))
    out["rewrite"] = {"snippets": len(snippets), **{k: v for k, v in rw_info.items() if not k.startswith("density_")},
                      "seconds": round(time.perf_counter() - t0),
                      "accepted_samples": [a for o, a in zip(snippets, rw_out) if o != a][:2]}
    log.info("rewrite mode: %s", out["rewrite"])
    t0 = time.perf_counter()
    ds = C.HFCommenter(model_obj=commenter, tokenizer_obj=ctok, mode="docstrings", batch_size=8)
    subset = [train_texts[i] for i in chosen]
    aug_texts, ds_info = C.augment_texts(subset, ds, 1.01, len(subset))
    out["docstrings"] = {"files": len(subset), **{k: v for k, v in ds_info.items() if not k.startswith("density_")},
                         "density_before_median": round(statistics.median(ds_info["density_before"]), 4)
                         if ds_info["density_before"] else None,
                         "density_after_median": round(statistics.median(ds_info["density_after"]), 4)
                         if ds_info["density_after"] else None,
                         "seconds": round(time.perf_counter() - t0)}
    samples = [{"original": o[:600], "augmented": a[:900]} for o, a in zip(subset, aug_texts) if o != a][:3]
    out["docstrings"]["samples"] = samples
    log.info("docstrings mode: %s", {k: v for k, v in out["docstrings"].items() if k != "samples"})
    del commenter
    # (3) continued pretraining: un-augmented vs augmented, same token budget
    funcs = C.documented_functions(val_texts)
    rng.shuffle(funcs)
    funcs = funcs[:args.eval_functions]
    base, tok = load("ref:dense")
    res = {"base": C.alignment_eval(base, tok, funcs, per_function=True)}
    for arm, texts in (("plain", subset), ("augmented", aug_texts)):
        model, tok = load("ref:dense")
        t0 = time.perf_counter()
        st = C.continue_pretraining(model, tok, texts, val_texts, args.cpt_steps, 8, 256, 1e-3, seed=0)
        res[arm] = {**C.alignment_eval(model, tok, funcs, per_function=True), "tokens": st.tokens,
                    "final_train_loss": round(float(np.mean(st.losses[-10:])), 4),
                    "seconds": round(time.perf_counter() - t0)}
        log.info("%s: %s", arm, res[arm])
    from lmlab.core.metrics import bootstrap_diff_ci

    per = {a: r.pop("per_function") for a, r in res.items()}
    cis = {}
    for key in ("code_given_doc", "code_alone", "doc_given_code"):
        d, lo, hi = bootstrap_diff_ci(per["augmented"][key], per["plain"][key], n=2000, seed=0)
        cis[key] = {"mean_diff_per_function": round(d, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    res = {a: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for a, r in res.items()}
    res["augmented_minus_plain_paired_bootstrap"] = cis
    res["effect_code_given_doc"] = round(res["augmented"]["code_given_doc"] - res["plain"]["code_given_doc"], 4)
    res["effect_doc_given_code"] = round(res["augmented"]["doc_given_code"] - res["plain"]["doc_given_code"], 4)
    out["cpt"] = {"steps": args.cpt_steps, "batch": 8, "seq_len": 256, "eval_functions": len(funcs), **res}
    out["e2e_wall_s"] = round(time.perf_counter() - t_start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--files", type=int, default=60)
    ap.add_argument("--max-density", type=float, default=0.1)
    ap.add_argument("--rewrite-files", type=int, default=24)
    ap.add_argument("--cpt-steps", type=int, default=120)
    ap.add_argument("--eval-functions", type=int, default=150)
    ap.add_argument("--out", default=str(HERE / "results" / "comments.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(1)
    out: dict = {"command": "python benchmarks/comments.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "skip_e2e"))}
    part_a(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if not args.skip_e2e:
        part_b(out, args)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "docstrings"}, indent=2))


if __name__ == "__main__":
    main()
