"""Data-free Joint Rank-k Approximation (JRA): SVD compression of linears that share an input, no data.

"Data-free Weight Compress and Denoise for Large Language Models", Runyu Peng, Yunhua Zhou, Qipeng Guo, Yang Gao,
Hang Yan, Xipeng Qiu, Dahua Lin (arXiv 2402.16319). No public code exists; this is the form consistent with the
paper's description (joint compression of matrices reading the same input, no calibration corpus, orthogonal to
pruning and quantisation):

For a group G of linears sharing the input x (``{q,k}``, ``{q,k,v}``, ``{gate,up}``) stack the rows::

    W_G = [W_1; ...; W_c]                      (sum d_i, d_in)
    W_G = U Sigma V^T,  keep k:   B = V_k^T     (k, d_in)      shared
                                  A_i = W_i V_k (d_i, k)       per matrix
    y_i = A_i (B x)                            B x is computed once per group

which is Eckart-Young on the stacked matrix (the best rank-k approximation of W_G in Frobenius norm). For a keep
ratio rho of the group's parameters::

    k = floor(rho * d_in * sum d_i / (d_in + sum d_i))

``separate`` compresses each matrix alone (``k_i = floor(rho d_in d_i / (d_in + d_i))``) for the comparison at a
matched parameter count: the paper reports pruning rates (fractions of parameters removed), so joint, whose shared
``B`` is stored once, keeps a larger rank at the same parameters (d = 192, {q,k,v}, rho = 0.4: joint k = 57,
separate k = 38 per matrix, 175,104 parameters either way). Joint is the Eckart-Young optimum of the stacked
matrix at a fixed *rank*, not at a fixed parameter count: it wins only when the members share their dominant
input directions. Measured on ref:dense, {gate,up} share them (joint lower weight error and bits/byte at every
rho) while {q,k,v} do not: at rho = 0.4 joint has the larger total error (0.1240 vs 0.1228 of ||W||^2), trading
lower q/k error for a higher v error (0.082 vs 0.075), and 0.0052 +/- 0.0014 more bits/byte
(``benchmarks/compress.py --part jra``). The paper's groups, as far as its summaries say, are {q,k} and
{gate,up}; {q,k,v} is the issue's extension.

Composition: round-to-nearest quantisation of A and B (data-free, ``rtn_bits``) and unstructured magnitude pruning
of A and B (``prune``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.compress.quant import (
    EvalSet,
    effective_group,
    extra_bytes,
    find_linears,
    fmt_bytes,
    quant_bits_per_param,
    rtn_quantize,
)
from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

GROUPS = {
    "qk": ["q_proj", "k_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj"],
    "gate_up": ["gate_proj", "up_proj"],
    "o": ["o_proj"],
    "down": ["down_proj"],
}
"""Named groups of linears sharing one input (Llama names). A custom group is ``a+b+c`` of last name parts."""

MODES = ("joint", "separate")


# ----------------------------------------------------------------------------------------------------------
# maths


def rank_for_keep(rho: float, d_in: int, d_outs: list[int]) -> int:
    """``k = floor(rho * d_in * sum d_i / (d_in + sum d_i))`` (at least 1)."""
    s = sum(d_outs)
    return max(1, math.floor(rho * d_in * s / (d_in + s)))


def joint_rank_k(Ws: list[torch.Tensor], k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Joint rank-k factors of matrices sharing an input: ``(A_i (d_i, k) list, B (k, d_in))``."""
    W = torch.cat([w.float() for w in Ws], dim=0)  # (sum d_i, d_in)
    _, _, Vh = torch.linalg.svd(W, full_matrices=False)  # Vh (r, d_in)
    B = Vh[:k]  # (k, d_in)
    As = [w.float() @ B.T for w in Ws]  # (d_i, k)
    return As, B


def magnitude_prune(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of entries with the smallest magnitude."""
    if sparsity <= 0:
        return t
    n = int(round(sparsity * t.numel()))
    if n == 0:
        return t
    thresh = t.abs().reshape(-1).kthvalue(n).values
    return torch.where(t.abs() > thresh, t, torch.zeros_like(t))


# ----------------------------------------------------------------------------------------------------------
# modules


class SharedProjection(nn.Module):
    """``B x`` for a group, computed once per input tensor and reused by every member."""

    def __init__(self, B: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(B.detach().clone(), requires_grad=False)  # (k, d_in)
        self._x: torch.Tensor | None = None  # the last input (held, so its memory cannot be reused)
        self._version = -1
        self._out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., k)
        if x is not self._x or x._version != self._version or self._out is None or torch.is_grad_enabled():
            self._out = F.linear(x, self.weight.to(x.dtype))
            self._x, self._version = x, x._version
        return self._out


class LowRankLinear(nn.Module):
    """``y = A (B x) (+ bias)`` with ``B`` a (possibly shared) :class:`SharedProjection`."""

    def __init__(self, A: torch.Tensor, proj: SharedProjection, bias: torch.Tensor | None):
        super().__init__()
        self.A = nn.Parameter(A.detach().clone(), requires_grad=False)  # (d_out, k)
        self.proj = proj
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = proj.weight.shape[1], A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        return F.linear(self.proj(x), self.A.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def resolve_groups(model: nn.Module, groups: list[str]) -> list[list[str]]:
    """Qualified linear names per group instance (one per decoder layer), e.g. [[l0.q, l0.k, l0.v], ...]."""
    out: list[list[str]] = []
    for g in groups:
        members = GROUPS.get(g) or g.split("+")
        lins = find_linears(model, members)
        by_parent: dict[str, dict[str, str]] = {}
        for name in lins:
            parent = re.sub(r"\.[^.]+\.[^.]+$", "", name)  # the decoder layer
            by_parent.setdefault(parent, {})[name.rsplit(".", 1)[-1]] = name
        for parent, d in by_parent.items():
            miss = [m for m in members if m not in d]
            if miss:
                raise LmlabError(f"group {g!r}: {parent} lacks {miss}")
            out.append([d[m] for m in members])
    return out


def compress_model(model: nn.Module, groups: list[str], keep: float, mode: str = "joint", rtn_bits: int = 0,
                   rtn_group: int = 128, prune: float = 0.0) -> dict[str, Any]:
    """Replace the grouped linears of ``model`` in place by rank-k factors. Returns the accounting
    ``{params_before, params_after, bytes_before, bytes_after (fp16 or RTN bits), ranks}``."""
    if mode not in MODES:
        raise LmlabError(f"mode must be one of {MODES}, got {mode!r}")
    insts = resolve_groups(model, groups)
    before = after = 0
    bits_after = 0.0
    ranks = []
    for names in insts:
        lins = [model.get_submodule(n) for n in names]
        Ws = [lin.weight.detach() for lin in lins]  # (d_i, d_in)
        d_in = Ws[0].shape[1]
        if any(w.shape[1] != d_in for w in Ws):
            raise LmlabError(f"group {names} does not share one input size")
        before += sum(w.numel() for w in Ws)
        parts = [list(range(len(Ws)))] if mode == "joint" else [[i] for i in range(len(Ws))]
        for part in parts:
            sub = [Ws[i] for i in part]
            k = min(rank_for_keep(keep, d_in, [w.shape[0] for w in sub]), d_in, sum(w.shape[0] for w in sub))
            As, B = joint_rank_k(sub, k)
            if prune > 0:
                As, B = [magnitude_prune(a, prune) for a in As], magnitude_prune(B, prune)
            if rtn_bits:
                B = rtn_quantize(B, rtn_bits, effective_group(rtn_group, B.shape[1]))
                As = [rtn_quantize(a, rtn_bits, effective_group(rtn_group, a.shape[1])) for a in As]
            proj = SharedProjection(B.to(Ws[0].dtype))
            n_par = B.numel() + sum(a.numel() for a in As)
            after += n_par
            for t in [B, *As]:
                kept = t.numel() * (1 - prune)
                bits_after += kept * (quant_bits_per_param(rtn_bits, effective_group(rtn_group, t.shape[1]),
                                                           t.shape[1]) if rtn_bits else 16)
            ranks.append(k)
            for i, a in zip(part, As):
                lin = lins[i]
                bias = lin.bias.detach() if lin.bias is not None else None
                _set_module(model, names[i], LowRankLinear(a.to(Ws[0].dtype), proj, bias))
    return {"params_before": before, "params_after": after, "bytes_before": before * 2,
            "bytes_after": int(math.ceil(bits_after / 8)), "ranks": ranks}


# ----------------------------------------------------------------------------------------------------------
# `lmlab compress rankk`


@dataclass
class RankKConfig(RunArgs):
    """Data-free joint rank-k compression of linears sharing an input; evaluate bits/byte vs bytes."""

    model: str = "ref:dense"
    """Model spec (ref:NAME, HF name or path)."""
    groups: list[str] = field(default_factory=lambda: ["qkv", "gate_up"])
    """Groups to compress: qk | qkv | gate_up | o | down | a+b (last name parts sharing an input)."""
    keep: list[float] = field(default_factory=lambda: [0.8, 0.6, 0.4, 0.25])
    """Kept fraction of each group's parameters (one result per value)."""
    modes: list[str] = field(default_factory=lambda: ["joint", "separate"])
    """joint (shared B per group) and/or separate (each matrix alone, same parameter count)."""
    rtn_bits: int = 0
    """Also quantise A and B with RTN at this many bits (0: keep fp16)."""
    rtn_group: int = 128
    """RTN group size for A and B."""
    prune: float = 0.0
    """Also magnitude-prune this fraction of A's and B's entries."""
    eval_data: str = "code,prose,math"
    """Held-out text: built-in domains (validation split) or a path."""
    max_tokens: int = 4096
    """Tokens scored per evaluation source."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.keep or any(not 0 < k <= 1 for k in self.keep):
            raise ConfigError(f"keep ratios must be in (0, 1], got {self.keep}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"modes must be from {list(MODES)}, got {self.modes}")
        if not 0 <= self.rtn_bits <= 16 or not 0 <= self.prune < 1:
            raise ConfigError("need 0 <= rtn_bits <= 16 and 0 <= prune < 1")
        if not self.groups:
            raise ConfigError("give at least one group")


def main(cfg: RankKConfig) -> Path:
    import copy

    from lmlab.core.models import load
    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    model, tok = load(cfg.model, dev, dtype, cfg.trust_remote_code)
    resolve_groups(model, cfg.groups)  # bad groups fail before the run dir
    evalset = EvalSet.build(tok, cfg.eval_data, cfg.max_tokens)
    with start_run(cfg, "compress-rankk", device=dev, dtype=dtype, threads=threads) as run:
        base = evalset.evaluate(model)
        rows = []
        for mode in cfg.modes:
            for keep in cfg.keep:
                m = copy.deepcopy(model)
                acct = compress_model(m, cfg.groups, keep, mode, cfg.rtn_bits, cfg.rtn_group, cfg.prune)
                total = acct["bytes_after"] + extra_bytes(m, {}) - sum(
                    p.numel() * 2 for n, p in m.named_parameters() if n.endswith((".A", ".proj.weight")))
                ev = evalset.evaluate(m)
                row = {"mode": mode, "keep": keep, **{k: v for k, v in acct.items() if k != "ranks"},
                       "ranks": sorted(set(acct["ranks"])), "total_bytes": total, "bpb": ev["bpb"],
                       "ppl": ev["ppl"], "domains": ev["domains"]}
                rows.append(row)
                run.log({k: v for k, v in row.items() if k != "domains"})
                log.info("%s keep %.2f: %s, %.4f bits/byte (fp %.4f)", mode, keep, fmt_bytes(total), ev["bpb"],
                         base["bpb"])
        line_plot(run.plots / "rankk.png", {mo: [r["keep"] for r in rows if r["mode"] == mo] for mo in cfg.modes},
                  {mo: [r["bpb"] for r in rows if r["mode"] == mo] for mo in cfg.modes},
                  title=f"{cfg.model}: rank-k {'+'.join(cfg.groups)}", xlabel="kept fraction", ylabel="bits/byte")
        run.finish({"model": cfg.model, "groups": cfg.groups, "fp": base, "runs": rows})
    return run.path
