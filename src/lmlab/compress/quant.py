"""Weight-only quantisation baselines (RTN, GPTQ) and the helpers every compression command shares.

RTN: round-to-nearest, per-group asymmetric (the baseline of GPTQ/AWQ papers)
-----------------------------------------------------------------------------
For a weight ``W (m, n)`` split along the input dimension into groups of ``g`` columns (``g = 0``: one group per
row), with ``b`` bits::

    scale = (max(w) - min(w)) / (2^b - 1)         zero = round(-min(w) / scale)
    q     = clamp(round(w / scale) + zero, 0, 2^b - 1)          w_hat = (q - zero) * scale

Storage as in the GPTQ/AWQ formats: b-bit codes, one fp16 scale and one b-bit zero per group, so::

    bits/param = b + (16 + b) / g          (4.156 for w4g128; per-row: b + (16 + b) / n)

GPTQ: "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
-----------------------------------------------------------------------------------------
Frantar, Ashkboos, Hoefler, Alistarh (arXiv 2210.17323). Quantise one column at a time and push the error onto the
not-yet-quantised columns through the inverse Hessian of the layer-wise least-squares objective::

    H    = 2/N sum_t x_t x_t^T  (+ percdamp * mean(diag H) * I)       dead inputs (H_jj = 0): W[:, j] = 0
    Hinv = chol_upper(H^-1)
    for each column i (in blocks of 128):  q_i = quant(w_i);  err = (w_i - q_i) / Hinv_ii;
                                            W[:, i:] -= err (x) Hinv[i, i:]

Defaults: damping 0.01, block 128, group parameters recomputed at each group start, no act-order, layers quantised
sequentially (decoder layer ``l`` sees the inputs produced by the already-quantised layers ``< l``).

The shared helpers below (linear discovery, byte parsing, calibration windows, evaluation text) are used by
:mod:`lmlab.compress.bitstack` and :mod:`lmlab.compress.rankk` too.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.config import ConfigError, RunArgs
from lmlab.core.zoo import REF_MAX_BYTES
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

DEFAULT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Linear layers compressed by default (Llama/Mistral/Qwen2 names); configurable for other architectures."""


# ----------------------------------------------------------------------------------------------------------
# shared helpers: budgets, linears, text


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"3000MiB"`` -> 3145728000, ``"3000MB"`` -> 3000000000, ``"2.5GB"``, ``"123456"`` (bytes) -> int.

    MB/GB are decimal (10^6, 10^9), MiB/GiB binary (2^20, 2^30); BitStack's ``--max_memory_MB`` is MiB."""
    if isinstance(text, int | np.integer) and not isinstance(text, bool):
        if text <= 0:
            raise LmlabError(f"memory budget must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise LmlabError(f"cannot parse memory budget {text!r}; use e.g. 3000MiB, 3000MB, 2.5GB or a byte count")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise LmlabError(f"memory budget must be positive, got {text!r}")
    return int(value)


def fmt_bytes(n: int | float) -> str:
    """``1536000`` -> ``"1,536,000 B (1.46 MiB)"``: exact bytes first, then a readable size."""
    return f"{int(n):,} B ({n / 2**20:.3f} MiB)"


def find_linears(model: Any, names: list[str]) -> dict[str, Any]:
    """``{qualified name: nn.Linear}`` of every linear whose last name component is in ``names`` (model order).

    Raises :class:`LmlabError` when there is none, or when one holds NaN/inf weights."""
    import torch

    wanted = set(names)
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in wanted}
    if not found:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LmlabError(f"model {type(model).__name__} has no decomposable nn.Linear named {sorted(wanted)}"
                         + (f"; its linears are {kinds} (set modules=...)" if kinds else " (it has no nn.Linear)"))
    for n, m in found.items():
        if not torch.isfinite(m.weight).all():
            raise LmlabError(f"weight of {n} holds NaN or inf values; refusing to compress it")
    return found


def extra_bytes(model: Any, linears: dict[str, Any], bytes_per_param: int = 2) -> int:
    """Bytes of every parameter that is not a compressed linear's weight, stored at ``bytes_per_param``
    (fp16 by default); tied tensors count once."""
    skip = {id(m.weight) for m in linears.values()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * bytes_per_param
    return total


def _domain_list(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def texts_for(spec: str, split: str, max_bytes: int = REF_MAX_BYTES, seed: int = 0) -> dict[str, list[str]]:
    """Documents per source: built-in domains (``code,prose,math``; ``split`` train or val of the reference
    corpus) or a text/jsonl/parquet path (used whole, whatever ``split``)."""
    from lmlab.core.corpus import DOMAINS, build_corpus, load_source

    parts = _domain_list(spec)
    if not parts:
        raise ConfigError("no text source given")
    names = [p for p in parts if p in DOMAINS]
    out: dict[str, list[str]] = {}
    if names:
        corpus = build_corpus(domains=tuple(names), max_bytes=max_bytes, seed=seed)
        src = corpus.train if split == "train" else corpus.val
        out.update({n: src[n] for n in names})
    for p in parts:
        if p not in DOMAINS:
            docs = load_source(p)
            if not docs:
                raise LmlabError(f"{p}: no text")
            out[Path(p).name] = docs
    return out


def token_windows(tok: Any, texts: dict[str, list[str]], n: int, seqlen: int, seed: int = 0) -> Any:
    """``(n, seqlen)`` LongTensor of random windows, spread evenly over the sources (BitStack samples random
    2048-token windows of WikiText-2 train; here the text is whatever the user gives)."""
    import torch

    from lmlab.core.corpus import encode_docs

    rng = np.random.default_rng(seed)
    per = [n // len(texts) + (1 if i < n % len(texts) else 0) for i in range(len(texts))]
    rows = []
    for (name, docs), k in zip(texts.items(), per):
        if k == 0:
            continue
        budget = 0
        chosen = []
        for i in rng.permutation(len(docs)):  # enough documents for k windows (about 3 bytes per token)
            chosen.append(docs[int(i)])
            budget += len(docs[int(i)])
            if budget > 4 * k * seqlen * 4:
                break
        ids = encode_docs(tok, chosen).astype(np.int64)
        if ids.size <= seqlen:
            raise LmlabError(f"{name}: only {ids.size} tokens of text, need more than {seqlen} for a window")
        starts = rng.integers(0, ids.size - seqlen, size=k)
        rows.extend(ids[s:s + seqlen] for s in starts)
    return torch.from_numpy(np.stack(rows))


def text_hash(windows: Any) -> str:
    """sha256 of calibration token windows (recorded in artifacts for reproducibility)."""
    return hashlib.sha256(windows.numpy().astype(np.int64).tobytes()).hexdigest()[:16]


@dataclass
class EvalSet:
    """Held-out token streams per source with their UTF-8 byte counts (bits/byte needs the bytes)."""

    streams: dict[str, tuple[np.ndarray, int]]
    window: int = 256

    @classmethod
    def build(cls, tok: Any, spec: str, max_tokens: int, window: int = 256, split: str = "val") -> EvalSet:
        from lmlab.evaluate.perplexity import stream

        texts = texts_for(spec, split)
        streams = {}
        for name, docs in texts.items():
            ids, n_bytes = stream(tok, docs, max_tokens)
            if ids.size < 2:
                raise LmlabError(f"{name}: no evaluation text")
            streams[name] = (ids, n_bytes)
        return cls(streams, window)

    def evaluate(self, model: Any, batch_size: int = 8) -> dict[str, Any]:
        """``{"bpb": mean over sources, "ppl": mean, "domains": {name: {bpb, ppl, loss}}}``."""
        from lmlab.core.metrics import lm_eval_stream

        doms = {}
        for name, (ids, n_bytes) in self.streams.items():
            r = lm_eval_stream(model, ids, n_bytes, window=self.window, batch_size=batch_size)
            doms[name] = {"bpb": r["bpb"], "ppl": r["ppl"], "loss": r["loss"]}
        return {"bpb": float(np.mean([d["bpb"] for d in doms.values()])),
                "ppl": float(np.mean([d["ppl"] for d in doms.values()])), "domains": doms}

    def chunk_bits(self, model: Any, batch_size: int = 8) -> dict[str, np.ndarray]:
        """Per source, the bits (summed NLL / ln 2) of each consecutive chunk of ``window - 1`` scored tokens:
        ``{name: (n_chunks,)}``; ``chunks.sum() / n_bytes`` is the source's bits/byte. For paired comparisons
        (:func:`paired_bpb_diff`)."""
        from lmlab.core.metrics import token_nll

        out = {}
        for name, (ids, _) in self.streams.items():
            nll = token_nll(model, ids, window=self.window, batch_size=batch_size).double().numpy()  # (N-1,)
            c = self.window - 1
            n = -(-nll.size // c)
            out[name] = np.array([nll[i * c:(i + 1) * c].sum() for i in range(n)]) / math.log(2)  # (n_chunks,)
        return out


def paired_bpb_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], evalset: EvalSet) -> dict[str, float]:
    """Bits/byte of ``a`` minus ``b`` (mean over sources, as :meth:`EvalSet.evaluate`) with its standard error
    from the per-chunk differences on the same text (a paired estimate: the text's own difficulty cancels)::

        diff_s = sum_c (a_c - b_c) / bytes_s         se_s = sqrt(n_c var_c(a_c - b_c)) / bytes_s
        diff   = mean_s diff_s                       se   = sqrt(sum_s se_s^2) / n_sources
    """
    diffs, ses = [], []
    for name, (_, n_bytes) in evalset.streams.items():
        d = a[name] - b[name]  # (n_chunks,)
        diffs.append(d.sum() / n_bytes)
        ses.append(math.sqrt(d.size * d.var(ddof=1)) / n_bytes if d.size > 1 else 0.0)
    return {"diff": float(np.mean(diffs)), "se": float(math.sqrt(sum(s * s for s in ses)) / len(ses))}


# ----------------------------------------------------------------------------------------------------------
# RTN


def _group_view(W: Any, group_size: int) -> tuple[Any, int]:
    m, n = W.shape
    g = n if group_size <= 0 else group_size
    if n % g:
        raise LmlabError(f"group size {g} does not divide the input dimension {n}")
    return W.reshape(m, n // g, g), g  # (m, G, g)


def rtn_params(w: Any, bits: int) -> tuple[Any, Any]:
    """Asymmetric ``(scale, zero)`` over the last dim of ``w (..., g)`` -> shapes ``(..., 1)``."""
    import torch

    qmax = 2**bits - 1
    lo = torch.minimum(w.amin(-1, keepdim=True), torch.zeros(()))  # the range always holds 0 (GPTQ quantizer)
    hi = torch.maximum(w.amax(-1, keepdim=True), torch.zeros(()))
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    return scale, zero


def rtn_apply(w: Any, scale: Any, zero: Any, bits: int) -> Any:
    import torch

    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def rtn_quantize(W: Any, bits: int, group_size: int = 128) -> Any:
    """Round-to-nearest fake quantisation of ``W (m, n)``: per ``group_size`` input columns (0: per row)."""
    if not 1 <= bits <= 16:
        raise LmlabError(f"bits must be in 1..16, got {bits}")
    Wf = W.float()
    Wg, _ = _group_view(Wf, group_size)  # (m, G, g)
    scale, zero = rtn_params(Wg, bits)
    return rtn_apply(Wg, scale, zero, bits).reshape(W.shape).to(W.dtype)


def quant_bits_per_param(bits: int, group_size: int, n_in: int) -> float:
    """``b + (16 + b) / g``: b-bit codes + an fp16 scale and a b-bit zero per group (``g = n_in`` per row)."""
    g = n_in if group_size <= 0 else group_size
    return bits + (16 + bits) / g


def quant_bytes(shape: tuple[int, int], bits: int, group_size: int) -> float:
    m, n = shape
    return m * n * quant_bits_per_param(bits, group_size, n) / 8


# ----------------------------------------------------------------------------------------------------------
# GPTQ


def gptq_quantize(W: Any, H: Any, bits: int, group_size: int = 128, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False) -> Any:
    """GPTQ fake quantisation of ``W (m, n)`` given the layer Hessian ``H (n, n) = 2/N X X^T``.

    Follows the reference implementation (``gptq.py:fasterquant``): dead inputs zeroed, damping
    ``percdamp * mean(diag H)``, upper Cholesky factor of ``H^-1``, lazy block updates of ``blocksize`` columns,
    group parameters found at each group start on the error-updated weights."""
    import torch

    if not 1 <= bits <= 16:
        raise LmlabError(f"bits must be in 1..16, got {bits}")
    W = W.detach().clone().float()  # (m, n)
    m, n = W.shape
    H = H.detach().clone().double()  # (n, n); float64 keeps the Cholesky stable on tiny models
    g = n if group_size <= 0 else group_size
    if n % g:
        raise LmlabError(f"group size {g} does not divide the input dimension {n}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # (n, n)
    except RuntimeError as e:
        raise LmlabError(f"GPTQ: Hessian is not positive definite ({e}); raise percdamp") from None
    Q = torch.zeros_like(W)
    scale = zero = None
    if group_size <= 0:
        scale, zero = rtn_params(W, bits)  # (m, 1): per row, from the whole row
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()  # (m, c)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size > 0 and col % g == 0:
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]  # error-updated weights of this group
                scale, zero = rtn_params(cur, bits)
            w = W1[:, i:i + 1]  # (m, 1)
            q = rtn_apply(w, scale, zero, bits)
            Q1[:, i:i + 1] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


def _decoder_groups(linears: dict[str, Any]) -> list[list[str]]:
    """Linears grouped by decoder layer (the prefix before the first ``.<int>.``... up to that index), in order."""
    groups: dict[str, list[str]] = {}
    for name in linears:
        m = re.match(r"(.*?\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return list(groups.values())


def gptq_model(model: Any, linears: dict[str, Any], calib: Any, bits: int, group_size: int,
               percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False, batch_size: int = 8,
               progress: bool = True) -> None:
    """Quantise ``linears`` of ``model`` in place with GPTQ, decoder layer by decoder layer (sequential)."""
    import torch

    groups = _decoder_groups(linears)
    it: Any = groups
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(groups, desc="gptq", unit="layer")
    dev = next(model.parameters()).device
    for names in it:
        H = {n: torch.zeros(linears[n].in_features, linears[n].in_features, dtype=torch.float64) for n in names}
        count = {n: 0 for n in names}

        def make_hook(name: str, H: dict = H, count: dict = count) -> Callable:
            def hook(_mod: Any, args: tuple) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()  # (N, n)
                k = x.shape[0]
                H[name] *= count[name] / (count[name] + k)
                count[name] += k
                H[name] += (2.0 / count[name]) * x.T @ x
            return hook

        handles = [linears[n].register_forward_pre_hook(make_hook(n)) for n in names]
        try:
            with torch.no_grad():
                for s in range(0, calib.shape[0], batch_size):
                    model(input_ids=calib[s:s + batch_size].to(dev))
        finally:
            for h in handles:
                h.remove()
        for n in names:
            lin = linears[n]
            q = gptq_quantize(lin.weight.data, H[n], bits, group_size, blocksize, percdamp, act_order)
            lin.weight.data.copy_(q.to(lin.weight.dtype))


def rtn_model(linears: dict[str, Any], bits: int, group_size: int) -> None:
    """RTN-quantise ``linears`` in place."""
    import torch

    with torch.no_grad():
        for lin in linears.values():
            lin.weight.data.copy_(rtn_quantize(lin.weight.data, bits, group_size))


METHODS = {"rtn": "round-to-nearest, data-free", "gptq": "GPTQ with calibration text"}


# ----------------------------------------------------------------------------------------------------------
# `lmlab compress quant`


@dataclass
class QuantConfig(RunArgs):
    """Quantise a model's linears with RTN or GPTQ (fake quantisation) and measure bytes and bits/byte."""

    model: str = "ref:dense"
    """Model spec (ref:NAME, HF name or path)."""
    method: str = "rtn"
    """rtn | gptq."""
    bits: list[int] = field(default_factory=lambda: [4])
    """Bit widths to run (comma-separated: one result per value)."""
    group_size: int = 128
    """Input columns per quantisation group (0: one group per row); clipped to the input size."""
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES))
    """Names of the linears to quantise (last name component)."""
    calib: str = "code,prose,math"
    """GPTQ calibration text: built-in domains (train split) or a text/jsonl/parquet path."""
    calib_samples: int = 32
    """GPTQ calibration windows."""
    seqlen: int = 256
    """Tokens per calibration window."""
    percdamp: float = 0.01
    """GPTQ damping (fraction of the mean Hessian diagonal)."""
    act_order: bool = False
    """GPTQ: quantise columns in order of decreasing Hessian diagonal."""
    eval_data: str = "code,prose,math"
    """Held-out text: built-in domains (validation split) or a path."""
    max_tokens: int = 4096
    """Tokens scored per evaluation source."""
    save: str | None = None
    """Save the (dequantised) model of the last bit width as a HF folder here."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if not self.bits or any(not 1 <= b <= 16 for b in self.bits):
            raise ConfigError(f"bits must be in 1..16, got {self.bits}")
        if self.group_size < 0 or self.calib_samples < 1 or self.seqlen < 2 or self.max_tokens < 2:
            raise ConfigError("need group_size >= 0, calib_samples >= 1, seqlen >= 2, max_tokens >= 2")


def effective_group(group_size: int, n_in: int) -> int:
    """The group size used for a linear with ``n_in`` inputs (per-row when the group does not fit)."""
    return 0 if group_size <= 0 or group_size >= n_in or n_in % group_size else group_size


def quantize_copy(model: Any, modules: list[str], method: str, bits: int, group_size: int,
                  calib: Any = None, percdamp: float = 0.01, act_order: bool = False) -> tuple[Any, dict]:
    """A quantised deep copy of ``model`` and its byte accounting ``{linear_bytes, extra_bytes, total_bytes,
    bits_per_param}`` (linears at ``b + (16+b)/g`` bits, everything else fp16)."""
    import copy

    q = copy.deepcopy(model)
    lins = find_linears(q, modules)
    total_lin = 0.0
    params = 0
    for lin in lins.values():
        g = effective_group(group_size, lin.in_features)
        total_lin += quant_bytes(tuple(lin.weight.shape), bits, g)
        params += lin.weight.numel()
    if method == "rtn":
        for lin in lins.values():
            lin.weight.data.copy_(rtn_quantize(lin.weight.data, bits, effective_group(group_size, lin.in_features)))
    else:
        if calib is None:
            raise LmlabError("GPTQ needs calibration windows")
        sizes = {effective_group(group_size, lin.in_features) for lin in lins.values()}
        by_group: dict[int, dict[str, Any]] = {g: {} for g in sizes}
        for n, lin in lins.items():
            by_group[effective_group(group_size, lin.in_features)][n] = lin
        for g, sub in by_group.items():  # usually one group size
            gptq_model(q, sub, calib, bits, g, percdamp=percdamp, act_order=act_order, progress=False)
    extra = extra_bytes(q, lins)
    acct = {"linear_bytes": int(math.ceil(total_lin)), "extra_bytes": extra,
            "total_bytes": int(math.ceil(total_lin)) + extra, "bits_per_param": total_lin * 8 / params}
    return q, acct


def main(cfg: QuantConfig) -> Path:
    from lmlab.core.models import load
    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    model, tok = load(cfg.model, dev, dtype, cfg.trust_remote_code)
    lins = find_linears(model, cfg.modules)  # errors before the run dir exists
    evalset = EvalSet.build(tok, cfg.eval_data, cfg.max_tokens)
    calib = None
    if cfg.method == "gptq":
        calib = token_windows(tok, texts_for(cfg.calib, "train"), cfg.calib_samples, cfg.seqlen, cfg.seed)
    with start_run(cfg, "compress-quant", device=dev, dtype=dtype, threads=threads) as run:
        base = evalset.evaluate(model)
        fp16_bytes = extra_bytes(model, {}) if lins else 0
        results: dict[str, Any] = {"model": cfg.model, "method": cfg.method, "fp16_bytes": fp16_bytes,
                                   "fp": base, "runs": []}
        q = None
        for b in cfg.bits:
            q, acct = quantize_copy(model, cfg.modules, cfg.method, b, cfg.group_size, calib, cfg.percdamp,
                                    cfg.act_order)
            ev = evalset.evaluate(q)
            row = {"bits": b, "group_size": cfg.group_size, **acct, "bpb": ev["bpb"], "ppl": ev["ppl"],
                   "domains": ev["domains"]}
            results["runs"].append(row)
            run.log({k: v for k, v in row.items() if k != "domains"})
            log.info("%s w%d g%d: %s, %.3f bits/param, %.4f bits/byte (fp %.4f)", cfg.method, b, cfg.group_size,
                     fmt_bytes(acct["total_bytes"]), acct["bits_per_param"], ev["bpb"], base["bpb"])
        if cfg.save and q is not None:
            q.save_pretrained(cfg.save)
            tok.save_pretrained(cfg.save)
        line_plot(run.plots / "quality_vs_bytes.png", [r["total_bytes"] for r in results["runs"]],
                  {cfg.method: [r["bpb"] for r in results["runs"]]}, title=f"{cfg.model}: {cfg.method}",
                  xlabel="weight bytes", ylabel="bits/byte")
        run.finish(results)
    return run.path
