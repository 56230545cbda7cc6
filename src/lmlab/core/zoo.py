"""Reference tiny models: every capability's embedded default.

lmlab trains its own small models on its offline corpus (:mod:`lmlab.core.corpus`: stdlib code, stdlib
docstrings/comments as prose, synthetic math) with one shared byte-level BPE tokenizer, so everything runs with
no hub and no download:

=========  ====================================================  ====================================
name       architecture                                          why
=========  ====================================================  ====================================
``dense``  ``LlamaForCausalLM`` d=192, 4 layers, 4 heads, tied   the transformer every method uses
``mamba``  ``Mamba2ForCausalLM`` d=192, 4 layers, state 32       universality (Transformer vs Mamba)
``moe``    ``LmlabMoeForCausalLM`` d=192, 4 layers, 8 SwiGLU    MoE with the Rectify-Router (IR+FR),
           experts of 256, top-2, cf 1.0, IR+FR                  not shipped: ``lmlab zoo train moe``
=========  ====================================================  ====================================

Mamba-2 rather than Mamba-1: on this CPU transformers' Mamba-1 torch path trains at ~530 tok/CPU-s even with the
``mambapy`` scan, Mamba-2's chunked SSD path at ~5.4k (BENCHMARKS.md), so both models see the same tokens in
minutes.

``lmlab zoo train NAME`` retrains one reproducibly from the seed and the corpus hash (recorded in the model's
``lmlab_card.json``) into the user cache (``$LMLAB_CACHE`` or ``$XDG_CACHE_HOME/lmlab``), which then wins over the
copy shipped inside the package (``lmlab/zoo/NAME``, bf16 safetensors, a few MB). ``ref:NAME`` resolves anywhere a
MODEL is accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.config import ConfigError, RunArgs
from lmlab.core.pretrain import OptimConfig
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

PACKAGE_ZOO = Path(__file__).resolve().parent.parent / "zoo"
CARD = "lmlab_card.json"
VOCAB_SIZE = 2048
DEFAULT_DOMAINS = ("code", "prose", "math")
REF_MAX_BYTES = 3_000_000
"""Corpus cap per domain for the reference models (the val split depends on the build, so evals reuse it)."""


def _llama(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=512, max_position_embeddings=1024,
                       tie_word_embeddings=True, rope_theta=10000.0)


def _mamba2(vocab_size: int):
    from transformers import Mamba2Config

    return Mamba2Config(vocab_size=vocab_size, hidden_size=192, num_hidden_layers=4, state_size=32, head_dim=32,
                        num_heads=12, expand=2, n_groups=1, chunk_size=64, conv_kernel=4,
                        tie_word_embeddings=True)


def _moe(vocab_size: int):
    from lmlab.train.moe import reference_config  # also registers model_type "lmlab_moe" with the Auto classes

    return reference_config(vocab_size)


ARCHS: dict[str, Callable[[int], Any]] = {"dense": _llama, "mamba": _mamba2, "moe": _moe}
"""Reference architectures: name -> ``vocab_size -> transformers config``."""


REF_OPTIM = OptimConfig(steps=2000, batch_size=8, seq_len=256, lr=3e-3, warmup=50, autocast=True,
                        eval_every=200, save_every=200)
"""The reference training recipe (both models see exactly the same batches for the same seed)."""
RESERVED: dict[str, str] = {}
"""Names kept for capabilities not built yet (resolving one is a clear error)."""


# ----------------------------------------------------------------------------------------------------
# locations


def user_zoo() -> Path:
    from lmlab.core.corpus import cache_dir

    return cache_dir() / "zoo"


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def resolve(name: str) -> Path:
    """Folder of reference model ``name``: the user's retrained copy, else the shipped one."""
    if name in RESERVED:
        raise LmlabError(RESERVED[name])
    if name not in ARCHS:
        raise LmlabError(f"unknown reference model 'ref:{name}'; choose from {sorted(ARCHS)}")
    for base in (user_zoo(), PACKAGE_ZOO):
        if _is_model_dir(base / name):
            return base / name
    raise LmlabError(f"reference model 'ref:{name}' is not built: run 'lmlab zoo train {name}'")


def is_available(name: str) -> bool:
    try:
        resolve(name)
    except LmlabError:
        return False
    return True


def card(name: str) -> dict[str, Any]:
    p = resolve(name) / CARD
    return json.loads(p.read_text()) if p.is_file() else {}


# ----------------------------------------------------------------------------------------------------
# tokenizer + data


def reference_tokenizer(train_if_missing: bool = True):
    """The shared reference BPE tokenizer (cache, then package, else trained on the corpus and cached)."""
    from lmlab.core.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    for base in (user_zoo(), PACKAGE_ZOO):
        if (base / "tokenizer" / "tokenizer.json").is_file():
            return load_tokenizer(base / "tokenizer")
    if not train_if_missing:
        raise LmlabError("reference tokenizer not found: run 'lmlab zoo train tokenizer'")
    corpus = _corpus(DEFAULT_DOMAINS, 2_000_000, seed=0)
    texts = [t for docs in corpus.train.values() for t in docs]
    log.info("training the reference tokenizer (vocab %d) on %d documents", VOCAB_SIZE, len(texts))
    tok = train_bpe(texts, vocab_size=VOCAB_SIZE)
    save_tokenizer(tok, user_zoo() / "tokenizer")
    return load_tokenizer(user_zoo() / "tokenizer")


def _corpus(domains: tuple[str, ...], max_bytes: int, seed: int):
    from lmlab.core.corpus import build_corpus

    return build_corpus(domains=domains, max_bytes=max_bytes, seed=seed)


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def token_streams(tok, data: str, max_bytes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Encode a corpus spec (comma-separated domains or a path / hf:NAME) into train/val token streams.

    Encoded streams are cached by (corpus hash, tokenizer hash); returns ``(train_ids, val_ids, meta)``.
    """
    from lmlab.core.corpus import cache_dir, encode_docs, load_tokens, save_tokens

    names = tuple(d.strip() for d in data.split(",") if d.strip())
    if not names:
        raise LmlabError("no training data given")
    corpus = _corpus(names, max_bytes, seed)  # domains, paths and hf:NAME alike get the hash-based split
    train_docs, val_docs, chash = corpus.texts("train"), corpus.texts("val"), corpus.hash
    eos = tok.eos_token_id
    if not train_docs or not val_docs:
        raise LmlabError(f"{data!r} has too little text for a train/val split ({len(train_docs)} train, "
                         f"{len(val_docs)} val documents)")
    key = f"{chash}-{tokenizer_hash(tok)}"
    d = cache_dir() / "tokens" / key
    if (d / "train.npy").is_file() and (d / "val.npy").is_file():
        tr, va = load_tokens(d / "train.npy"), load_tokens(d / "val.npy")
    else:
        tr, va = encode_docs(tok, train_docs, eos), encode_docs(tok, val_docs, eos)
        save_tokens(d / "train.npy", tr)
        save_tokens(d / "val.npy", va)
    meta = {"data": data, "corpus_hash": chash, "tokenizer_hash": tokenizer_hash(tok),
            "train_tokens": int(len(tr)), "val_tokens": int(len(va)), "max_bytes": max_bytes}
    return tr, va, meta


# ----------------------------------------------------------------------------------------------------
# models


def _special_ids(tok) -> dict[str, int]:
    eos = tok.eos_token_id
    return {"bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else eos, "eos_token_id": eos,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos}


def build_model(arch: str, vocab_size: int, init: str = "scratch", trust_remote_code: bool = False,
                special: dict[str, int] | None = None):
    """A model to train: a reference arch name, a config folder/file (random init), or pretrained weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if init == "pretrained":
        from lmlab.core.models import load_model

        return load_model(arch, trust_remote_code=trust_remote_code).train()
    if arch in ARCHS:
        config = ARCHS[arch](vocab_size)
    else:
        p = Path(arch)
        if not p.exists():
            raise LmlabError(f"unknown architecture {arch!r}: not one of {sorted(ARCHS)} and no such path")
        config = AutoConfig.from_pretrained(p.parent if p.is_file() else p, trust_remote_code=trust_remote_code)
        config.vocab_size = vocab_size
    for k, v in (special or {}).items():
        setattr(config, k, v)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                            trust_remote_code=trust_remote_code).train()


def domain_eval(model, tok, corpus, window: int = 256, max_tokens: int = 32_768) -> dict[str, dict[str, float]]:
    """Validation loss, perplexity and bits/byte per corpus domain (non-overlapping windows)."""
    from lmlab.core.metrics import lm_eval_stream

    out = {}
    for name, docs in corpus.val.items():
        ids, n_bytes = [], 0
        for t in docs:
            enc = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(ids) + len(enc) > max_tokens and ids:
                break
            ids.extend(enc)
            n_bytes += len(t.encode()) + 1
        res = lm_eval_stream(model, np.asarray(ids, dtype=np.int64), n_bytes, window=window)
        out[name] = {k: float(res[k]) for k in ("loss", "ppl", "bpb", "tokens", "bytes")}
    return out


# ----------------------------------------------------------------------------------------------------
# `lmlab zoo train` / `lmlab zoo list`


@dataclass
class ZooTrainConfig(RunArgs):
    """Train a reference model (or the reference tokenizer) on the built-in corpus."""

    name: str = "dense"
    """Which reference: dense | mamba | moe | tokenizer."""
    max_bytes: int = REF_MAX_BYTES
    """Max text bytes per corpus domain."""
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAINS))
    """Corpus domains to train on."""
    optim: OptimConfig = field(default_factory=lambda: dataclasses.replace(REF_OPTIM))
    """Optimisation settings (the reference recipe)."""
    install: bool = True
    """Copy the trained model into the user zoo so ref:NAME uses it."""
    ship_dir: str | None = None
    """Maintainers: also write a bf16 copy here (e.g. src/lmlab/zoo) to ship with the package."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name != "tokenizer" and self.name not in ARCHS:
            raise ConfigError(f"name must be one of {sorted(ARCHS) + ['tokenizer']}, got {self.name!r}")


def train_main(cfg: ZooTrainConfig) -> Path:
    from lmlab.core.pretrain import train
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    if cfg.name == "tokenizer":
        with start_run(cfg, "zoo-train-tokenizer", device=dev, dtype=dtype, threads=threads) as run:
            tok = reference_tokenizer()
            run.finish({"vocab_size": len(tok), "tokenizer_hash": tokenizer_hash(tok)})
        return run.path
    optim = cfg.optim
    tok = reference_tokenizer()
    data = ",".join(cfg.domains)
    train_ids, val_ids, data_meta = token_streams(tok, data, cfg.max_bytes, seed=cfg.seed)
    model = build_model(cfg.name, vocab_size=len(tok), special=_special_ids(tok)).to(dev)
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    with start_run(cfg, f"zoo-train-{cfg.name}", device=dev, dtype=dtype, threads=threads,
                   extra_meta={"data": data_meta, "params": n}) as run:
        st = train(model, train_ids, val_ids, optim, seed=cfg.seed, run=run, ckpt_dir=run.path / "checkpoint")
        corpus = _corpus(tuple(cfg.domains), cfg.max_bytes, cfg.seed)
        per_domain = domain_eval(model, tok, corpus)
        info = {"name": cfg.name, "arch": type(model).__name__, "params": n, "steps": optim.steps,
                "train_tokens": st.tokens, "train_seconds": round(st.train_seconds, 1),
                "tok_per_s": round(st.tokens / max(1e-9, st.train_seconds), 1), "seed": cfg.seed,
                "corpus_hash": data_meta["corpus_hash"], "tokenizer_hash": data_meta["tokenizer_hash"],
                "domains": cfg.domains, "max_bytes": cfg.max_bytes, "val": per_domain,
                "final_train_loss": st.losses[-1], "command": f"lmlab zoo train {cfg.name} seed={cfg.seed}"}
        model_dir = run.path / "model"
        _save_ref(model, tok, model_dir, info, bf16=False)
        if cfg.install:
            _install(model_dir, user_zoo() / cfg.name)
        if cfg.ship_dir:
            _save_ref(model, tok, Path(cfg.ship_dir) / cfg.name, info, bf16=True)
            tok.save_pretrained(Path(cfg.ship_dir) / "tokenizer")
        from lmlab.core.plotting import line_plot

        line_plot(run.plots / "loss.png", list(range(1, len(st.losses) + 1)), {"train": st.losses},
                  title=f"ref:{cfg.name} training loss", xlabel="step", ylabel="nats/token")
        run.finish(info)
    return run.path


def _save_ref(model, tok, out: Path, info: dict, bf16: bool) -> None:
    import torch

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m = model
    if bf16:
        import copy

        m = copy.deepcopy(model).to(torch.bfloat16)
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / CARD).write_text(json.dumps(info, indent=2) + "\n")
    _install(tmp, out, move=True)


def _install(src: Path, dst: Path, move: bool = False) -> None:
    """Replace ``dst`` with ``src`` (copy or move) so the old model is never half-overwritten."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.with_name(dst.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    if move:
        src.rename(staging)
    else:
        shutil.copytree(src, staging)
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        staging.rename(dst)
        shutil.rmtree(old)
    else:
        staging.rename(dst)


@dataclass
class ZooListConfig:
    """List the reference models: where each resolves and its recorded quality."""

    json: bool = False
    """Print JSON instead of a table."""


def list_rows() -> list[dict[str, Any]]:
    rows = []
    for name in sorted(ARCHS):
        row: dict[str, Any] = {"name": f"ref:{name}", "source": "missing", "path": None}
        for label, base in (("cache", user_zoo()), ("shipped", PACKAGE_ZOO)):
            if _is_model_dir(base / name):
                row.update(source=label, path=str(base / name))
                c = base / name / CARD
                if c.is_file():
                    info = json.loads(c.read_text())
                    row.update(params=info.get("params"), train_tokens=info.get("train_tokens"),
                               bpb={k: round(v["bpb"], 3) for k, v in info.get("val", {}).items()})
                break
        rows.append(row)
    for name, why in RESERVED.items():
        rows.append({"name": f"ref:{name}", "source": "reserved", "path": None, "note": why})
    return rows


def list_main(cfg: ZooListConfig) -> str:
    rows = list_rows()
    if cfg.json:
        return json.dumps(rows, indent=2)
    lines = [f"{'name':<11}{'source':<9}{'params':>9}  {'train tok':>10}  bits/byte per domain"]
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-"
        toks = f"{r['train_tokens'] / 1e6:.2f}M" if r.get("train_tokens") else "-"
        bpb = ", ".join(f"{k} {v}" for k, v in (r.get("bpb") or {}).items()) or r.get("note", "")
        lines.append(f"{r['name']:<11}{r['source']:<9}{params:>9}  {toks:>10}  {bpb}")
    return "\n".join(lines)
