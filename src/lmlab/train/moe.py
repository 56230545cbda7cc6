"""Top-k Mixture-of-Experts with the Rectify-Router and expert parallelism (``lmlab train moe``).

Paper: **Turn Waste into Worth: Rectifying Top-k Router of MoE**, Zeng et al., arXiv 2402.12399 (EMNLP 2024).
Authors' code: github.com/ZhiYuanZeng/gpt-moe (``megatron/model/moe/moefication.py::LocalPostMoELayer``).

Capacity-based top-k routing (GShard / Switch / DeepSpeed ``sharded_moe``)
--------------------------------------------------------------------------
W ranks each hold S tokens and E/W experts; the router ``W_g`` is replicated. Per MoE layer and rank::

    p      = softmax(x W_g)                       # (S, E), fp32
    idx    = top-k(p)                             # (S, k) expert of each choice, choice 0 = best
    C      = ceil(capacity_factor * S * k / E)    # slots per expert per source rank (min_capacity, <= S)
    slot   = cumsum over tokens of one_hot(idx_j) - 1 + sum_{i<j} count_i   # choice j queues after choices < j
    keep   = slot < C                             # the rest is DROPPED (skips that expert)

The dispatch buffer has the static shape (E, C, d) (GEMMs and ``all_to_all_single`` need it); slots no token
took are PADDING (zero rows that still cost FLOPs and bandwidth). The buffer goes to the experts' owners with an
all-to-all, each rank runs its E/W experts on (E/W, W*C, d), a second all-to-all brings the outputs back and
``y = sum_j w_j E_{idx_j}(x)`` over kept choices. Load balance (Switch / DeepSpeed)::

    L_aux = E * sum_e me_e * ce_e   me = mean_s p[s, e],  ce = fraction of tokens whose FIRST choice is e
    L_z   = mean_s logsumexp(x W_g)^2                                  (router z-loss, ST-MoE)

Combine weights follow the authors' code: top-1 uses the straight-through gate ``w = p - sg(p) + 1`` (forward
weight 1, so an upcycled model equals its dense parent); top-k >= 2 and every Fill-in gate renormalise over the
kept choices with a DETACHED denominator ``w_j = p_j / sg(sum_{kept} p)``.

Intra-GPU Rectification (IR)
----------------------------
A dropped token still sits on its source rank, next to that rank's E/W experts. A token is *unrouted* when
fewer than k of its choices were kept (``unrouted="any"``) or none were (``"all"``; the same thing for top-1).
It is sent to the LOCAL expert h with the highest routing probability (softmax over all E experts, restricted to
the local columns), with no capacity limit and no communication. With ``m = k - n_kept`` missing choices and
``topk_norm = sg(sum_{kept} p)``::

    y = (E_h(x) p_h m + topk_norm * y_topk) / max(topk_norm + sg(p_h m), eps)

Gradient reaches the router through ``p_h`` in the numerator only. A dropped top-1 token gets exactly E_h(x).

Fill-in Rectification (FR)
--------------------------
Padding slots are filled with the tokens that have the highest routing scores for that expert. FILLERS queue
after ALL top-k choices, so they only land in slots that would have been padding (C stays top-k's):

    vac_e   = max(0, C - #top-k assignments to e)                      # vacant slots of expert e
    cand_e  = {s : e not in top-k(s)}                                  # tokens not yet assigned to e
    fill_e  = the vac_e best of cand_e by p[s, e]                      # (fill_from="all", default)

so an expert keeps padding only when fewer than C tokens of the group exist for it. ``fill_from="next"`` is the
authors' config-level approximation: top-(k+1) routing with the capacity factor scaled by k/(k+1), where only a
token's (k+1)-th choice may fill; experts that few tokens rank (k+1)-th stay padded (measured: 4.7% / 8.2% of
slots for top-1 / top-2 at cf 1.0 after training, vs 0 with ``all``). Among fillers of one expert the highest own
score goes first (``filler_priority="own"``, the paper's description), the highest top-1 score (``"top1"``, the
repository's ``top2gating_shift_priority``) or position. A token may fill several experts; all its kept weights
renormalise with a detached denominator. With IR, a token is unrouted when fewer than k of its kept choices
(fillers included) exist (the authors' ``ignore_kth``). Identity (tested): top-(k+1) at factor ``cf*k/(k+1)``
places the first k choices exactly as top-k at ``cf``.

Defaults (paper configs): capacity factor 1.0 (train = eval), min capacity 0, aux weight 0.01, z-loss 0,
position-ordered queues (``bpr=False``; ``bpr=True`` sorts by the top-1 score, Tutel/fairseq).

Expert parallelism
------------------
``MoELayer`` simulates W groups in one process (``groups=W``: the flattened batch is cut into W contiguous
groups, each with its own capacity, and group w's "local" experts are ``[w*E/W, (w+1)*E/W)``) or, after
:func:`lmlab.train.moe_parallel.shard_model`, runs real expert parallelism over ``torch.distributed``
(all-to-all; gloo on CPU, NCCL on GPU) with identical maths, which a test checks to 1e-5.
``dropless=True`` sizes the buffer to the largest expert load (DeepSpeed ``drop_tokens=False``; all-reduce MAX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ConfigError, RunArgs
from lmlab.core.pretrain import OptimConfig

log = logging.getLogger(__name__)

RECTIFICATIONS = ("intra-gpu", "fill-in")
"""Rectifications of the ``rectify`` router (``--rectify intra-gpu,fill-in``)."""
UNROUTED = ("any", "all")
FILLER_PRIORITY = ("own", "top1", "position")
FILL_FROM = ("all", "next")
EPS = 1e-9


# ====================================================================================================
# the maths: pure functions


def capacity(tokens: int, experts: int, k: int, capacity_factor: float, min_capacity: int = 0) -> int:
    """Slots per expert per source group, ``ceil(cf * S * k / E)`` clamped to ``[min_capacity, S]``.

    An expert can receive at most S tokens from a group (a token picks an expert once), so ``cf = inf`` means
    "never drop" without allocating more than S slots (DeepSpeed PR #8155 clamps the same way).
    """
    if tokens <= 0:
        return 0
    c = tokens if math.isinf(capacity_factor) else math.ceil(capacity_factor * tokens * k / experts)
    return int(min(tokens, max(c, min_capacity, 1)))


class Routing(NamedTuple):
    """Routing of W groups of S tokens; K = k (+1 with Fill-in) choices per token, choice 0 the best."""

    probs: torch.Tensor  # (W, S, E) softmax of the router logits, fp32
    gate: torch.Tensor  # (W, S, K) probability of each choice
    idx: torch.Tensor  # (W, S, K) expert of each choice
    slot: torch.Tensor  # (W, S, K) queue position in that expert's buffer (before the capacity cut)
    keep: torch.Tensor  # (W, S, K) bool: the choice got a slot
    counts: torch.Tensor  # (W, K, E) assignments per choice and expert (before the cut)


def _queue(mask: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor:
    """0-based position of each token in its expert's queue: ``cumsum - 1`` over tokens in ``key`` order.

    mask (W, S, E) one-hot (0 rows for masked tokens); key (W, S) priority (higher first) or None (position).
    Returns (W, S) positions (garbage for masked tokens).
    """
    if key is None:
        loc = mask.cumsum(1) - 1  # (W, S, E)
    else:
        order = torch.argsort(-key, dim=1, stable=True)  # (W, S)
        m_sorted = mask.gather(1, order[..., None].expand_as(mask))
        loc = torch.empty_like(mask).scatter_(1, order[..., None].expand_as(mask), m_sorted.cumsum(1) - 1)
    return (loc * mask).sum(-1)  # (W, S)


def expert_counts(idx: torch.Tensor, weight: torch.Tensor, E: int) -> torch.Tensor:
    """Assignments per choice and expert without a one-hot: idx (W, S, K), weight (W, S) or (W, S, K) -> (W, K, E)."""
    W, S, K = idx.shape
    wt = (weight[..., None] if weight.dim() == 2 else weight).expand(W, S, K).to(torch.long)
    return torch.zeros(W, K, E, dtype=torch.long, device=idx.device).scatter_add_(2, idx.transpose(1, 2),
                                                                               wt.transpose(1, 2))


def order_keys(score: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """int64 keys that order like ``score`` (float) descending, ties broken by position along ``dim``, earlier first.

    The float32 bits are mapped to an order-preserving int32 (negatives' magnitude bits flipped) and shifted above a
    32-bit position term, so every key is unique: a descending sort or top-k over them reproduces
    ``argsort(score, descending=True, stable=True)`` exactly, in any algorithm.
    """
    b = score.float().contiguous().view(torch.int32).long()
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)  # IEEE-754 -> monotone integer
    n = score.shape[dim]
    shape = [1] * score.dim()
    shape[dim] = n
    pos = (n - 1 - torch.arange(n, device=score.device)).view(shape)  # earlier position = larger key
    return (b << 32) | pos


def fill_all_ranks(probs: torch.Tensor, first: torch.Tensor, valid: torch.Tensor, key: str,
                   limit: int | None = None) -> torch.Tensor:
    """Queue position of every (token, expert) pair among that expert's FILLER candidates.

    probs (W, S, E); first (W, S, k) the top-k experts (not candidates for themselves); valid (W, S). A candidate
    of expert e is every valid token that did not choose e in its top-k; candidates are ranked by their own
    score p[s, e] (``own``), their top-1 score (``top1``) or position, ties by position. Returns (W, S, E) 0-based
    ranks (non-candidates rank after all candidates). ``limit``: only the best ``limit`` tokens per expert are ranked
    (a top-k instead of a sort over S; the rest get rank S), enough when ranks >= limit cannot get a slot.
    """
    W, S, E = probs.shape
    cand = valid[..., None].expand(W, S, E).clone()
    cand.scatter_(2, first, False)  # (W, S, E)
    if key == "own":
        score = probs.detach()
    elif key == "top1":
        score = probs.detach().max(-1, keepdim=True).values.expand(W, S, E)
    else:  # position: earlier first
        score = -torch.arange(S, device=probs.device, dtype=probs.dtype)[None, :, None].expand(W, S, E)
    score = torch.where(cand, score, torch.full_like(score, -math.inf))
    keys = order_keys(score, dim=1)  # (W, S, E) unique per column
    L = S if limit is None else max(0, min(int(limit), S))
    if 4 * L <= S:  # few slots to fill: top-L beats a full sort
        order = torch.topk(keys, L, dim=1).indices  # (W, L, E) best first
    else:
        order = torch.argsort(keys, dim=1, descending=True)[:, :L]  # (W, L, E)
    ranks = torch.full((W, S, E), S, dtype=torch.long, device=probs.device)
    ranks.scatter_(1, order, torch.arange(L, device=probs.device)[None, :, None].expand(W, L, E))
    return ranks  # (W, S, E)


def route(logits: torch.Tensor, k: int, cap: int, *, fill_in: bool = False, fill_from: str = "all",
          bpr: bool = False, filler_priority: str = "own", valid: torch.Tensor | None = None) -> Routing:
    """Capacity-based top-k routing (+ Fill-in choices) for W groups: logits (W, S, E) -> :class:`Routing`.

    Choice j's slot is its queue position among choice-j tokens plus the count of all choices < j for that
    expert (DeepSpeed ``locations2 += sum(mask1)``), so later choices only take slots earlier ones left free.
    Fill-in (``fill_in``) queues FILLERS after all top-k choices, so they can only take vacant slots:

    * ``fill_from="all"`` (the paper's rule): every token of the group that did not pick expert e in its top-k is
      a filler candidate of e, best ``filler_priority`` first; every vacancy is filled while candidates remain.
      Choices k..E-1 of the returned routing are these fillers (K = E), in expert order.
    * ``fill_from="next"`` (the authors' configs, top-(k+1) at cf*k/(k+1)): only each token's (k+1)-th choice
      may fill (K = k+1); vacancies of experts that few tokens rank (k+1)-th stay padded.
    """
    W, S, E = logits.shape
    if not 1 <= k <= E or (fill_in and k + 1 > E):
        raise ConfigError(f"top-k={k}{' (+1 fill-in)' if fill_in else ''} needs at least that many experts, got {E}")
    if fill_from not in FILL_FROM:
        raise ConfigError(f"fill_from must be one of {list(FILL_FROM)}, got {fill_from!r}")
    fill_all = fill_in and fill_from == "all"
    K = E if fill_all else k + int(fill_in)
    probs = torch.softmax(logits.float(), dim=-1)  # (W, S, E)
    if fill_all:  # top-k best first, then every other expert in index order (no need to sort all E)
        gate, idx = probs.topk(k, dim=-1)  # (W, S, k)
        rest = torch.ones(W, S, E, dtype=torch.bool, device=logits.device).scatter_(2, idx, False)
        others = torch.arange(E, device=logits.device).expand(W, S, E)[rest].view(W, S, E - k)  # (W, S, E-k)
        gate, idx = torch.cat([gate, probs.gather(2, others)], -1), torch.cat([idx, others], -1)  # (W, S, E)
    else:
        gate, idx = probs.topk(K, dim=-1)  # (W, S, K) choices best first
    if valid is None:
        valid = torch.ones(W, S, dtype=torch.bool, device=logits.device)
    counts = expert_counts(idx, valid, E)  # (W, K, E)
    n_queued = k if fill_all else K  # choices routed by queue position; fill-all fillers are ranked per expert
    offset = counts[:, :n_queued].cumsum(1) - counts[:, :n_queued]  # (W, K', E) assignments of earlier choices
    slots = []
    for j in range(n_queued):
        if fill_in and j == k:  # fillers: own score (paper), top-1 score (repository) or position first
            key = {"own": gate[..., j], "top1": gate[..., 0], "position": None}[filler_priority]
        else:
            key = gate[..., 0] if bpr else None
        pos = _queue(F.one_hot(idx[:, :, j], E) * valid[..., None], key)  # (W, S)
        slots.append(pos + offset[:, j].gather(1, idx[:, :, j]))  # (W, S)
    if fill_all:
        ranks = fill_all_ranks(probs, idx[..., :k], valid, filler_priority, limit=cap)  # (W, S, E)
        base = counts[:, :k].sum(1)  # (W, E) all top-k assignments (before the cut) queue first
        fill_slot = ranks + base[:, None, :]  # (W, S, E)
        slot = torch.cat([torch.stack(slots, -1), fill_slot.gather(2, idx[..., k:])], -1)  # (W, S, E)
    else:
        slot = torch.stack(slots, -1)  # (W, S, K)
    keep = (slot < cap) & valid[..., None]
    return Routing(probs, gate, idx, slot, keep, counts)


def aux_loss(probs: torch.Tensor, first: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/GShard load balance ``E * sum_e mean(p_e) * frac(first choice = e)``, averaged over groups.

    probs (W, S, E); first (W, S) first-choice expert; valid (W, S) bool (padding tokens excluded).
    """
    W, S, E = probs.shape
    v = torch.ones(W, S, device=probs.device) if valid is None else valid.float()
    n = v.sum(1).clamp(min=1)  # (W,)
    me = (probs * v[..., None]).sum(1) / n[:, None]  # (W, E)
    ce = (F.one_hot(first, E).float() * v[..., None]).sum(1) / n[:, None]  # (W, E)
    return (E * (me * ce).sum(-1)).mean()


def z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss ``mean logsumexp(logits)^2`` (ST-MoE), logits (W, S, E)."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2  # (W, S)
    if valid is None:
        return z.mean()
    return (z * valid).sum() / valid.sum().clamp(min=1)


def combine_weights(r: Routing, k: int, straight_through: bool = True) -> torch.Tensor:
    """Weights (W, S, K) of the kept choices: top-1 straight-through ``p - sg(p) + 1``, else ``p / sg(sum kept p)``."""
    kept = r.gate * r.keep  # (W, S, K)
    if r.gate.shape[-1] == 1 and straight_through:
        return (r.gate - r.gate.detach() + 1.0) * r.keep
    return kept / kept.sum(-1, keepdim=True).detach().clamp(min=EPS)


def unrouted_tokens(keep: torch.Tensor, k: int, mode: str = "any") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens IR must rectify and their missing-choice count m.

    keep (W, S, K) -> (unrouted (W, S) bool, m (W, S) float). ``any``: fewer than k choices kept (with Fill-in
    the (k+1)-th counts, i.e. the authors' ``ignore_kth``); ``all``: none kept.
    """
    n = keep.sum(-1)  # (W, S)
    un = n < k if mode == "any" else n == 0
    m = (k - n).clamp(min=0).float() * un
    return un, m


def local_best(probs: torch.Tensor, lo: torch.Tensor, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best local expert per token: probs (W, S, E), lo (W,) first local expert of each group -> (h, p_h)."""
    W, S, E = probs.shape
    cols = lo[:, None] + torch.arange(n_local, device=probs.device)  # (W, El)
    local = probs.gather(2, cols[:, None, :].expand(W, S, n_local))  # (W, S, El)
    p_h, j = local.max(-1)  # (W, S)
    return j + lo[:, None], p_h


def swiglu_experts(buf: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on a dispatch buffer: buf (E, M, d), w_in (E, d, 2f), w_out (E, f, d) -> (E, M, d)."""
    gate, up = torch.bmm(buf, w_in).chunk(2, dim=-1)  # (E, M, f) each
    return torch.bmm(F.silu(gate) * up, w_out)  # (E, M, d)


def swiglu_rows(x: torch.Tensor, expert: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Each row through its own expert, no capacity: x (U, d), expert (U,) indices into w_in (E, d, 2f) /
    w_out (E, f, d) -> (U, d).

    One padded bmm over the experts present (rows grouped by expert, each group padded to the largest), with the
    weights gathered once, so the backward is one ``index_add`` per weight instead of a full-size zero gradient
    per expert. Intra-GPU Rectification runs its unrouted tokens through this.
    """
    U, d = x.shape
    uniq, grp, cnt = torch.unique(expert, return_inverse=True, return_counts=True)  # (G,), (U,), (G,)
    G, M = uniq.numel(), int(cnt.max())
    order = torch.argsort(grp, stable=True)  # (U,) rows grouped by expert
    start = cnt.cumsum(0) - cnt  # (G,) first sorted position of each group
    slot = torch.empty_like(order)
    slot[order] = torch.arange(U, device=x.device) - start[grp[order]]  # (U,) position inside its group
    row = grp * M + slot  # (U,) buffer row of each input row
    src = torch.full((G * M,), U, dtype=torch.long, device=x.device).index_put_((row,), torch.arange(
        U, device=x.device))  # buffer row -> input row (U = the appended zero row, padding)
    buf = torch.cat([x, x.new_zeros(1, d)]).index_select(0, src).view(G, M, d)
    y = swiglu_experts(buf, w_in.index_select(0, uniq).to(x.dtype), w_out.index_select(0, uniq).to(x.dtype))
    return y.reshape(G * M, d).index_select(0, row)  # (U, d)


class _AuxGrad(torch.autograd.Function):
    """Identity on ``out`` whose backward also seeds d(aux)=1: the router losses train through any loop that
    only back-propagates the LM loss (Megatron-core's ``MoEAuxLossAutoScaler``)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(aux)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


# ====================================================================================================
# the layer


@dataclass
class MoESettings:
    """Settings of one MoE layer (also stored in the HF config of :class:`LmlabMoeConfig`)."""

    experts: int = 8
    top_k: int = 1
    capacity_factor: float = 1.0
    rectify: tuple[str, ...] = ()
    dropless: bool = False
    groups: int = 1
    min_capacity: int = 0
    aux_weight: float = 0.01
    z_weight: float = 0.0
    straight_through: bool = True
    unrouted: str = "any"
    filler_priority: str = "own"
    fill_from: str = "all"
    bpr: bool = False

    def check(self) -> MoESettings:
        bad = [r for r in self.rectify if r not in RECTIFICATIONS]
        if bad:
            raise ConfigError(f"unknown rectification(s) {bad}; choose from {list(RECTIFICATIONS)}")
        if self.experts < 1:
            raise ConfigError(f"experts must be >= 1, got {self.experts}")
        k_gate = self.top_k + int("fill-in" in self.rectify)
        if not 1 <= self.top_k <= self.experts or k_gate > self.experts:
            raise ConfigError(f"top-k {self.top_k}{' (+1 for fill-in)' if k_gate > self.top_k else ''} must be "
                              f"between 1 and the number of experts ({self.experts})")
        if not self.capacity_factor > 0:  # also rejects nan
            raise ConfigError(f"capacity factor must be > 0 (inf = never drop), got {self.capacity_factor}")
        if self.groups < 1 or self.experts % self.groups:
            raise ConfigError(f"experts ({self.experts}) must be divisible by the number of ranks/groups "
                              f"({self.groups})")
        if self.dropless and self.rectify:
            raise ConfigError("dropless routing drops and pads nothing: it cannot be combined with rectify")
        if self.unrouted not in UNROUTED:
            raise ConfigError(f"unrouted must be one of {list(UNROUTED)}, got {self.unrouted!r}")
        if self.fill_from not in FILL_FROM:
            raise ConfigError(f"fill_from must be one of {list(FILL_FROM)}, got {self.fill_from!r}")
        if self.filler_priority not in FILLER_PRIORITY:
            raise ConfigError(f"filler_priority must be one of {list(FILLER_PRIORITY)}, got {self.filler_priority!r}")
        return self


STAT_KEYS = ("tokens", "assignments", "dropped", "slots", "filled", "fillers", "unrouted", "rectified",
             "ir_rows")


class MoELayer(nn.Module):
    """Drop-in MLP replacement: router + E SwiGLU experts with capacity routing, IR/FR and (simulated) EP.

    ``forward(x (B, T, d)) -> (B, T, d)``. After each forward ``self.stats`` holds detached counters
    (:data:`STAT_KEYS` plus ``load`` (E,) kept assignments and ``demand`` (E,) first choices per expert) and
    ``self.aux`` the weighted router loss, whose gradient is injected in backward (no change to the caller).
    """

    def __init__(self, hidden: int, intermediate: int, s: MoESettings):
        super().__init__()
        self.s = s.check()
        self.hidden, self.intermediate = hidden, intermediate
        self.router = nn.Linear(hidden, s.experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(s.experts, hidden, 2 * intermediate))  # (E, d, 2f) gate|up
        self.w_out = nn.Parameter(torch.empty(s.experts, intermediate, hidden))  # (E, f, d)
        self.reset_parameters()
        self.ep: Any = None  # set by moe_parallel.shard_model: (group, rank, world)
        self._stats: dict[str, Any] | None = {}
        self._stats_src: tuple | None = None
        self.aux: torch.Tensor | None = None

    @property
    def stats(self) -> dict[str, Any]:
        """Detached counters of the last forward (:data:`STAT_KEYS`, ``load``, ``demand``, ``aux``, ...)."""
        if self._stats is None:
            self._stats = self._count()
        return self._stats

    @stats.setter
    def stats(self, value: dict[str, Any]) -> None:
        self._stats, self._stats_src = value, None

    @torch.no_grad()
    def _count(self) -> dict[str, Any]:
        idx, keep, valid, rectified, ir_rows, cap, W, E, k, world, d, esize, aux = self._stats_src
        dev = keep.device
        un_all, _ = unrouted_tokens(keep, k, self.s.unrouted)
        n = valid.sum()
        return {
            "tokens": n, "assignments": n * k, "dropped": (~keep[..., :k] & valid[..., None]).sum(),
            "slots": torch.tensor(W * E * cap, device=dev), "filled": keep.sum(),
            "fillers": keep[..., k:].sum(), "unrouted": (un_all & valid).sum(), "rectified": rectified,
            "ir_rows": torch.tensor(ir_rows, device=dev),
            "load": expert_counts(idx, keep, E).sum((0, 1)),
            "demand": expert_counts(idx[..., :1], valid, E).sum((0, 1)),
            "aux": aux, "calls": torch.tensor(1), "capacity": torch.tensor(cap),
            "a2a_bytes": torch.tensor(2 * W * E * cap * d * esize * (world - 1) / world),
        }

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in (self.router.weight, self.w_in, self.w_out):
            nn.init.normal_(p, std=std)

    @property
    def fill_in(self) -> bool:
        return "fill-in" in self.s.rectify

    @property
    def intra_gpu(self) -> bool:
        return "intra-gpu" in self.s.rectify

    def extra_repr(self) -> str:
        s = self.s
        return (f"experts={s.experts}, top_k={s.top_k}, capacity_factor={s.capacity_factor}, "
                f"rectify={list(s.rectify)}, dropless={s.dropless}, groups={s.groups}")

    # -- the exchange: simulated (one process) or real (moe_parallel) -------------------------------------
    def _experts(self, buf: torch.Tensor) -> torch.Tensor:
        """buf (W, E, C, d) as sent by W groups -> expert outputs in the same layout."""
        if self.ep is not None:
            from lmlab.train.moe_parallel import expert_exchange

            return expert_exchange(buf[0], self.w_in, self.w_out, self.ep)[None]
        W, E, C, d = buf.shape
        x = buf.transpose(0, 1).reshape(E, W * C, d)  # (E, W*C, d): what each expert's owner receives
        y = swiglu_experts(x, self.w_in.to(x.dtype), self.w_out.to(x.dtype))
        return y.view(E, W, C, d).transpose(0, 1)  # (W, E, C, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        B, T, d = x.shape
        E, k = s.experts, s.top_k
        W = 1 if self.ep is not None else s.groups
        world = self.ep[2] if self.ep is not None else s.groups
        n_local = E // world
        N = B * T
        S = -(-N // W)  # tokens per group (the last group padded)
        flat = x.reshape(N, d)
        if W * S != N:
            flat = torch.cat([flat, flat.new_zeros(W * S - N, d)])
        xs = flat.view(W, S, d)  # (W, S, d)
        valid = (torch.arange(W * S, device=x.device) < N).view(W, S)
        logits = F.linear(xs.float(), self.router.weight.float())  # (W, S, E) fp32 router
        fill = self.fill_in and not s.dropless
        if s.dropless:
            probe = route(logits, k, S, valid=valid)  # C = S cannot drop; the real C is the max load
            cap = int(probe.counts.sum(1).max())
            if self.ep is not None:
                from lmlab.train.moe_parallel import all_reduce_max

                cap = all_reduce_max(cap, self.ep)
            cap = max(cap, 1)
        else:
            if fill and s.fill_from == "next":  # the authors' configs: top-(k+1) at cf * k/(k+1), same C as top-k
                cap = capacity(S, E, k + 1, s.capacity_factor * k / (k + 1), s.min_capacity)
            else:
                cap = capacity(S, E, k, s.capacity_factor, s.min_capacity)
        r = route(logits, k, cap, fill_in=fill, fill_from=s.fill_from, bpr=s.bpr, filler_priority=s.filler_priority,
                  valid=valid)
        K = r.idx.shape[-1]
        w = combine_weights(r, k, s.straight_through)  # (W, S, K)

        # dispatch: (W, S, K) kept choices -> buffer rows ((w*E + e)*C + slot)
        keep = r.keep.reshape(-1)
        grp = torch.arange(W, device=x.device)[:, None, None].expand(W, S, K).reshape(-1)
        tok = torch.arange(W * S, device=x.device).view(W, S, 1).expand(W, S, K).reshape(-1)[keep]  # (A,)
        pos = ((grp * E + r.idx.reshape(-1)) * cap + r.slot.reshape(-1))[keep]  # (A,)
        # gather, not scatter: row r of the buffer reads token src[r] (padding rows read an appended zero row), so
        # the backward is an index_add instead of an accumulating index_put
        src = torch.full((W * E * cap,), W * S, dtype=torch.long, device=x.device).index_put_((pos,), tok)
        buf = torch.cat([flat, flat.new_zeros(1, d)]).index_select(0, src)  # (W*E*C, d)
        y = self._experts(buf.view(W, E, cap, d)).reshape(W * E * cap, d)
        out = y.new_zeros(W * S, d).index_add(0, tok, y.index_select(0, pos) * w.reshape(-1)[keep, None].to(y.dtype))

        rectified = torch.zeros((), device=x.device)
        ir_rows = 0
        if self.intra_gpu and not s.dropless:
            un, m = unrouted_tokens(r.keep, k, s.unrouted)  # (W, S)
            un = un & valid
            rank = self.ep[1] if self.ep is not None else None
            lo = (torch.full((W,), rank * n_local, device=x.device) if rank is not None
                  else torch.arange(W, device=x.device) * n_local)
            h, p_h = local_best(r.probs, lo, n_local)  # (W, S)
            topk_norm = (r.gate * r.keep).sum(-1).detach()  # (W, S)
            ids = un.reshape(-1).nonzero().squeeze(1)  # (U,) unrouted tokens
            if ids.numel():
                e_lo = 0 if self.ep is None else rank * n_local  # local weights are indexed from 0 under EP
                yu = swiglu_rows(flat[ids], h.reshape(-1)[ids] - e_lo, self.w_in, self.w_out).to(out.dtype)
                pm = (p_h * m).reshape(-1)[ids]  # (U,) gradient to the router through p_h
                tn = topk_norm.reshape(-1)[ids]
                denom = (tn + pm.detach()).clamp(min=EPS)
                scale = torch.ones(W * S, device=x.device, dtype=torch.float32)
                scale[ids] = tn / denom
                out = out * scale[:, None].to(out.dtype)
                out = out.index_add(0, ids, yu * (pm / denom)[:, None].to(yu.dtype))
            rectified = un.sum()
            ir_rows = int(ids.numel())
        out = out[:N].view(B, T, d)

        # router losses (their gradient is injected in backward) and statistics
        aux = s.aux_weight * aux_loss(r.probs, r.idx[..., 0], valid)
        if s.z_weight:
            aux = aux + s.z_weight * z_loss(logits, valid)
        if self.ep is not None:
            aux = aux / world  # every rank's share of the global mean (gradients are summed over ranks)
        self.aux = aux.detach()
        if self.training and torch.is_grad_enabled() and aux.requires_grad:
            out = _AuxGrad.apply(out, aux)
        # counters are computed on first read of ``self.stats`` (kept out of the fwd+bwd hot path)
        self._stats_src = (r.idx, r.keep, valid, rectified, ir_rows, cap, W, E, k, world, d, flat.element_size(),
                           self.aux * (world if self.ep is not None else 1))
        self._stats = None
        return out


def rates(stats: dict[str, Any]) -> dict[str, Any]:
    """Per-layer rates from summed counters: drop/pad/fill/unrouted/rectified, slots per token, load histogram."""
    n = max(1.0, float(stats["tokens"]))
    slots = max(1.0, float(stats["slots"]))
    load = torch.as_tensor(stats["load"]).float()
    return {
        "drop_rate": float(stats["dropped"]) / max(1.0, float(stats["assignments"])),
        "pad_rate": 1.0 - float(stats["filled"]) / slots,
        "fill_rate": float(stats["fillers"]) / slots,
        "unrouted_rate": float(stats["unrouted"]) / n,
        "rectified_rate": float(stats["rectified"]) / n,
        "slots_per_token": (float(stats["slots"]) + float(stats["ir_rows"])) / n,
        "aux": float(stats["aux"]) / max(1.0, float(stats.get("calls", 1))),
        "capacity": int(stats["capacity"]),
        "a2a_bytes": float(stats["a2a_bytes"]),
        "load": [round(v, 4) for v in (load / load.sum().clamp(min=1)).tolist()],
    }


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


# ====================================================================================================
# an HF-compatible MoE causal LM: Llama blocks whose MLP is a MoELayer (model_type "lmlab_moe")
_SETTING_FIELDS = {f.name for f in dataclasses.fields(MoESettings)}
_HF: dict[str, Any] = {}


def _hf_classes() -> dict[str, Any]:
    """Define (once) and register the HF classes; kept lazy so EP worker processes need not import transformers."""
    if _HF:
        return _HF
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class LmlabMoeConfig(LlamaConfig):
        """``LlamaConfig`` + the MoE settings (``moe`` dict) of every ``moe_layer_freq``-th layer."""

        model_type = "lmlab_moe"

        def __init__(self, moe_intermediate_size: int = 128, moe_layer_freq: int = 1,
                     moe: dict[str, Any] | None = None, **kw: Any):
            self.moe_intermediate_size = moe_intermediate_size
            self.moe_layer_freq = moe_layer_freq
            m = dict(moe or {})
            if "rectify" in m:
                m["rectify"] = list(m["rectify"])
            self.moe = m
            super().__init__(**kw)

        def settings(self) -> MoESettings:
            m = {k: v for k, v in self.moe.items() if k in _SETTING_FIELDS}
            if "rectify" in m:
                m["rectify"] = tuple(m["rectify"])
            return MoESettings(**m)

    class LmlabMoeForCausalLM(LlamaForCausalLM):
        """``LlamaForCausalLM`` with :class:`MoELayer` MLPs; ``out.aux_loss`` reports the router loss (its
        gradient is already injected by the layers, so any training loop trains the router losses)."""

        config_class = LmlabMoeConfig

        def __init__(self, config: LmlabMoeConfig):
            super().__init__(config)
            s = config.settings()
            f = max(1, config.moe_layer_freq)
            for i, layer in enumerate(self.model.layers):
                if i % f == f - 1:
                    layer.mlp = MoELayer(config.hidden_size, config.moe_intermediate_size, s)
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            super()._init_weights(module)
            if isinstance(module, MoELayer):
                module.reset_parameters(self.config.initializer_range)

        def router_aux(self) -> torch.Tensor:
            """Weighted router loss of the last forward, summed over MoE layers."""
            aux = [m.aux for m in moe_layers(self) if m.aux is not None]
            return torch.stack(aux).sum() if aux else torch.zeros(())

        def forward(self, *args: Any, **kwargs: Any):
            out = super().forward(*args, **kwargs)
            if getattr(out, "loss", None) is not None:
                out.aux_loss = self.router_aux().to(out.loss.device)
            return out

    LmlabMoeConfig.__module__ = LmlabMoeForCausalLM.__module__ = __name__
    for c in (LmlabMoeConfig, LmlabMoeForCausalLM):
        c.__qualname__ = c.__name__
    with contextlib.suppress(ValueError):  # already registered
        AutoConfig.register("lmlab_moe", LmlabMoeConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(LmlabMoeConfig, LmlabMoeForCausalLM)
    _HF.update(LmlabMoeConfig=LmlabMoeConfig, LmlabMoeForCausalLM=LmlabMoeForCausalLM)
    return _HF


def register() -> None:
    """Register model_type ``lmlab_moe`` with AutoConfig / AutoModelForCausalLM (idempotent)."""
    _hf_classes()


def __getattr__(name: str) -> Any:  # PEP 562: LmlabMoeConfig / LmlabMoeForCausalLM are built on first use
    if name in ("LmlabMoeConfig", "LmlabMoeForCausalLM"):
        return _hf_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, expert_size: int = 128,
                 settings: MoESettings | None = None, max_positions: int = 1024, **special: Any) -> Any:
    """An ``LmlabMoeConfig`` (every layer MoE, tied embeddings)."""
    s = (settings or MoESettings()).check()
    moe = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()}
    return _hf_classes()["LmlabMoeConfig"](vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=expert_size,
                          moe_intermediate_size=expert_size, max_position_embeddings=max_positions,
                          tie_word_embeddings=True, rope_theta=10000.0, moe=moe, **special)


def reference_config(vocab_size: int) -> Any:
    """``ref:moe``: the dense reference's shape (d=192, 4 layers) with 8 SwiGLU experts of 256 (top-2, so the
    active FFN width equals the dense model's 512), capacity factor 1.0, IR + FR, one routing group."""
    s = MoESettings(experts=8, top_k=2, capacity_factor=1.0, rectify=("intra-gpu", "fill-in"), groups=1)
    return model_config(vocab_size, hidden=192, layers=4, heads=4, expert_size=256, settings=s)


# ====================================================================================================
# `lmlab train moe`

ROUTERS: dict[str, Callable[[list[str]], tuple[str, ...]]] = {
    "topk": lambda rectify: (),
    "rectify": lambda rectify: tuple(rectify),
}
"""Router variants: name -> (requested rectifications -> rectifications used)."""


@dataclass
class MoEOptimConfig(OptimConfig):
    """:class:`~lmlab.core.pretrain.OptimConfig` with the MoE recipe's defaults (so ``optim.steps=N`` keeps them)."""

    steps: int = 300
    """Optimiser steps."""
    batch_size: int = 16
    """Sequences per micro-batch (the global batch; split over ranks when nproc > 1)."""
    seq_len: int = 64
    """Tokens per training sequence."""
    lr: float = 2e-3
    """Peak learning rate."""
    eval_every: int = 100
    """Evaluate validation loss every N steps (0: only at the end)."""
    eval_batches: int = 4
    """Validation batches per evaluation."""


@dataclass
class TrainMoEConfig(RunArgs):
    """Train a small MoE LM with capacity top-k routing or the Rectify-Router; per-layer drop/pad stats."""

    router: str = "rectify"
    """topk (vanilla capacity routing) | rectify (apply --rectify)."""
    rectify: list[str] = field(default_factory=lambda: ["intra-gpu", "fill-in"])
    """Rectifications for router=rectify: intra-gpu, fill-in (comma-separated)."""
    top_k: int = 1
    """Experts per token (1 or 2; any k <= experts works)."""
    capacity_factor: float = 1.0
    """Capacity C = ceil(cf * tokens * k / experts) per expert and rank (inf: never drop)."""
    experts: int = 8
    """Number of experts E."""
    ranks: int = 4
    """Expert-parallel ranks W (E/W experts each); simulated in one process unless nproc > 1."""
    nproc: int = 1
    """Processes: 1 simulates the ranks; = ranks runs real expert parallelism (torch.distributed)."""
    backend: str = "auto"
    """torch.distributed backend for nproc > 1: auto (nccl on CUDA, gloo on CPU) | gloo | nccl."""
    dropless: bool = False
    """Size buffers to the largest expert load (no drops; reference for the capacity routers)."""
    min_capacity: int = 0
    """Minimum slots per expert (paper 0, DeepSpeed default 4)."""
    aux_weight: float = 0.01
    """Load-balancing loss weight."""
    z_weight: float = 0.0
    """Router z-loss weight."""
    unrouted: str = "any"
    """IR: a token is unrouted when fewer than k (any) or none (all) of its choices were kept."""
    filler_priority: str = "own"
    """FR: order fillers of an expert by their own score (own), their top-1 score (top1) or position."""
    fill_from: str = "all"
    """FR candidates: all (every token not yet assigned to the expert: no padding while tokens remain) | next
    (only each token's (k+1)-th choice: the authors' top-(k+1) configs)."""
    bpr: bool = False
    """Batch-prioritised routing: queue tokens by top-1 score instead of position."""
    straight_through: bool = True
    """Top-1 straight-through gate (forward weight 1), as in the authors' configs."""
    hidden_size: int = 64
    """Model width d."""
    layers: int = 2
    """Transformer blocks (every MLP is a MoE layer)."""
    heads: int = 4
    """Attention heads."""
    expert_size: int = 128
    """SwiGLU expert width f."""
    data: str = "code,prose,math"
    """Corpus domains, a text/jsonl/parquet path, or hf:NAME."""
    max_bytes: int = 1_000_000
    """Max bytes of text per domain."""
    tokenizer: str = "ref"
    """ref (the reference BPE, vocab 2048) | bytes (UTF-8 bytes, vocab 256, EOS = 0: the paper-check setting)."""
    optim: MoEOptimConfig = field(default_factory=MoEOptimConfig)
    """Optimisation settings."""
    save_model: bool = True
    """Save the trained model (HF folder, model_type lmlab_moe) into run_dir/model."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {sorted(ROUTERS)}, got {self.router!r}")
        if self.nproc < 1:
            raise ConfigError(f"nproc must be >= 1, got {self.nproc}")
        if self.nproc > 1 and self.nproc != self.ranks:
            raise ConfigError(f"nproc ({self.nproc}) must be 1 (simulate the ranks) or equal ranks ({self.ranks})")
        if self.nproc > 1 and self.optim.batch_size % self.nproc:
            raise ConfigError(f"batch_size ({self.optim.batch_size}) must be divisible by nproc ({self.nproc})")
        if self.optim.save_every:
            raise ConfigError("train moe does not write intermediate checkpoints; set optim.save_every=0")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"backend must be auto|gloo|nccl, got {self.backend!r}")
        if self.tokenizer not in ("ref", "bytes"):
            raise ConfigError(f"tokenizer must be ref|bytes, got {self.tokenizer!r}")
        if self.hidden_size % self.heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        self.settings()  # validates experts/top-k/capacity/ranks/rectify

    def settings(self) -> MoESettings:
        return MoESettings(experts=self.experts, top_k=self.top_k, capacity_factor=self.capacity_factor,
                           rectify=ROUTERS[self.router](self.rectify), dropless=self.dropless, groups=self.ranks,
                           min_capacity=self.min_capacity, aux_weight=self.aux_weight, z_weight=self.z_weight,
                           straight_through=self.straight_through, unrouted=self.unrouted,
                           filler_priority=self.filler_priority, fill_from=self.fill_from, bpr=self.bpr).check()


def build(cfg: TrainMoEConfig, vocab_size: int, special: dict[str, int] | None = None) -> Any:
    torch.manual_seed(cfg.seed)
    conf = model_config(vocab_size, cfg.hidden_size, cfg.layers, cfg.heads, cfg.expert_size, cfg.settings(),
                        max_positions=max(128, cfg.optim.seq_len), **(special or {}))
    return _hf_classes()["LmlabMoeForCausalLM"](conf).train()


def _sum_stats(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [dict(m.stats) for m in moe_layers(model)]


def _add(acc: list[dict[str, torch.Tensor]] | None, new: list[dict[str, torch.Tensor]]):
    if acc is None:
        return [{k: v.clone() for k, v in d.items()} for d in new]
    for a, n in zip(acc, new):
        for k in a:
            a[k] = n[k] if k == "capacity" else a[k] + n[k]
    return acc


def load_data(cfg: TrainMoEConfig) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(tokenizer or None for bytes, train_ids, val_ids, meta)`` for ``cfg.data``."""
    import numpy as np

    from lmlab.core import zoo

    if cfg.tokenizer == "bytes":
        names = tuple(d.strip() for d in cfg.data.split(",") if d.strip())
        corpus = zoo._corpus(names, cfg.max_bytes, 0)

        def enc(docs: list[str]) -> np.ndarray:
            return np.frombuffer(b"\0".join(t.encode() for t in docs) + b"\0", dtype=np.uint8).astype(np.int64)

        tr, va = enc(corpus.texts("train")), enc(corpus.texts("val"))
        return None, tr, va, {"data": cfg.data, "corpus_hash": corpus.hash, "tokenizer": "bytes",
                              "train_tokens": int(len(tr)), "val_tokens": int(len(va)), "max_bytes": cfg.max_bytes}
    tok = zoo.reference_tokenizer()
    tr, va, meta = zoo.token_streams(tok, cfg.data, cfg.max_bytes, seed=0)
    return tok, tr, va, meta


def train_variant(cfg: TrainMoEConfig, run=None, *, ep: Any = None, progress: bool = True,
                  data: tuple | None = None) -> dict[str, Any]:
    """Train one router variant and return its results (rank 0 logs into ``run`` when given).

    ``ep`` = (group, rank, world, device) for real expert parallelism; None simulates ``cfg.ranks`` groups.
    ``data`` = (tokenizer, train_ids, val_ids, meta) to reuse already encoded streams.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from lmlab.core import zoo
    from lmlab.core.pretrain import eval_windows, lm_loss, lr_at, make_optimizer, sample_batch

    rank, world = (ep[1], ep[2]) if ep is not None else (0, 1)
    tok, tr, va, meta = data if data is not None else load_data(cfg)
    from lmlab.core.runtime import pick_device

    dev = ep[3] if ep is not None else pick_device(cfg.device)
    special = zoo._special_ids(tok) if tok is not None else {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    model = build(cfg, len(tok) if tok is not None else 256, special).to(dev)
    if ep is not None:
        from lmlab.train.moe_parallel import all_reduce_sum, reduce_grads, shard_model

        shard_model(model, ep)
    opt = cfg.optim
    optim = make_optimizer(model, opt)
    rng = np.random.default_rng(cfg.seed)
    windows = eval_windows(va, opt.eval_batches * opt.batch_size, opt.seq_len)
    B = opt.batch_size
    windows = windows[: max(world, len(windows) // world * world)]  # every rank scores the same number of rows
    if len(windows) < world:
        from lmlab.errors import LmlabError

        raise LmlabError(f"validation split too small: {len(windows)} windows of {opt.seq_len} tokens for "
                         f"{world} ranks")

    def local(batch: torch.Tensor) -> torch.Tensor:  # rank r's contiguous share of a global batch
        per = len(batch) // world
        return batch[rank * per:(rank + 1) * per] if ep is not None else batch

    def evaluate() -> tuple[float, list[dict[str, Any]]]:
        model.eval()
        tot, n, acc = 0.0, 0, None
        with torch.no_grad():
            for i in range(0, len(windows), B):
                b = local(windows[i:i + B]).to(dev)
                tot += float(lm_loss(model, b)) * len(b)
                n += len(b)
                acc = _add(acc, _sum_stats(model))
        if ep is not None:
            tot, n = all_reduce_sum([tot, float(n)], ep)
            acc = [all_reduce_stats(a, ep) for a in acc]
        model.train()
        return tot / max(1.0, n), [rates(a) for a in acc]

    bar = tqdm(total=opt.steps, desc=f"moe {variant_name(cfg)}", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    losses: list[float] = []
    history: list[dict[str, float]] = []  # layer-mean routing rates at each log step
    val: list[dict[str, Any]] = []
    acc = None
    t_train = 0.0
    tokens = 0
    for step in range(1, opt.steps + 1):
        t0 = time.perf_counter()
        for g in optim.param_groups:
            g["lr"] = lr_at(step - 1, opt)
        loss_sum = torch.zeros(())
        for _ in range(opt.grad_accum):
            batch = local(sample_batch(tr, B, opt.seq_len, rng)).to(dev)  # every rank draws the same global batch
            loss = lm_loss(model, batch, opt.autocast) / (world * opt.grad_accum)
            loss.backward()
            loss_sum = loss_sum + loss.detach().cpu()
            acc = _add(acc, _sum_stats(model))
        loss = loss_sum
        if ep is not None:
            reduce_grads(model, ep)
            loss_v = all_reduce_sum([loss.item()], ep)[0]
        else:
            loss_v = loss.item()
        if opt.grad_clip > 0:
            clip_grad(model, opt.grad_clip, ep)
        optim.step()
        optim.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t0
        tokens += B * opt.seq_len * opt.grad_accum
        losses.append(loss_v)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.3f}")
        if step % opt.log_every == 0 or step == opt.steps:
            if ep is not None:
                acc = [all_reduce_stats(a, ep) for a in acc]
            per_layer = [rates(a) for a in acc]
            history.append({"step": step, **{k: sum(p[k] for p in per_layer) / len(per_layer) for k in
                                             ("drop_rate", "pad_rate", "fill_rate", "rectified_rate")}})
            if run is not None:
                run.log({"step": step, "loss": loss_v, "lr": lr_at(step - 1, opt), "tokens": tokens,
                         "aux": sum(p["aux"] for p in per_layer),
                         "layers": per_layer})
            acc = None
        if (opt.eval_every and step % opt.eval_every == 0) or step == opt.steps:
            v, vstats = evaluate()
            val.append({"step": step, "val_loss": v})
            if run is not None:
                run.log({"step": step, "val_loss": v, "val_layers": vstats})
    bar.close()
    # all-to-all traffic of one training step (forward dispatch + return, the same again in backward), all ranks
    a2a_step = 2 * sum(float(m.stats["a2a_bytes"]) for m in moe_layers(model))
    if ep is not None:
        a2a_step = all_reduce_sum([a2a_step], ep)[0]
    v, vstats = evaluate()
    mean = {k: sum(p[k] for p in vstats) / len(vstats) for k in
            ("drop_rate", "pad_rate", "fill_rate", "unrouted_rate", "rectified_rate", "slots_per_token")}
    return {"variant": variant_name(cfg), "val_loss": v, "final_train_loss": losses[-1], "val": val,
            "train_losses": losses, "rate_history": history, "eval_layers": vstats,
            **{f"eval_{k}": x for k, x in mean.items()},
            "a2a_bytes_per_step": a2a_step,
            "tokens": tokens, "train_seconds": t_train, "tok_per_s": tokens / max(1e-9, t_train),
            "params": sum(p.numel() for p in model.parameters()), "data": meta, "_model": model, "_tok": tok}


def all_reduce_stats(a: dict[str, torch.Tensor], ep: Any) -> dict[str, torch.Tensor]:
    from lmlab.train.moe_parallel import all_reduce_tensor

    return {k: (v if k == "capacity" else all_reduce_tensor(v, ep)) for k, v in a.items()}


def clip_grad(model: nn.Module, max_norm: float, ep: Any = None) -> float:
    """Global-norm clipping; under EP the expert shards' squared norms are summed over ranks."""
    shared, local_ = [], []
    for m_name, p in model.named_parameters():
        if p.grad is None:
            continue
        (local_ if ep is not None and m_name.endswith(("w_in", "w_out")) else shared).append(p)
    sq = sum((p.grad.float() ** 2).sum() for p in shared) if shared else torch.zeros(())
    sq_local = sum((p.grad.float() ** 2).sum() for p in local_) if local_ else torch.zeros(())
    if ep is not None:
        from lmlab.train.moe_parallel import all_reduce_tensor

        sq_local = all_reduce_tensor(torch.as_tensor(sq_local, dtype=torch.float32), ep)
    total = float(torch.sqrt(torch.as_tensor(sq) + torch.as_tensor(sq_local)))
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for p in shared + local_:
            p.grad.mul_(coef)
    return total


def variant_name(cfg: TrainMoEConfig) -> str:
    s = cfg.settings()
    name = f"top{s.top_k}"
    if s.dropless:
        return name + " dropless"
    if "intra-gpu" in s.rectify:
        name += "+IR"
    if "fill-in" in s.rectify:
        name += "+FR"
    return name + f" cf{s.capacity_factor:g}"


def _plots(run, res: dict[str, Any]) -> None:
    from lmlab.core.plotting import bar_plot, line_plot

    losses = res["train_losses"]
    line_plot(run.plots / "loss.png", list(range(1, len(losses) + 1)), {"train": losses},
              title=f"{res['variant']} training loss", xlabel="step", ylabel="nats/token")
    hist = res.get("rate_history") or []
    if hist:
        line_plot(run.plots / "rates_over_training.png", [h["step"] for h in hist],
                  {k: [h[k] for h in hist] for k in ("drop_rate", "pad_rate", "fill_rate", "rectified_rate")},
                  title="routing waste during training (mean over MoE layers)", xlabel="step", ylabel="rate")
    layers = res["eval_layers"]
    cats = [f"layer {i}" for i in range(len(layers))]
    bar_plot(run.plots / "rates.png", cats, {k: [lay[k] for lay in layers] for k in
                                             ("drop_rate", "pad_rate", "fill_rate", "rectified_rate")},
             title="routing waste per layer (validation)", ylabel="rate")
    E = len(layers[0]["load"])
    bar_plot(run.plots / "expert_load.png", [str(e) for e in range(E)],
             {c: lay["load"] for c, lay in zip(cats, layers)}, title="kept assignments per expert (validation)",
             xlabel="expert", ylabel="share")


def main(cfg: TrainMoEConfig) -> Path:
    """``lmlab train moe``: train one router variant; nproc > 1 spawns real expert-parallel ranks."""
    import os

    from lmlab.core.runs import check_out, default_run_name, start_run
    from lmlab.core.runtime import setup

    if cfg.nproc > 1 and "RANK" not in os.environ:
        from lmlab.train.moe_parallel import spawn

        if cfg.out is None:
            cfg = dataclasses.replace(cfg, out=str(Path("runs") / default_run_name("train-moe")))
        check_out(cfg.out)
        spawn(cfg)
        return Path(cfg.out)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        from lmlab.train.moe_parallel import run_rank

        return run_rank(cfg)
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    tok, tr, va, meta = load_data(cfg)
    with start_run(cfg, "train-moe", device=dev, dtype=dtype, threads=threads, extra_meta={"data": meta}) as run:
        res = train_variant(cfg, run, data=(tok, tr, va, meta))
        finish(run, cfg, res)
    return run.path


def finish(run, cfg: TrainMoEConfig, res: dict[str, Any]) -> None:
    model, tok = res.pop("_model"), res.pop("_tok")
    if cfg.save_model:
        model.save_pretrained(run.path / "model")
        if tok is not None:
            tok.save_pretrained(run.path / "model")
    _plots(run, res)
    res["nproc"] = cfg.nproc
    run.finish(res)


# ====================================================================================================
# tour


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """Train five router variants of a tiny byte-level MoE LM (top-1, cf 1.0, 4 simulated ranks) and compare
    validation loss and routing waste (quick: 50 steps, d=32, math domain; --full: 400 steps, d=64, all domains)."""
    from lmlab.core.plotting import bar_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    steps = 400 if cfg.full else 50
    optim = MoEOptimConfig(steps=steps, batch_size=16 if cfg.full else 8, seq_len=64, lr=2e-3 if cfg.full else 3e-3,
                        warmup=30 if cfg.full else 10, eval_every=0, eval_batches=4, log_every=10)
    base = TrainMoEConfig(out=str(out), device=cfg.device, seed=cfg.seed, threads=cfg.threads, router="topk",
                          tokenizer="bytes", hidden_size=64 if cfg.full else 32, layers=2, heads=4,
                          expert_size=128 if cfg.full else 64, max_bytes=1_000_000 if cfg.full else 200_000,
                          data="code,prose,math" if cfg.full else "math", optim=optim, save_model=False)
    variants = {"top1": {}, "top1+IR": {"router": "rectify", "rectify": ["intra-gpu"]},
                "top1+FR": {"router": "rectify", "rectify": ["fill-in"]},
                "top1+IR+FR": {"router": "rectify"}, "top1 dropless": {"dropless": True}}
    with start_run(base, "tour-moe", device=dev, dtype=dtype, threads=threads) as run:
        data = load_data(base)
        rows = {}
        for name, kw in variants.items():
            res = train_variant(dataclasses.replace(base, **kw), None, progress=False, data=data)
            res.pop("_model"), res.pop("_tok")
            rows[name] = {k: res[k] for k in ("val_loss", "eval_drop_rate", "eval_pad_rate", "eval_fill_rate",
                                              "eval_rectified_rate", "eval_slots_per_token", "tok_per_s")}
            run.log({"variant": name, **rows[name]})
        names = list(rows)
        bar_plot(run.plots / "val_loss.png", names, [rows[n]["val_loss"] for n in names],
                 title=f"validation loss after {steps} steps", ylabel="nats/token")
        bar_plot(run.plots / "waste.png", names, {k: [rows[n][f"eval_{k}"] for n in names]
                                                  for k in ("drop_rate", "pad_rate", "fill_rate", "rectified_rate")},
                 title="routing waste (validation)", ylabel="rate")
        run.finish({"steps": steps, "variants": rows})
    lines = [f"{n:<14} val {r['val_loss']:.3f}  drop {r['eval_drop_rate']:.3f}  pad {r['eval_pad_rate']:.3f}  "
             f"fill {r['eval_fill_rate']:.3f}  IR {r['eval_rectified_rate']:.3f}" for n, r in rows.items()]
    return run.path, "\n".join(lines)


__all__ = ["MoELayer", "MoESettings", "ROUTERS", "Routing",
           "TrainMoEConfig", "aux_loss", "capacity", "combine_weights", "local_best", "main", "moe_layers",
           "rates", "reference_config", "register", "route", "swiglu_experts", "swiglu_rows", "tour_section",
           "train_variant", "unrouted_tokens", "z_loss"]
