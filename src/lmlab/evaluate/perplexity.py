"""Perplexity and bits-per-byte of causal LMs on corpus domains (``lmlab eval ppl``).

For a token stream x_1..x_N encoding ``n_bytes`` UTF-8 bytes, scored in non-overlapping windows of ``window``
tokens (the first token of each window is conditioned on nothing earlier)::

    loss = 1/N Σ_t -ln p(x_t | x_<t within the window)     ppl = exp(loss)     bpb = Σ_t -ln p / (ln 2 · n_bytes)

bits/byte compares models with different tokenizers; perplexity only compares models sharing one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.config import ConfigError, RunArgs
from lmlab.core.zoo import REF_MAX_BYTES

log = logging.getLogger(__name__)


@dataclass
class PerplexityConfig(RunArgs):
    """Evaluate models on held-out corpus domains."""

    model: list[str] = field(default_factory=lambda: ["ref:dense", "ref:mamba"])
    """Model specs (ref:NAME, HF name or path), comma-separated."""
    data: list[str] = field(default_factory=lambda: ["code", "prose", "math"])
    """Corpus domains (validation split), or text/jsonl/parquet paths."""
    max_bytes: int = REF_MAX_BYTES
    """Corpus build cap per domain (validation documents are chosen by hash, so any cap keeps them unseen)."""
    max_tokens: int = 16_384
    """Tokens scored per domain and model."""
    window: int = 256
    """Context window in tokens (non-overlapping)."""
    batch_size: int = 8
    """Windows per forward pass."""
    samples: int = 1
    """Greedy continuations to write per model to samples.jsonl (0: none)."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ConfigError("give at least one model")
        if self.window < 2 or self.max_tokens < self.window:
            raise ConfigError("need window >= 2 and max_tokens >= window")


def domain_texts(data: list[str], max_bytes: int, seed: int = 0) -> dict[str, list[str]]:
    """Validation documents per domain name (or per user path)."""
    from lmlab.core.corpus import DOMAINS, build_corpus, load_source

    names = [d for d in data if d in DOMAINS]
    out: dict[str, list[str]] = {}
    if names:
        corpus = build_corpus(domains=tuple(names), max_bytes=max_bytes, seed=seed)
        out.update({n: corpus.val[n] for n in names})
    for d in data:
        if d not in DOMAINS:
            out[Path(d).name] = load_source(d)
    return out


def stream(tok, docs: list[str], max_tokens: int) -> tuple[np.ndarray, int]:
    """Concatenate documents (EOS-separated) up to ``max_tokens``; returns (ids, UTF-8 bytes covered)."""
    ids: list[int] = []
    n_bytes = 0
    eos = tok.eos_token_id
    for t in docs:
        enc = tok(t, add_special_tokens=False)["input_ids"]
        if eos is not None:
            enc = enc + [eos]
        room = max_tokens - len(ids)
        if room <= 0:
            break
        if len(enc) > room:  # cut the last document; count only the bytes of the kept tokens
            enc = enc[:room]
            kept = tok.decode(enc)
            if not t.startswith(kept):  # the cut split a multi-byte character: don't count U+FFFD's 3 bytes
                kept = kept.rstrip("\ufffd")
            n_bytes += len(kept.encode())
        else:
            n_bytes += len(t.encode()) + (1 if eos is not None else 0)
        ids.extend(enc)
    return np.asarray(ids, dtype=np.int64), n_bytes


def evaluate_model(model, tok, texts: dict[str, list[str]], max_tokens: int, window: int,
                   batch_size: int = 8) -> dict[str, dict[str, Any]]:
    from lmlab.core.metrics import lm_eval_stream

    out = {}
    for name, docs in texts.items():
        ids, n_bytes = stream(tok, docs, max_tokens)
        if len(ids) < 2:
            raise ConfigError(f"domain {name!r} has no validation text")
        res = lm_eval_stream(model, ids, n_bytes, window=window, batch_size=batch_size, progress=True)
        out[name] = {k: float(res[k]) for k in ("loss", "ppl", "bpb", "tokens", "bytes")}
    return out


def greedy_sample(model, tok, prompt: str, max_new_tokens: int = 48) -> str:
    import torch

    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


PROMPTS = ["def read_config(path):\n", "The purpose of this module is", "Q: What is 17 + 25?\nA:"]


def main(cfg: PerplexityConfig) -> Path:
    from lmlab.core.models import load, n_params
    from lmlab.core.plotting import bar_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    loaded = [(spec, *load(spec, dev, dtype, cfg.trust_remote_code)) for spec in cfg.model]  # fail before run dir
    texts = domain_texts(cfg.data, cfg.max_bytes, cfg.seed)
    with start_run(cfg, "eval-ppl", device=dev, dtype=dtype, threads=threads) as run:
        results: dict[str, Any] = {"window": cfg.window, "max_tokens": cfg.max_tokens, "models": {}}
        samples = []
        for spec, model, tok in loaded:
            res = evaluate_model(model, tok, texts, cfg.max_tokens, cfg.window, cfg.batch_size)
            results["models"][spec] = {"params": n_params(model), "domains": res}
            log.info("%s: %s", spec, ", ".join(f"{d} {r['bpb']:.3f} bpb" for d, r in res.items()))
            for prompt in PROMPTS[: cfg.samples * len(PROMPTS)]:
                samples.append({"model": spec, "prompt": prompt, "completion": greedy_sample(model, tok, prompt)})
        if samples:
            run.write_samples(samples)
        domains = list(texts)
        bar_plot(run.plots / "bits_per_byte.png", domains,
                 {spec: [results["models"][spec]["domains"][d]["bpb"] for d in domains] for spec in cfg.model},
                 title="validation bits per byte", ylabel="bits/byte")
        run.finish(results)
    return run.path
