"""Foundation benchmark: reference model sizes, training throughput (fp32 vs bf16 autocast), quality per domain.

    python benchmarks/foundation.py [--steps 20] [--threads 1] [--out benchmarks/results/foundation.json]

Throughput is measured with lmlab's own training loop (``lmlab.core.pretrain.train``) on the reference
architectures and the reference tokenizer's token stream, in one process, fp32 and bf16 interleaved so machine
noise hits both alike; it reports wall tokens/s and tokens per CPU-second (``time.process_time``), and the
bf16/fp32 ratio. Quality numbers are read from the shipped models' ``lmlab_card.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def throughput(arch: str, tok, ids, steps: int, autocast: bool, seed: int = 0) -> dict:
    from lmlab.core import zoo
    from lmlab.core.pretrain import OptimConfig, train

    model = zoo.build_model(arch, vocab_size=len(tok), special=zoo._special_ids(tok))
    opt = OptimConfig(steps=steps + 2, batch_size=8, seq_len=256, lr=1e-3, warmup=1, eval_every=0,
                      autocast=autocast)
    train(model, ids, None, opt, seed=seed, stop_after=2, progress=False)  # warm-up steps (not timed)
    t0, c0 = time.perf_counter(), time.process_time()
    st = train(model, ids, None, opt, seed=seed, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = st.tokens
    return {"arch": arch, "autocast_bf16": autocast, "steps": steps + 2, "tokens": tokens,
            "wall_tok_per_s": round(tokens / wall, 1), "tok_per_cpu_s": round(tokens / cpu, 1)}


def cli_help_seconds(repeats: int = 7) -> dict:
    """Median wall time of ``lmlab --help`` vs a bare ``python -c pass`` (the interpreter's own start-up)."""
    import statistics
    import subprocess
    import sys

    def med(cmd: list[str]) -> float:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    bare = med([sys.executable, "-c", "pass"])
    lm = med([sys.executable, "-m", "lmlab", "--help"])
    return {"python_startup_s": round(bare, 4), "lmlab_help_s": round(lm, 4), "lmlab_own_s": round(lm - bare, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/foundation.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmlab.core import zoo
    from lmlab.core.models import load_model, n_params

    tok = zoo.reference_tokenizer()
    ids, _, meta = zoo.token_streams(tok, "code,prose,math", zoo.REF_MAX_BYTES)
    rows = []
    for arch in ("dense", "mamba"):
        for autocast in (False, True):
            rows.append(throughput(arch, tok, ids, args.steps, autocast))
    models = {}
    for name in ("dense", "mamba"):
        if not zoo.is_available(name):
            continue
        path = zoo.resolve(name)
        m = load_model(f"ref:{name}")
        size = sum(f.stat().st_size for f in (zoo.PACKAGE_ZOO / name).glob("*.safetensors"))  # shipped, bf16
        card = zoo.card(name)
        models[name] = {"params": n_params(m), "safetensors_bytes": size, "path": str(path),
                        "train_tokens": card.get("train_tokens"), "train_seconds": card.get("train_seconds"),
                        "val": card.get("val")}
    helps = cli_help_seconds()
    out = {"threads": args.threads, "torch": torch.__version__, "corpus": meta, "throughput": rows,
           "models": models, "cli_help": helps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    print(f"{'arch':<7}{'bf16':>6}{'wall tok/s':>12}{'tok/CPU-s':>11}")
    for r in rows:
        print(f"{r['arch']:<7}{str(r['autocast_bf16']):>6}{r['wall_tok_per_s']:>12.0f}{r['tok_per_cpu_s']:>11.0f}")
    for arch in ("dense", "mamba"):
        fp, bf = (r for r in rows if r["arch"] == arch)
        print(f"{arch}: bf16/fp32 = {bf['tok_per_cpu_s'] / fp['tok_per_cpu_s']:.2f}x (per CPU-s)")
    print(f"lmlab --help: {helps['lmlab_help_s']:.3f} s wall, {helps['lmlab_own_s']:.3f} s beyond python start-up")
    for name, m in models.items():
        val = ", ".join(f"{d} {v['loss']:.3f} nats / {v['bpb']:.3f} bpb" for d, v in (m["val"] or {}).items())
        print(f"ref:{name}: {m['params'] / 1e6:.2f}M params, {m['safetensors_bytes'] / 1e6:.1f} MB bf16, {val}")


if __name__ == "__main__":
    main()
