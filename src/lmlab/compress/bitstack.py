"""BitStack: any-size compression by iterative ~1-bit residual decomposition.

"BitStack: Any-Size Compression of Large Language Models in Variable Memory Environments", Xinghao Wang, Pengyu
Wang, Bo Wang, Dong Zhang, Yunhua Zhou, Xipeng Qiu (arXiv 2410.23918, ICLR 2025). Faithful to the official code
(github.com/xinghaow99/BitStack, ``BitStackLinear.decompose_weight`` and ``model_utils``), on CPU without Triton.

1. Activation-aware scaling. For each decomposed linear with input ``X (samples, tokens, n)`` from calibration
   text::

       s_j = mean_over_samples( ||X[sample, :, j]||_2 over tokens ) + 1e-3              # (n,)

   ``s`` is stored per linear (fp16) and undone at reconstruction, ``W_hat = (sum of blocks) diag(1/s)``, which
   works for every architecture (GQA included). ``scale=false`` is the paper's ablation; ``data_free`` uses
   ``s = 1`` and a weight-space sort (below).

2. Iterative absolute-value decomposition (AVD) of the residual, ``R_0 = W diag(s)``, ``niter`` times::

       S_i  = sign(R_i)  (sign(0) = +1)              packed 1 bit per weight, 8 per byte, MSB first
       U, Sigma, V^T = svd(|R_i|)
       u_i  = U_k sqrt(Sigma_k)   (m, k) fp16         vt_i = sqrt(Sigma_k) V_k^T   (k, n) fp16
       R_{i+1} = R_i - S_i * (u_i vt_i)               with the *stored fp16* factors (the official code uses fp32)

   ``||R_{i+1}||_F = || |R_i| - u_i vt_i ||_F <= ||R_i||_F`` (Eckart-Young), so every block helps. For a Gaussian
   matrix and k = 1 the first block leaves ``1 - 2/pi ~ 0.36`` of the residual energy.

3. Bytes per block: ``ceil(m n / 8) + 2 k (m + n)`` (packed signs + fp16 ``u`` and ``vt``: exactly the stored
   tensors; the official ``memory_per_bit`` writes ``m n / 8 + 2 k (m + n) * 2``, twice the fp16 factors, while
   the paper's sizes, e.g. 2.25 MiB per 4096x4096 block at k=16, match the stored bytes). Default ``k`` keeps the
   low-rank overhead near 1/8 bit per weight: ``k = max(1, round(m n / (128 (m + n))))`` (16 at 4096x4096, 1 at
   128x128).

4. Importance and sorting ("average", the paper's default): for each level b = 1 .. niter-1, set every stack to
   b blocks, raise one stack to b+1, measure perplexity on sorting text, restore. Within a level the stacks are
   ordered by ascending perplexity; the levels are concatenated. Any two stacks then differ by at most one block,
   and every budget's configuration is a prefix of one global order (configs nest; resizing moves only the
   difference). ``greedy`` (all (stack, level) scores sorted globally, made monotone per stack) and ``random``
   (a seeded shuffle keeping each stack's blocks in order) are the paper's ablation orders.

5. Loading: the size table gives the weight bytes of every prefix (non-decomposed tensors at fp16 + scales +
   blocks); ``load(STACK, max_memory="3000MiB")`` takes the largest prefix that fits and reads only its blocks.

Defaults of the paper: niter 16, k 16 (4096-wide models), 256 x 2048-token calibration windows, 32 x 2048 sorting
windows. lmlab's defaults are scaled for CPU (32 x 256 calibration, 16 x 256 sorting windows).

Artifact (a run directory)::

    STACK/ bitstack.json        metadata: model, niter, k per stack, shapes, calibration hash + samples, checksums
           blocks.safetensors   per block i of stack j: "{j}.{i}.signs" uint8, "{j}.{i}.u" fp16, "{j}.{i}.vt" fp16
           extra.safetensors    non-decomposed tensors (fp16) and scales "scale.{j}" (fp16)
           scores.json          importance scores (resumable: written after every level)
           order.json           sorted orders (average, greedy, random) and their size tables
           model/               HF config + tokenizer (the architecture to rebuild)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.compress.quant import (
    DEFAULT_MODULES,
    EvalSet,
    find_linears,
    fmt_bytes,
    parse_bytes,
    text_hash,
    texts_for,
    token_windows,
)
from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

FORMAT = "lmlab-bitstack-1"
ORDERS = ("average", "greedy", "random")


# ----------------------------------------------------------------------------------------------------------
# pure maths


def pack_signs(R: torch.Tensor) -> torch.Tensor:
    """Signs of ``R`` as bits (``R >= 0`` -> 1, so sign(0) = +1), 8 per byte, MSB first, zero-padded -> uint8
    ``(ceil(numel / 8),)``."""
    bits = (R.reshape(-1) >= 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=R.device)
    return (bits.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)  # (ceil(numel/8),)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: float32 tensor of +-1 with ``shape``."""
    numel = math.prod(shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (bytes, 8)
    return bits.reshape(-1)[:numel].float().mul_(2).sub_(1).reshape(shape)


def default_k(m: int, n: int) -> int:
    """Rank per block keeping the low-rank overhead near 1/8 bit per weight: ``max(1, round(mn/(128(m+n))))``."""
    return max(1, round(m * n / (128 * (m + n))))


def block_bytes(m: int, n: int, k: int) -> int:
    """Bytes of one block: packed signs ``ceil(mn/8)`` + fp16 ``u (m,k)`` and ``vt (k,n)``."""
    return (m * n + 7) // 8 + 2 * k * (m + n)


def avd_block(R: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One absolute-value decomposition step of the residual ``R (m, n)`` (fp32).

    Returns ``(packed_signs uint8, u (m,k) fp16, vt (k,n) fp16, next residual (m,n) fp32)``; the next residual
    uses the stored fp16 factors, so it is exactly what a loader reconstructs."""
    R = R.float()
    S = torch.where(R >= 0, 1.0, -1.0)  # (m, n), sign(0) = +1
    U, sig, Vh = torch.linalg.svd(R.abs(), full_matrices=False)  # (m,r) (r,) (r,n)
    root = sig[:k].sqrt()
    u = (U[:, :k] * root).half().contiguous()  # (m, k); contiguous for safetensors when k > 1
    vt = (root[:, None] * Vh[:k]).half().contiguous()  # (k, n)
    return pack_signs(S), u, vt, R - S * (u.float() @ vt.float())


def avd_decompose(W: torch.Tensor, niter: int, k: int) -> tuple[list[tuple[torch.Tensor, ...]], list[float]]:
    """``niter`` AVD blocks of ``W`` (already scaled) and the residual norms ``[||R_0||, ..., ||R_niter||]``."""
    R = W.float()
    blocks, norms = [], [float(torch.linalg.norm(R))]
    for _ in range(niter):
        packed, u, vt, R = avd_block(R, k)
        blocks.append((packed, u, vt))
        norms.append(float(torch.linalg.norm(R)))
    return blocks, norms


def reconstruct(blocks: list[tuple[torch.Tensor, ...]], shape: tuple[int, int],
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """``W_hat = (sum_i unpack(S_i) * (u_i @ vt_i)) diag(1/s)`` (fp32, ``shape``)."""
    W = torch.zeros(shape, device=blocks[0][1].device if blocks else "cpu")
    for packed, u, vt in blocks:
        W += unpack_signs(packed, shape) * (u.float() @ vt.float())
    if scale is not None:
        W /= scale.float()[None, :]
    return W


def activation_scales(model: nn.Module, linears: dict[str, nn.Linear], windows: torch.Tensor,
                      batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``s = mean over samples of the per-channel L2 norm over tokens of each linear's input, + 1e-3``."""
    sums = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in linears.items()}
    count = [0]

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()  # (B, T, n)
            sums[name] += torch.linalg.norm(x, dim=1).double().sum(0).cpu()  # (n,)
        return fn

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in linears.items()]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[s:s + batch_size].to(dev))
                count[0] += min(batch_size, windows.shape[0] - s)
    finally:
        for h in handles:
            h.remove()
    return {n: (v / count[0] + 1e-3).float() for n, v in sums.items()}


# ----------------------------------------------------------------------------------------------------------
# sorting


def order_average(scores: list[list[float]]) -> list[int]:
    """Stack indices in the order their blocks 2..niter are added. ``scores[b-1][j]`` = perplexity with stack j
    at b+1 blocks and all others at b. Level by level, ascending perplexity (NaN last)."""
    order = []
    for level in scores:
        key = [float("inf") if not math.isfinite(v) else v for v in level]
        order.extend(sorted(range(len(level)), key=lambda j: (key[j], j)))
    return order


def order_greedy(scores: list[list[float]]) -> list[int]:
    """All (stack, level) candidates sorted by score globally; each stack's scores are made non-decreasing over
    its levels (cumulative max) so that its blocks still come in order."""
    cands = []
    n = len(scores[0]) if scores else 0
    for j in range(n):
        run = -float("inf")
        for b, level in enumerate(scores):
            v = level[j] if math.isfinite(level[j]) else float("inf")
            run = max(run, v)
            cands.append((run, b, j))
    return [j for _, _, j in sorted(cands)]


def order_random(n_stacks: int, n_levels: int, seed: int = 0) -> list[int]:
    """A seeded random order: every stack appears ``n_levels`` times (its k-th appearance adds block k+2)."""
    rng = np.random.default_rng(seed)
    seq = np.repeat(np.arange(n_stacks), n_levels)
    rng.shuffle(seq)
    return [int(j) for j in seq]


def size_table(base: int, bbytes: list[int], order: list[int]) -> list[int]:
    """Weight bytes of every prefix of ``order`` (entry 0 = one block per stack)."""
    out = [base]
    for j in order:
        out.append(out[-1] + bbytes[j])
    return out


def counts_at(order: list[int], n_stacks: int, steps: int) -> list[int]:
    """Blocks per stack after the first ``steps`` entries of ``order``."""
    c = [1] * n_stacks
    for j in order[:steps]:
        c[j] += 1
    return c


def pick_steps(sizes: list[int], budget: int) -> int:
    """Largest prefix whose bytes fit ``budget`` (sizes are increasing)."""
    import bisect

    return bisect.bisect_right(sizes, budget) - 1


# ----------------------------------------------------------------------------------------------------------
# the module


class BitStackLinear(nn.Module):
    """A linear layer holding the first ``n`` blocks of a BitStack; ``W_hat`` is rebuilt when blocks change
    (cached in the compute dtype: transient memory, not counted in the budget)."""

    def __init__(self, in_features: int, out_features: int, k: int, scale: torch.Tensor | None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.register_buffer("scale", None if scale is None else scale.detach().half())
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(),
                                                                               requires_grad=False))
        self.n_blocks = 0
        self.active: int | None = None  # use only the first `active` stored blocks (sorting); None = all
        self._w: torch.Tensor | None = None

    # blocks are buffers b{i}_signs / b{i}_u / b{i}_vt so .to(device) moves them and nbytes are countable
    def add_block(self, signs: torch.Tensor, u: torch.Tensor, vt: torch.Tensor) -> None:
        i = self.n_blocks
        self.register_buffer(f"b{i}_signs", signs)
        self.register_buffer(f"b{i}_u", u)
        self.register_buffer(f"b{i}_vt", vt)
        self.n_blocks += 1
        self._w = None

    def drop_block(self) -> None:
        i = self.n_blocks - 1
        for part in ("signs", "u", "vt"):
            delattr(self, f"b{i}_{part}")
        self.n_blocks -= 1
        self._w = None

    def set_active(self, n: int | None) -> None:
        if n != self.active:
            self.active = n
            self._w = None

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = self.n_blocks if self.active is None else min(self.active, self.n_blocks)
        return [(getattr(self, f"b{i}_signs"), getattr(self, f"b{i}_u"), getattr(self, f"b{i}_vt"))
                for i in range(n)]

    def stored_bytes(self) -> int:
        """Bytes of the stored blocks and the scale (the budgeted tensors of this layer)."""
        n = sum(t.nbytes for blk in [(getattr(self, f"b{i}_signs"), getattr(self, f"b{i}_u"),
                                      getattr(self, f"b{i}_vt")) for i in range(self.n_blocks)] for t in blk)
        return n + (self.scale.nbytes if self.scale is not None else 0)

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed weight ``(out, in)`` in the compute dtype."""
        if self._w is None:
            dt = self.bias.dtype if self.bias is not None else torch.float32
            blocks = [(s.cpu(), u.cpu(), v.cpu()) for s, u, v in self.blocks()]
            W = reconstruct(blocks, (self.out_features, self.in_features),
                            None if self.scale is None else self.scale.cpu())
            dev = self.scale.device if self.scale is not None else (
                self.b0_signs.device if self.n_blocks else torch.device("cpu"))
            self._w = W.to(device=dev, dtype=getattr(self, "_dtype", dt))
        return self._w

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self._dtype = dtype
        if self.bias is not None:
            self.bias.data = self.bias.data.to(dtype)
        self._w = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        w = self.weight
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, blocks={self.n_blocks}"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ----------------------------------------------------------------------------------------------------------
# artifact I/O


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_meta(stack: str | Path) -> dict[str, Any]:
    """``bitstack.json`` of a stack folder (clear errors for a missing or foreign folder)."""
    p = Path(stack)
    f = p / "bitstack.json"
    if not p.is_dir():
        raise LmlabError(f"BitStack folder not found: {p}")
    if not f.is_file():
        raise LmlabError(f"{p} is not a BitStack folder (no bitstack.json); build one with 'lmlab compress bitstack'")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(f"{f} is corrupt: {e}") from None
    if meta.get("format") != FORMAT:
        raise LmlabError(f"{f}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def read_order(stack: str | Path) -> dict[str, Any]:
    f = Path(stack) / "order.json"
    if not f.is_file():
        raise LmlabError(f"{stack} has no sorted order yet (order.json); rerun 'lmlab compress bitstack' with the "
                         f"same --out to finish sorting")
    return json.loads(f.read_text())


def _check_file(stack: Path, name: str, meta: dict[str, Any]) -> Path:
    f = stack / name
    if not f.is_file():
        raise LmlabError(f"{f} is missing")
    want = meta["files"][name]
    if f.stat().st_size != want:
        raise LmlabError(f"{f} is truncated or corrupt: {f.stat().st_size} bytes, expected {want}")
    return f


class _Reader:
    """Lazy reads of single tensors (safetensors ``safe_open``), with block checksums."""

    def __init__(self, stack: Path, meta: dict[str, Any]):
        from safetensors import safe_open

        self.meta = meta
        path = _check_file(stack, "blocks.safetensors", meta)
        try:
            self.f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise LmlabError(f"{path} is corrupt: {e}") from None
        self.path = path

    def block(self, j: int, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        try:
            t = tuple(self.f.get_tensor(f"{j}.{i}.{p}") for p in ("signs", "u", "vt"))
        except Exception as e:
            raise LmlabError(f"{self.path}: cannot read block {i} of stack {j}: {e}") from None
        if _digest(*t) != self.meta["checksums"][j][i]:
            raise LmlabError(f"{self.path}: block {i} of stack {j} is corrupt (checksum mismatch)")
        return t  # type: ignore[return-value]


def _skeleton(stack: Path, meta: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(stack / "model")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@dataclass
class StackState:
    """What a loaded BitStack model knows about its artifact (``model.bitstack``)."""

    stack: Path
    meta: dict[str, Any]
    order_name: str
    order: list[int]
    sizes: list[int]
    steps: int
    model: Any = field(repr=False, default=None)

    @property
    def counts(self) -> list[int]:
        return counts_at(self.order, len(self.meta["stacks"]), self.steps)

    @property
    def bytes(self) -> int:
        """Weight bytes of the loaded configuration (the size table's number)."""
        return self.sizes[self.steps]

    def resize(self, max_memory: str | int) -> dict[str, int]:
        """Move to the largest prefix fitting ``max_memory``; reads or drops only the differing blocks."""
        steps = _steps_for(self.sizes, parse_bytes(max_memory), self.meta)
        before = self.counts
        self.steps = steps
        after = self.counts
        reader = _Reader(self.stack, self.meta) if any(a > b for a, b in zip(after, before)) else None
        mods = _stack_modules(self.model, self.meta)
        added = dropped = 0
        for j, a in enumerate(after):
            mod = mods[j]
            while mod.n_blocks > a:
                mod.drop_block()
                dropped += 1
            while mod.n_blocks < a:
                mod.add_block(*[t.to(_dev(mod)) for t in reader.block(j, mod.n_blocks)])  # type: ignore[union-attr]
                added += 1
        log.info("resized to %s: +%d / -%d blocks", fmt_bytes(self.bytes), added, dropped)
        return {"added": added, "dropped": dropped, "bytes": self.bytes}


def _dev(mod: BitStackLinear) -> torch.device:
    return mod.scale.device if mod.scale is not None else (mod.b0_signs.device if mod.n_blocks else torch.device("cpu"))


def _stack_modules(model: nn.Module, meta: dict[str, Any]) -> list[BitStackLinear]:
    return [model.get_submodule(s["name"]) for s in meta["stacks"]]  # type: ignore[misc]


def _steps_for(sizes: list[int], budget: int, meta: dict[str, Any]) -> int:
    steps = pick_steps(sizes, budget)
    if steps < 0:
        raise LmlabError(f"memory budget {fmt_bytes(budget)} is below this stack's minimum {fmt_bytes(sizes[0])} "
                         f"(one block per layer + {fmt_bytes(meta['extra_bytes'])} of uncompressed tensors)")
    return steps


def build(stack: str | Path, counts: list[int] | None = None, device: str | torch.device = "cpu",
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """A HF model with BitStack linears holding ``counts[j]`` blocks (default: all), non-decomposed tensors
    from the artifact (fp16 values in ``dtype``)."""
    from safetensors.torch import load_file

    stack = Path(stack)
    meta = read_meta(stack)
    stacks = meta["stacks"]
    counts = counts or [meta["niter"]] * len(stacks)
    model = _skeleton(stack, meta, dtype)
    extra_path = _check_file(stack, "extra.safetensors", meta)
    try:
        extra = load_file(str(extra_path))
    except Exception as e:
        raise LmlabError(f"{extra_path} is corrupt: {e}") from None
    state = {k: v for k, v in extra.items() if not k.startswith("scale.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = {id(t) for k, t in model.state_dict(keep_vars=True).items() if k in state}
    allowed = {s["name"] + ".weight" for s in stacks} | set(meta.get("tied", []))
    bad = [k for k in missing if k not in allowed and id(model.state_dict(keep_vars=True)[k]) not in loaded]
    if bad or unexpected:
        raise LmlabError(f"{extra_path} does not match the architecture: missing {bad[:3]}, unexpected "
                         f"{list(unexpected)[:3]}")
    reader = _Reader(stack, meta)
    for j, s in enumerate(stacks):
        old = model.get_submodule(s["name"])
        m, n = s["shape"]
        scale = extra.get(f"scale.{j}")
        bias = old.bias.data if getattr(old, "bias", None) is not None else None
        mod = BitStackLinear(n, m, s["k"], scale, bias)
        for i in range(counts[j]):
            mod.add_block(*reader.block(j, i))
        mod.set_compute_dtype(dtype)
        _set_module(model, s["name"], mod)
    return model.to(device).eval()


def load(stack: str | Path, max_memory: str | int | None = None, order: str = "average",
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a BitStack at a weight-byte budget: the largest prefix of the sorted ``order`` that fits.

    ``max_memory``: ``"3000MiB"``, ``"3000MB"`` (decimal), ``"2.5GB"`` or a byte count; None = everything.
    Returns the HF model; ``model.bitstack`` (:class:`StackState`) has ``bytes``, ``counts`` and ``resize()``.
    The budget counts stored weight bytes (packed signs, fp16 factors and scales, non-decomposed tensors at fp16);
    with ``dtype=torch.float16`` the loaded tensors take exactly that many bytes."""
    stack = Path(stack)
    meta = read_meta(stack)
    if order not in ORDERS:
        raise LmlabError(f"order must be one of {ORDERS}, got {order!r}")
    orders = read_order(stack)
    seq = orders["orders"][order]
    sizes = size_table(meta["base_bytes"], [s["block_bytes"] for s in meta["stacks"]], seq)
    steps = len(seq) if max_memory is None else _steps_for(sizes, parse_bytes(max_memory), meta)
    counts = counts_at(seq, len(meta["stacks"]), steps)
    model = build(stack, counts, device, dtype)
    model.bitstack = StackState(stack, meta, order, seq, sizes, steps, model)  # type: ignore[assignment]
    log.info("loaded %s at %s (%d of %d steps, %s order)", stack, fmt_bytes(sizes[steps]), steps, len(seq), order)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a loaded BitStack model holds: every BitStack layer's stored blocks and scale, plus
    every other parameter at its loaded dtype (tied tensors once). Transient caches are not counted."""
    total = 0
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, BitStackLinear):
            total += mod.stored_bytes()
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.nbytes
    return total


def export_hf(model: nn.Module, out: str | Path, tok: Any = None) -> Path:
    """Save a loaded BitStack model as a plain HF folder (reconstructed dense weights) at its current budget."""
    import copy

    plain = copy.deepcopy(model)
    if hasattr(plain, "bitstack"):
        del plain.bitstack
    for name, mod in list(plain.named_modules()):
        if isinstance(mod, BitStackLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.weight.detach().clone()
            if mod.bias is not None:
                lin.bias.data = mod.bias.detach().clone()
            _set_module(plain, name, lin)
    plain.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return Path(out)


# ----------------------------------------------------------------------------------------------------------
# decomposition + scoring


def decompose_model(model: nn.Module, linears: dict[str, nn.Linear], niter: int, k: int,
                    scales: dict[str, torch.Tensor] | None, progress: bool = True
                    ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], list[list[float]]]:
    """AVD of every linear. Returns ``(stack infos, {tensor name: tensor} for blocks.safetensors, residual
    norms per stack)``."""
    infos, tensors, norms = [], {}, []
    it: Any = list(linears.items())
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="decompose", unit="linear")
    for j, (name, lin) in enumerate(it):
        W = lin.weight.detach().float().cpu()  # (m, n)
        m, n = W.shape
        kk = k or default_k(m, n)
        s = scales[name] if scales is not None else None
        Ws = W * s.half().float()[None, :] if s is not None else W  # R_0 = W diag(s) with the stored fp16 s
        blocks, rn = avd_decompose(Ws, niter, kk)
        sums = []
        for i, (packed, u, vt) in enumerate(blocks):
            tensors[f"{j}.{i}.signs"], tensors[f"{j}.{i}.u"], tensors[f"{j}.{i}.vt"] = packed, u, vt
            sums.append(_digest(packed, u, vt))
        infos.append({"name": name, "shape": [m, n], "k": kk, "block_bytes": block_bytes(m, n, kk),
                      "scale_bytes": 2 * n if s is not None else 0, "checksums": sums})
        norms.append(rn)
    return infos, tensors, norms


def windows_ppl(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity over ``(N, T)`` token windows (every token after the first of a window is scored)."""
    dev = next(model.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            x = windows[s:s + batch_size].to(dev)  # (B, T)
            logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            n += x[:, 1:].numel()
    return math.exp(total / n)


def score_levels(model: nn.Module, mods: list[BitStackLinear], niter: int, windows: torch.Tensor,
                 done: list[list[float]], save: Any = None, progress: bool = True) -> list[list[float]]:
    """BitStack importance scores: for each level b (from ``len(done)+1``), every stack at b blocks except one
    at b+1 -> perplexity. ``save(scores)`` is called after each level (resumable)."""
    scores = [list(x) for x in done]
    todo = (niter - 1 - len(scores)) * len(mods)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, desc="sort", unit="eval")
    try:
        for b in range(len(scores) + 1, niter):
            for mod in mods:
                mod.set_active(b)
            level = []
            for mod in mods:
                mod.set_active(b + 1)
                level.append(windows_ppl(model, windows))
                mod.set_active(b)
                if bar is not None:
                    bar.update(1)
            scores.append(level)
            if save is not None:
                save(scores)
    finally:
        if bar is not None:
            bar.close()
        for mod in mods:
            mod.set_active(None)
    return scores


def proxy_scores(model: nn.Module, mods: list[BitStackLinear], niter: int) -> list[list[float]]:
    """Data-free importance: for level b, the reduction of ``||W - W_hat||_F^2`` (original space) when stack j
    goes from b to b+1 blocks, per byte, negated (smaller = more useful, like perplexity)."""
    scores = []
    errs = []
    for mod in mods:
        shape = (mod.out_features, mod.in_features)
        blocks = [(getattr(mod, f"b{i}_signs"), getattr(mod, f"b{i}_u"), getattr(mod, f"b{i}_vt"))
                  for i in range(mod.n_blocks)]
        full = reconstruct(blocks, shape, mod.scale)
        part = torch.zeros(shape, device=full.device)
        e = []
        for packed, u, vt in blocks:
            part += unpack_signs(packed, shape) * (u.float() @ vt.float())
            approx = part / mod.scale.float()[None, :] if mod.scale is not None else part
            e.append(float(((full - approx) ** 2).sum()))
        errs.append(e)
    for b in range(1, niter):
        scores.append([-(errs[j][b - 1] - errs[j][b]) / block_bytes(m.out_features, m.in_features, m.k)
                       for j, m in enumerate(mods)])
    return scores


# ----------------------------------------------------------------------------------------------------------
# `lmlab compress bitstack`


@dataclass
class BitStackConfig(RunArgs):
    """Decompose a model into a BitStack (activation-aware AVD) and sort its blocks; the run dir is the stack."""

    model: str = "ref:dense"
    """Model spec (ref:NAME, HF name or path)."""
    niter: int = 16
    """Blocks per linear (paper: 16)."""
    k: int = 0
    """Rank of each block's |R| approximation; 0 = auto (overhead ~1/8 bit/weight: 16 at 4096^2, 1 at 128^2)."""
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES))
    """Names of the linears to decompose (last name component)."""
    calib: str = "code,prose,math"
    """Calibration + sorting text: built-in domains (train split) or a text/jsonl/parquet path."""
    calib_samples: int = 32
    """Calibration windows for the activation scales (paper: 256 x 2048 tokens)."""
    sort_samples: int = 16
    """Sorting windows for the importance scores (paper: 32 x 2048 tokens; on ref:dense 16 x 256 beat 4 x 256 by 0.04
    bits/byte at 2 bits/param and fixed the order at high budgets, for ~35% more sorting time)."""
    seqlen: int = 256
    """Tokens per calibration / sorting window."""
    scale: bool = True
    """Activation-aware scaling (--no-scale: the paper's ablation, s = 1)."""
    data_free: bool = False
    """No text at all: s = 1 and a weight-space sort (reduction of ||W - W_hat||_F^2 per byte); lower quality."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.niter <= 64:
            raise ConfigError(f"niter must be in 1..64, got {self.niter}")
        if self.k < 0 or self.calib_samples < 1 or self.sort_samples < 1 or self.seqlen < 2:
            raise ConfigError("need k >= 0, calib_samples >= 1, sort_samples >= 1, seqlen >= 2")
        if not self.modules:
            raise ConfigError("give at least one module name")


def _settings(cfg: BitStackConfig) -> dict[str, Any]:
    return {"model": cfg.model, "niter": cfg.niter, "k": cfg.k, "modules": list(cfg.modules), "calib": cfg.calib,
            "calib_samples": cfg.calib_samples, "sort_samples": cfg.sort_samples, "seqlen": cfg.seqlen,
            "scale": cfg.scale and not cfg.data_free, "data_free": cfg.data_free, "seed": cfg.seed}


def decompose(cfg: BitStackConfig, out: Path, model: nn.Module, tok: Any, linears: dict[str, nn.Linear],
              calib: torch.Tensor | None, progress: bool = True) -> dict[str, Any]:
    """Write ``bitstack.json``, ``blocks.safetensors``, ``extra.safetensors`` and ``model/`` into ``out``."""
    from safetensors.torch import save_file

    from lmlab.core.runs import atomic_write, write_json

    settings = _settings(cfg)
    t0 = time.perf_counter()
    scales = activation_scales(model, linears, calib) if settings["scale"] else None
    infos, tensors, norms = decompose_model(model, linears, cfg.niter, cfg.k, scales, progress)
    skip = {id(lin.weight) for lin in linears.values()}
    extra: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    tied = []
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in skip:
            continue
        if id(p) in seen:  # tied (e.g. lm_head = embed_tokens): stored once
            tied.append(name)
            continue
        seen[id(p)] = name  # parameters and persistent buffers
        extra[name] = p.detach().half().contiguous()
    if scales is not None:
        for j, name in enumerate(linears):
            extra[f"scale.{j}"] = scales[name].half().contiguous()
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    for fname, data in (("blocks.safetensors", tensors), ("extra.safetensors", extra)):
        tmp = out / f".{fname}.tmp"
        save_file(data, str(tmp))
        tmp.replace(out / fname)
    ebytes = sum(t.nbytes for t in extra.values())  # the uncompressed tensors at fp16
    if scales is not None:
        ebytes -= sum(scales[n].half().nbytes for n in linears)
    sbytes = sum(i["scale_bytes"] for i in infos)
    base = ebytes + sbytes + sum(i["block_bytes"] for i in infos)
    meta = {"format": FORMAT, "settings": settings, "model": cfg.model, "niter": cfg.niter,
            "calib_hash": text_hash(calib) if calib is not None else None,
            "calib_samples": int(calib.shape[0]) if calib is not None else 0,
            "seqlen": cfg.seqlen,
            "stacks": [{k: v for k, v in i.items() if k != "checksums"} for i in infos],
            "checksums": [i["checksums"] for i in infos], "tied": tied,
            "extra_bytes": ebytes, "scale_bytes": sbytes, "base_bytes": base,
            "max_bytes": base + (cfg.niter - 1) * sum(i["block_bytes"] for i in infos),
            "params": sum(lin.weight.numel() for lin in linears.values()),
            "residual_norms": norms, "decompose_seconds": round(time.perf_counter() - t0, 2),
            "files": {f: (out / f).stat().st_size for f in ("blocks.safetensors", "extra.safetensors")}}
    atomic_write(out / "bitstack.json", json.dumps(meta, indent=1) + "\n")
    write_json(out / "scores.json", {"levels": []})
    return meta


def write_orders(out: Path, meta: dict[str, Any], scores: list[list[float]], seed: int) -> dict[str, Any]:
    from lmlab.core.runs import write_json

    n = len(meta["stacks"])
    bb = [s["block_bytes"] for s in meta["stacks"]]
    orders = {"average": order_average(scores), "greedy": order_greedy(scores),
              "random": order_random(n, meta["niter"] - 1, seed)}
    doc = {"orders": orders, "sizes": {k: size_table(meta["base_bytes"], bb, v) for k, v in orders.items()}}
    write_json(out / "order.json", doc)
    return doc


def main(cfg: BitStackConfig) -> Path:
    from lmlab.core.models import load as load_hf
    from lmlab.core.runs import read_json, start_run, write_json
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    model, tok = load_hf(cfg.model, "cpu", torch.float32, cfg.trust_remote_code)
    linears = find_linears(model, cfg.modules)  # no decomposable linears / NaN weights: error before the run dir
    calib = sort_w = None
    if not cfg.data_free:
        texts = texts_for(cfg.calib, "train", seed=cfg.seed)
        calib = token_windows(tok, texts, cfg.calib_samples, cfg.seqlen, cfg.seed)
        sort_w = token_windows(tok, texts, cfg.sort_samples, cfg.seqlen, cfg.seed + 1)
    with start_run(cfg, "compress-bitstack", device=dev, dtype=dtype, threads=threads) as run:
        out = run.path
        t0 = time.perf_counter()
        meta = None
        if (out / "bitstack.json").is_file():
            old = read_meta(out)
            if old["settings"] == _settings(cfg):
                meta = old
                log.info("reusing the decomposition in %s", out)
            else:
                raise LmlabError(f"{out} holds a BitStack built with other settings; pass a new --out")
        if meta is None:
            meta = decompose(cfg, out, model, tok, linears, calib)
        t_dec = time.perf_counter() - t0
        full = build(out, None, dev, torch.float32)
        mods = _stack_modules(full, meta)
        t1 = time.perf_counter()
        if cfg.data_free:
            scores = proxy_scores(full, mods, cfg.niter)
        else:
            done = read_json(out / "scores.json").get("levels", [])
            scores = score_levels(full, mods, cfg.niter, sort_w, done,
                                  save=lambda s: write_json(out / "scores.json", {"levels": s}))
        write_json(out / "scores.json", {"levels": scores})
        doc = write_orders(out, meta, scores, cfg.seed)
        t_sort = time.perf_counter() - t1
        sizes = doc["sizes"]["average"]
        results = {"stack": str(out), "n_stacks": len(meta["stacks"]), "niter": cfg.niter,
                   "min_bytes": sizes[0], "max_bytes": sizes[-1], "steps": len(sizes),
                   "params": meta["params"],
                   "min_bits_per_param": (sizes[0] - meta["extra_bytes"]) * 8 / meta["params"],
                   "max_bits_per_param": (sizes[-1] - meta["extra_bytes"]) * 8 / meta["params"],
                   "decompose_seconds": round(t_dec, 2), "sort_seconds": round(t_sort, 2)}
        from lmlab.core.plotting import line_plot

        first = [float(np.mean([r[1] / r[0] if r[0] else 0.0 for r in meta["residual_norms"]]))]
        ratio = [float(np.mean([r[i] / r[0] if r[0] else 0.0 for r in meta["residual_norms"]]))
                 for i in range(cfg.niter + 1)]
        results["mean_residual_ratio_after_1"] = first[0]
        line_plot(run.plots / "residual_norm.png", list(range(cfg.niter + 1)), {"mean ||R_i|| / ||W||": ratio},
                  title="AVD residual (scaled space)", xlabel="blocks", ylabel="relative Frobenius norm")
        log.info("BitStack: %d stacks x %d blocks, %s .. %s (%d sizes); decompose %.1fs, sort %.1fs",
                 len(meta["stacks"]), cfg.niter, fmt_bytes(sizes[0]), fmt_bytes(sizes[-1]), len(sizes), t_dec, t_sort)
        run.finish(results)
    return run.path


# ----------------------------------------------------------------------------------------------------------
# `lmlab compress load` / `lmlab compress bitstack-sizes`


@dataclass
class LoadConfig(RunArgs):
    """Load a BitStack at a memory budget, report exact bytes, evaluate, and optionally export a HF folder."""

    stack: str = ""
    """BitStack folder (the run dir of 'lmlab compress bitstack')."""
    max_memory: list[str] = field(default_factory=lambda: ["max"])
    """Weight-byte budgets, e.g. 3000MiB, 3000MB (decimal), 2.5GB or bytes; 'max' = everything. Comma-separated
    for several (the model is resized in place between them)."""
    order: str = "average"
    """Block order: average (paper) | greedy | random (ablations)."""
    eval: str = "ppl"
    """ppl: bits/byte + perplexity on held-out text; none: just load."""
    eval_data: str = "code,prose,math"
    """Held-out text: built-in domains (validation split) or a path."""
    max_tokens: int = 4096
    """Tokens scored per evaluation source."""
    samples: int = 1
    """Greedy generations per budget written to samples.jsonl (0: none)."""
    export: str | None = None
    """Save the model at the last budget as a plain HF folder here."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {list(ORDERS)}, got {self.order!r}")
        if self.eval not in ("ppl", "none"):
            raise ConfigError(f"eval must be ppl or none, got {self.eval!r}")
        for b in self.max_memory:
            if b != "max":
                parse_bytes(b)


def load_main(cfg: LoadConfig) -> Path:
    from transformers import AutoTokenizer

    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.evaluate.perplexity import PROMPTS, greedy_sample

    if not cfg.stack:
        raise ConfigError("give a BitStack folder (STACK)")
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    meta = read_meta(cfg.stack)
    orders = read_order(cfg.stack)
    sizes = orders["sizes"][cfg.order]
    budgets = [sizes[-1] if b == "max" else parse_bytes(b) for b in cfg.max_memory]
    for b in budgets:
        _steps_for(sizes, b, meta)  # a budget below the minimum fails before the run dir exists
    model = load(cfg.stack, budgets[0], cfg.order, dev, dtype)
    tok = AutoTokenizer.from_pretrained(Path(cfg.stack) / "model")
    evalset = EvalSet.build(tok, cfg.eval_data, cfg.max_tokens) if cfg.eval == "ppl" else None
    with start_run(cfg, "compress-load", device=dev, dtype=dtype, threads=threads) as run:
        rows, samples = [], []
        for i, b in enumerate(budgets):
            moved = model.bitstack.resize(b) if i else {"added": sum(model.bitstack.counts), "dropped": 0}
            st = model.bitstack
            row = {"budget": b, "bytes": st.bytes, "steps": st.steps, "blocks": sum(st.counts),
                   "bits_per_param": (st.bytes - meta["extra_bytes"]) * 8 / meta["params"],
                   "resident_bytes": weight_bytes(model), "moved": moved}
            if evalset is not None:
                ev = evalset.evaluate(model)
                row.update(bpb=ev["bpb"], ppl=ev["ppl"], domains=ev["domains"])
            rows.append(row)
            run.log({k: v for k, v in row.items() if k not in ("domains", "moved")})
            log.info("budget %s -> %s exact weight bytes, %.3f bits/param%s", fmt_bytes(b), f"{st.bytes:,}",
                     row["bits_per_param"], f", {row['bpb']:.4f} bits/byte" if "bpb" in row else "")
            for prompt in PROMPTS[: cfg.samples * len(PROMPTS)]:
                samples.append({"budget": st.bytes, "prompt": prompt,
                                "completion": greedy_sample(model, tok, prompt)})
        if samples:
            run.write_samples(samples)
        if cfg.export:
            export_hf(model, cfg.export, tok)
        run.finish({"stack": str(cfg.stack), "order": cfg.order, "results": rows})
    return run.path


@dataclass
class SizesConfig:
    """Print a BitStack's size range: min, max, number of sizes, step sizes."""

    stack: str = ""
    """BitStack folder."""
    order: str = "average"
    """average | greedy | random."""

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {list(ORDERS)}, got {self.order!r}")


def sizes_main(cfg: SizesConfig) -> str:
    if not cfg.stack:
        raise ConfigError("give a BitStack folder (STACK)")
    meta = read_meta(cfg.stack)
    sizes = read_order(cfg.stack)["sizes"][cfg.order]
    steps = np.diff(sizes) if len(sizes) > 1 else np.zeros(1)
    bpp = [(s - meta["extra_bytes"]) * 8 / meta["params"] for s in (sizes[0], sizes[-1])]
    lines = [f"BitStack {cfg.stack} ({meta['model']}, {len(meta['stacks'])} layers x {meta['niter']} blocks, "
             f"{cfg.order} order)",
             f"min   {fmt_bytes(sizes[0])}  ({bpp[0]:.3f} bits/param in compressed layers)",
             f"max   {fmt_bytes(sizes[-1])}  ({bpp[1]:.3f} bits/param)",
             f"sizes {len(sizes)}; step {int(steps.min()):,} .. {int(steps.max()):,} B",
             f"uncompressed tensors (fp16): {fmt_bytes(meta['extra_bytes'])}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# tour section


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """Build a small BitStack of ref:dense, plot bits/byte vs bytes, and generate at two budgets."""
    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.evaluate.perplexity import greedy_sample

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    niter = 8 if cfg.full else 4
    bcfg = BitStackConfig(out=str(out / "stack"), seed=cfg.seed, threads=cfg.threads, niter=niter,
                          calib_samples=32 if cfg.full else 8, sort_samples=8 if cfg.full else 2,
                          seqlen=256 if cfg.full else 128)
    stack = main(bcfg)
    sub = RunArgs(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    meta = read_meta(stack)
    sizes = read_order(stack)["sizes"]["average"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(stack) / "model")
    evalset = EvalSet.build(tok, "code,prose,math", 4096 if cfg.full else 1024)
    with start_run(sub, "tour-compress", device=dev, dtype=dtype, threads=threads) as run:
        npts = 8 if cfg.full else 5
        budgets = sorted({sizes[round(i * (len(sizes) - 1) / (npts - 1))] for i in range(npts)})
        model = load(stack, budgets[0], device=dev, dtype=dtype)
        curve, samples = [], []
        prompt = "def read_config(path):\n"
        for i, b in enumerate(budgets):
            if i:
                model.bitstack.resize(b)
            ev = evalset.evaluate(model)
            bpp = (model.bitstack.bytes - meta["extra_bytes"]) * 8 / meta["params"]
            curve.append({"bytes": model.bitstack.bytes, "bits_per_param": bpp, "bpb": ev["bpb"]})
            if i in (0, len(budgets) - 1):
                samples.append({"budget": model.bitstack.bytes, "bits_per_param": round(bpp, 3), "prompt": prompt,
                                "completion": greedy_sample(model, tok, prompt, 32)})
        run.write_samples(samples)
        line_plot(run.plots / "bitstack_curve.png", [c["bits_per_param"] for c in curve],
                  {"BitStack (sorted)": [c["bpb"] for c in curve]}, title="ref:dense BitStack: quality vs size",
                  xlabel="bits/param (compressed linears)", ylabel="val bits/byte")
        run.finish({"stack": str(stack), "curve": curve})
    text = [f"BitStack of ref:dense ({len(meta['stacks'])} linears x {niter} blocks): one artifact, "
            f"{len(sizes)} sizes from {fmt_bytes(sizes[0])} to {fmt_bytes(sizes[-1])}."]
    text += [f"  {c['bytes']:,} B ({c['bits_per_param']:.2f} bits/param): {c['bpb']:.3f} bits/byte" for c in curve]
    text += [f"  sample at {s['bits_per_param']} bits/param: {s['completion'][:60]!r}" for s in samples]
    return run.path, "\n".join(text)
