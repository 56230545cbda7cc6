"""Top-K sparse autoencoders on every layer and sublayer: the Llama Scope recipe (``lmlab interp sae``).

Paper: Z. He et al., *Llama Scope: Extracting Millions of Features from Llama-3.1-8B with Sparse Autoencoders*,
arXiv 2410.20526 (code: OpenMOSS/Language-Model-SAEs @ a05e45a9). Dead-latent loss from L. Gao et al., *Scaling
and evaluating sparse autoencoders*, arXiv 2406.04093 (AuxK).

An SAE reads an activation ``x`` (d_in) at hook point ``hook_name`` and reconstructs ``y`` (d_out) at
``hook_name_out`` (the same point for an SAE; a later one for a *transcoder*, e.g. MLP input -> MLP output)::

    x~ = s_in * x,   y~ = s_out * y,   s = sqrt(d) / E||x||           dataset-wise normalization (8 batches)
    h  = W_E x~ + b_E                                                 (N, d_sae)  no b_D subtracted first
    I  = TopK_k( ReLU(h) * ||W_D,i|| )                                decoder-norm-aware selection
    f_i = ReLU(h)_i  for i in I,  0 otherwise                         exactly k non-zeros per token
    y^~ = W_D f + b_D                                                 (N, d_out)
    L  = FVU = sum (y^~ - y~)^2 / sum (y~ - mean_batch y~)^2          normalized reconstruction loss
         + alpha * AuxK,  AuxK = nmse(W_D TopK_{k_aux}(ReLU(h) on dead latents), (y~ - y^~).detach())

Defaults (Llama Scope, ``examples/replicate_llamascope_sae.sh``): k = 50; k annealed linearly from
``k_start = d_in / 2`` down to k over the first 10% of steps, ``k_t = ceil(max(1, k0/k + (1 - k0/k) t/T_w) k)``;
init ``W_D`` Kaiming-uniform with every decoder row rescaled to norm 0.5, ``W_E = W_D^T``, zero biases;
Adam(0.9, 0.9999), lr 8e-4, linear warm-up (5000 steps, capped at 10% of the run), constant, then linear
cool-down over the last 20% to ``0.01 * lr``. AuxK (OpenAI: coefficient 1/32, k_aux = d_in / 2, a latent is
dead after not firing for ``dead_tokens``) is on by default (``auxk=false`` for the 2024 Llama Scope recipe).
Beyond the paper (off by default): ``init_b_dec=mean|geometric_median`` starts ``b_D`` at the data centre and
``b_E = -W_E b_D`` (OpenAI's ``b_pre`` init, i.e. mean-centred inputs at step 0).

After training both the normalization and the decoder norms are folded into the weights, so a saved SAE takes raw
activations and has unit decoder rows (outputs unchanged, see :meth:`SAE.fold`)::

    b_E /= s_in;  W_D *= s_in / s_out;  b_D /= s_out                   (features scale by 1 / s_in)
    n_i = ||W_D,i||:  W_D,i /= n_i;  W_E[:, i] *= n_i;  b_E,i *= n_i   (TopK order and W_D f are unchanged)

TopK -> JumpReLU (``f_i = h_i [h_i > theta_i]``, features fire independently): Llama Scope sets one global theta
as the (N k)-th largest ReLU pre-activation over N tokens (mean L0 = k); lmlab also offers per-feature thresholds
that keep each feature's TopK firing rate (``JUMPRELU = {"global", "per_feature"}``).

Training speed (as in EleutherAI sparsify): the decoder is a sparse ``embedding_bag`` over the k active rows, and
the encoder backward only touches the selected (token, latent) pairs (:class:`_SparseEncode`), so one step costs
one dense encoder matmul plus O(N k d) work instead of three dense matmuls.

Files: SAELens layout (``cfg.json`` + ``sae_weights.safetensors`` + ``sparsity.safetensors``) is written and
read; the Llama Scope layout (``hyperparams.json`` + ``checkpoints/final.safetensors``) is read.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

ARCHITECTURES = ("topk", "jumprelu")
SAE_WEIGHTS, SAE_CFG, SAE_SPARSITY = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors"


# ----------------------------------------------------------------------------------------------------------
# pure maths


def fvu(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained ``sum (y^ - y)^2 / sum (y - mean_batch y)^2`` over a batch (N, d).

    Explained variance is ``1 - fvu`` (pooled over all dimensions, as SAELens' ``explained_variance``)."""
    denom = (y - y.mean(0, keepdim=True)).pow(2).sum()
    return (y_hat - y).pow(2).sum() / denom.clamp_min(1e-12)


def k_schedule(step: int, total_steps: int, k: int, k_start: int, anneal_frac: float = 0.1) -> int:
    """Llama Scope K annealing: linear from ``k_start`` to ``k`` over the first ``anneal_frac`` of the steps."""
    t_w = max(1, int(anneal_frac * total_steps))
    if k_start <= k or step >= t_w:
        return k
    ratio = k_start / k
    return int(math.ceil(max(1.0, ratio + (1.0 - ratio) * step / t_w) * k))


def lr_factor(step: int, total_steps: int, warmup: int, cooldown_frac: float = 0.2, end_ratio: float = 0.01
              ) -> float:
    """Warm-up (linear from 0), constant, then linear cool-down over the last ``cooldown_frac`` to ``end_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    cool_start = int(total_steps * (1.0 - cooldown_frac))
    if cooldown_frac > 0 and step >= cool_start:
        frac = (step - cool_start) / max(1, total_steps - cool_start)
        return 1.0 - (1.0 - end_ratio) * frac
    return 1.0


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising ``sum_i ||x_i - m||`` for x (N, d) -> (d,)."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(eps)  # (N,)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() <= eps * (1 + m.norm()):
            return m_new
        m = m_new
    return m


B_DEC_INITS = {"zero": None, "mean": lambda x: x.mean(0), "geometric_median": geometric_median}


def topk_select(pre: torch.Tensor, k: int, dec_norm: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-norm-aware TopK: indices of the k largest ``ReLU(h) * ||W_D,i||``; values ``ReLU(h)`` there.

    pre (N, d_sae), dec_norm (d_sae,) or None -> values (N, k) >= 0, indices (N, k) int64."""
    score = pre * dec_norm if dec_norm is not None else pre  # ReLU(h) * n = ReLU(h * n) for n > 0
    idx = score.topk(k, dim=-1, sorted=False).indices  # (N, k)
    return pre.gather(-1, idx).relu(), idx


def _transpose_plan(idx: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR structure of G^T for a row-sparse G (N, n_cols) with non-zeros at ``(n, idx[n, j])``.

    Returns (order, crow, col): the nnz of G^T in CSR order are ``vals.reshape(-1)[order]``."""
    m = idx.shape[1]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    crow = torch.zeros(n_cols + 1, dtype=torch.long, device=idx.device)
    crow[1:] = torch.bincount(flat, minlength=n_cols).cumsum(0)
    return order, crow, order // m


def _gt_mm(plan: tuple[torch.Tensor, ...], vals: torch.Tensor, dense: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``G^T @ dense`` with ``G[n, idx[n, j]] = vals[n, j]``: (n_cols, d), O(N k d) work (CSR kernel)."""
    order, crow, col = plan
    with warnings.catch_warnings():  # "CSR support is in beta": stable for the SpMM used here
        warnings.simplefilter("ignore", UserWarning)
        gt = torch.sparse_csr_tensor(crow, col, vals.reshape(-1)[order], (n_cols, dense.shape[0]),
                                     check_invariants=False)
    return gt @ dense


def _rows_dot(idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[n, j] = <a[n], b[idx[n, j]]>``: a (N, d), b (n_cols, d) -> (N, m) (sampled dense-dense matmul;
    ``idx`` rows must be sorted)."""
    n, m = idx.shape
    crow = torch.arange(0, n * m + 1, m, device=idx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.ones(n * m, dtype=a.dtype, device=a.device),
                                          (n, b.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values().reshape(n, m)


class _SparseEncode(torch.autograd.Function):
    """``h[n, idx[n, j]]`` for given indices, with a backward that touches only those (token, latent) pairs.

    forward(x (N, d_in), W_enc (d_in, d_sae), b_enc (d_sae,), idx (N, m), vals (N, m) = those pre-activations,
    already computed by the one dense matmul, segments = [(col_start, col_end, _transpose_plan(idx[:, a:b]))])
    -> vals. Backward, g (N, m):
        dx = sum_j g[n, j] W_enc[:, idx[n, j]]     (embedding_bag over W_enc^T; only if x needs a gradient)
        dW_enc^T = G^T x,  db_enc = G^T 1          (G (N, d_sae) holds g at the selected pairs: sparse CSR)
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, idx, vals, segments):  # noqa: ANN001
        ctx.save_for_backward(x, W_enc, idx)
        ctx.segments = segments
        return vals

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, W_enc, idx = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = g.contiguous()
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            dWt = None  # (d_sae, d_in), summed over the column segments (main TopK, AuxK) of idx
            for a, b, plan in ctx.segments:
                part = _gt_mm(plan, g[:, a:b].contiguous(), x, d_sae)
                dWt = part if dWt is None else dWt + part
            dW = dWt.t()
        if ctx.needs_input_grad[2]:
            db = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return dx, dW, db, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``W_D f`` from k active latents: vals/idx (N, m), W_dec (d_sae, d_out) -> (N, d_out).

    forward: embedding_bag (sum of m rows); backward with go (N, d_out):
        dvals[n, j] = <go[n], W_dec[idx[n, j]]>   (sampled matmul)      dW_dec = G^T go  (sparse CSR)"""

    @staticmethod
    def forward(ctx, vals, idx, W_dec, plan):  # noqa: ANN001
        ctx.save_for_backward(vals, idx, W_dec)
        ctx.plan = plan
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, go):  # noqa: ANN001
        vals, idx, W_dec = ctx.saved_tensors
        go = go.contiguous()
        dv = _rows_dot(idx, go, W_dec) if ctx.needs_input_grad[0] else None
        dW = _gt_mm(ctx.plan, vals, go, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return dv, None, dW, None


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``W_D f + b_D`` from the k active latents only: vals/idx (N, k), W_dec (d_sae, d_out) -> (N, d_out).

    Differentiable in vals, W_dec and b_dec with O(N k d) backward work."""
    if not (torch.is_grad_enabled() and (vals.requires_grad or W_dec.requires_grad)):
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    return _SparseDecode.apply(vals, idx, W_dec, _transpose_plan(idx, W_dec.shape[0])) + b_dec


# ----------------------------------------------------------------------------------------------------------
# the module


class SAE(nn.Module):
    """A Top-K (or JumpReLU) sparse autoencoder / transcoder in SAELens' parameter layout.

    Parameters: ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_out), ``b_dec`` (d_out,);
    buffers ``threshold`` (d_sae,) for JumpReLU and the normalization scales ``scale_in``/``scale_out`` (1 after
    :meth:`fold`). Inputs and outputs are always raw activations."""

    def __init__(self, d_in: int, d_sae: int, k: int, *, d_out: int | None = None, architecture: str = "topk",
                 hook_name: str = "", hook_name_out: str | None = None, model_name: str = "",
                 topk_by_decoder_norm: bool = True, meta: dict[str, Any] | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise LmlabError(f"unknown SAE architecture {architecture!r}; choose from {list(ARCHITECTURES)}")
        if not 1 <= k <= d_sae:
            raise LmlabError(f"k={k} must be between 1 and the dictionary size d_sae={d_sae}")
        d_out = d_out or d_in
        self.d_in, self.d_sae, self.d_out, self.k = d_in, d_sae, d_out, k
        self.architecture = architecture
        self.hook_name, self.hook_name_out = hook_name, hook_name_out or hook_name
        self.model_name = model_name
        self.topk_by_decoder_norm = topk_by_decoder_norm
        self.meta: dict[str, Any] = dict(meta or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("threshold", torch.zeros(d_sae))
        self.register_buffer("scale_in", torch.ones(()))
        self.register_buffer("scale_out", torch.ones(()))

    @property
    def is_transcoder(self) -> bool:
        return self.hook_name_out != self.hook_name

    # -- init ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_llama_scope(self, decoder_norm: float = 0.5, generator: torch.Generator | None = None) -> SAE:
        """Kaiming-uniform W_D with rows of norm ``decoder_norm``; W_E = W_D^T (transcoder: own init, same norm);
        zero biases."""
        W = torch.empty(self.d_sae, self.d_out)
        bound = 1.0 / math.sqrt(self.d_out)  # kaiming_uniform_(a=sqrt(5)) on a (d_sae, d_out) weight
        W.uniform_(-bound, bound, generator=generator)
        W *= decoder_norm / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(W)
        if self.is_transcoder or self.d_in != self.d_out:
            E = torch.empty(self.d_in, self.d_sae).uniform_(-bound, bound, generator=generator)
            self.W_enc.copy_(E * decoder_norm / E.norm(dim=0, keepdim=True).clamp_min(1e-12))
        else:
            self.W_enc.copy_(W.t())
        self.b_enc.zero_()
        self.b_dec.zero_()
        return self

    @torch.no_grad()
    def init_centre(self, x: torch.Tensor, y: torch.Tensor, centre: Any) -> SAE:
        """Centre-init (OpenAI ``b_pre``): ``b_D = centre(s_out y)`` and, for an SAE, ``b_E = -b_D W_E`` so that
        ``h = W_E (x~ - b_D)`` at step 0. x (N, d_in), y (N, d_out) raw activations; call after the scales are set."""
        c = centre((y.float() * self.scale_out).to(self.b_dec.device))  # (d_out,)
        self.b_dec.copy_(c)
        if not self.is_transcoder and self.d_in == self.d_out:
            self.b_enc.copy_(-(c @ self.W_enc))
        return self

    # -- forward -------------------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``h = W_E (s_in x) + b_E``: x (..., d_in) -> (..., d_sae)."""
        return (x * self.scale_in) @ self.W_enc + self.b_enc

    def dec_norm(self) -> torch.Tensor | None:
        return self.W_dec.norm(dim=1) if self.topk_by_decoder_norm else None

    def encode_topk(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse TopK code: x (N, d_in) -> values (N, k), indices (N, k)."""
        return topk_select(self.pre_acts(x), k or self.k, self.dec_norm())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations (..., d_sae): exactly k non-zeros (TopK) or ``h [h > theta]`` (JumpReLU)."""
        shape = x.shape[:-1]
        h = self.pre_acts(x.reshape(-1, self.d_in))
        if self.architecture == "jumprelu":
            f = h * (h > self.threshold)
        else:
            vals, idx = topk_select(h, self.k, self.dec_norm())
            f = torch.zeros_like(h).scatter_(-1, idx, vals)
        return f.reshape(*shape, self.d_sae)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Dense decode ``(W_D f + b_D) / s_out``: (..., d_sae) -> (..., d_out)."""
        return (f @ self.W_dec + self.b_dec) / self.scale_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (..., d_out) of raw activations (..., d_in)."""
        if self.architecture == "topk":
            shape = x.shape[:-1]
            vals, idx = self.encode_topk(x.reshape(-1, self.d_in))
            y = sparse_decode(vals, idx, self.W_dec, self.b_dec) / self.scale_out
            return y.reshape(*shape, self.d_out)
        return self.decode(self.encode(x))

    # -- folding -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> SAE:
        """Fold the normalization scales and the decoder norms into the weights (outputs unchanged)."""
        s_in, s_out = float(self.scale_in), float(self.scale_out)
        self.b_enc /= s_in
        self.threshold /= s_in
        self.W_dec *= s_in / s_out
        self.b_dec /= s_out
        self.scale_in.fill_(1.0)
        self.scale_out.fill_(1.0)
        n = self.W_dec.norm(dim=1).clamp_min(1e-12)  # (d_sae,)
        self.W_dec /= n[:, None]
        self.W_enc *= n[None, :]
        self.b_enc *= n
        self.threshold *= n
        return self

    # -- config --------------------------------------------------------------------------------------------
    def cfg_dict(self) -> dict[str, Any]:
        """SAELens-compatible ``cfg.json`` (v6 fields plus lmlab's own keys)."""
        return {
            "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "d_out": self.d_out,
            "k": self.k, "dtype": str(self.W_enc.dtype).replace("torch.", ""), "device": "cpu",
            "apply_b_dec_to_input": False, "normalize_activations": "none",
            "rescale_acts_by_decoder_norm": self.topk_by_decoder_norm, "reshape_activations": "none",
            "hook_name": self.hook_name, "hook_name_out": self.hook_name_out, "model_name": self.model_name,
            "metadata": {"hook_name": self.hook_name, "hook_name_out": self.hook_name_out,
                         "model_name": self.model_name, "sae_lens_training_version": None, **self.meta},
        }


# ----------------------------------------------------------------------------------------------------------
# I/O


def save_sae(sae: SAE, path: str | Path, sparsity: torch.Tensor | None = None) -> Path:
    """Write the SAELens layout: ``cfg.json``, ``sae_weights.safetensors`` (and ``sparsity.safetensors`` =
    log10 feature density) into folder ``path``. Normalization scales must be folded first."""
    from lmlab.core.runs import save_tensors, write_json

    if float(sae.scale_in) != 1.0 or float(sae.scale_out) != 1.0:
        raise LmlabError("fold() the SAE before saving (normalization scales are not 1)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.architecture == "jumprelu":
        weights["threshold"] = sae.threshold
    save_tensors(path / SAE_WEIGHTS, weights)
    if sparsity is not None:
        save_tensors(path / SAE_SPARSITY, {"sparsity": sparsity.float()})
    write_json(path / SAE_CFG, sae.cfg_dict())
    return path


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmlabError(f"cannot read {p}: {e}") from None


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder: SAELens layout (cfg.json + sae_weights.safetensors) or Llama Scope layout
    (hyperparams.json + checkpoints/final.safetensors). Returns an eval-mode :class:`SAE` on raw activations."""
    from safetensors.torch import load_file

    p = Path(path)
    if (p / SAE_CFG).is_file() and (p / SAE_WEIGHTS).is_file():
        cfg = _read_json(p / SAE_CFG)
        w = load_file(str(p / SAE_WEIGHTS))
        meta = dict(cfg.get("metadata") or {})
        arch = cfg.get("architecture", "topk")
        if arch == "standard" or arch not in ARCHITECTURES:
            raise LmlabError(f"{p}: architecture {arch!r} is not supported (lmlab reads {list(ARCHITECTURES)})")
        d_in, d_sae = w["W_enc"].shape
        sae = SAE(d_in, d_sae, int(cfg.get("k") or meta.get("k") or min(50, d_sae)), d_out=w["W_dec"].shape[1],
                  architecture=arch, hook_name=cfg.get("hook_name") or meta.get("hook_name", ""),
                  hook_name_out=cfg.get("hook_name_out") or meta.get("hook_name_out"),
                  model_name=cfg.get("model_name") or meta.get("model_name", ""),
                  topk_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", True)),
                  meta={k: v for k, v in meta.items() if k not in ("hook_name", "hook_name_out", "model_name")})
        sd = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if "threshold" in w:
            sd["threshold"] = w["threshold"]
        sae.load_state_dict(sd, strict=False)
        if cfg.get("apply_b_dec_to_input"):
            with torch.no_grad():  # h = W_E (x - b_D) + b_E  ==  W_E x + (b_E - b_D W_E)
                sae.b_enc -= sae.b_dec @ sae.W_enc
        return sae.to(device).eval()
    if (p / "hyperparams.json").is_file():
        return _load_llama_scope(p).to(device).eval()
    raise LmlabError(f"{p} is not an SAE folder (expected cfg.json + {SAE_WEIGHTS}, or Llama Scope "
                     "hyperparams.json + checkpoints/final.safetensors)")


def _load_llama_scope(p: Path) -> SAE:
    """Llama Scope: ``encoder.weight`` (d_sae, d_in), ``decoder.weight`` (d_out, d_sae), dataset-wise norms,
    global JumpReLU threshold on ``ReLU(h) * ||W_D,i||`` (or TopK)."""
    from safetensors.torch import load_file

    hp = _read_json(p / "hyperparams.json")
    wfile = p / "checkpoints" / "final.safetensors"
    if not wfile.is_file():
        raise LmlabError(f"{p}: Llama Scope layout without checkpoints/final.safetensors")
    w = load_file(str(wfile))
    d_sae, d_in = w["encoder.weight"].shape
    d_out = w["decoder.weight"].shape[0]
    act = hp.get("act_fn", "topk")
    sae = SAE(d_in, d_sae, int(hp.get("top_k", 50)), d_out=d_out, architecture="jumprelu" if act == "jumprelu"
              else "topk", hook_name=hp.get("hook_point_in", ""), hook_name_out=hp.get("hook_point_out"),
              model_name=hp.get("model_name", ""), topk_by_decoder_norm=bool(hp.get("sparsity_include_decoder_norm",
                                                                                    True)),
              meta={"source": "llama_scope"})
    with torch.no_grad():
        sae.W_enc.copy_(w["encoder.weight"].t())
        sae.b_enc.copy_(w["encoder.bias"])
        sae.W_dec.copy_(w["decoder.weight"].t())
        sae.b_dec.copy_(w["decoder.bias"])
        if hp.get("norm_activation", "dataset-wise") == "dataset-wise" and hp.get("dataset_average_activation_norm"):
            norms = hp["dataset_average_activation_norm"]
            sae.scale_in.fill_(math.sqrt(d_in) / float(norms["in"]))
            sae.scale_out.fill_(math.sqrt(d_out) / float(norms["out"]))
        theta = float(hp.get("jump_relu_threshold", 0.0))
        if sae.topk_by_decoder_norm:  # theta applies to ReLU(h) * ||W_D,i||: in unit-norm form that is h' > theta
            sae.threshold.fill_(theta).div_(sae.W_dec.norm(dim=1).clamp_min(1e-12))
        else:
            sae.threshold.fill_(theta)
    return sae.fold()


def find_saes(path: str | Path) -> list[Path]:
    """SAE folders at ``path``: the folder itself, or every SAE folder below it (a training run dir)."""
    p = Path(path)
    if not p.exists():
        raise LmlabError(f"SAE path not found: {p}")
    if (p / SAE_CFG).is_file() or (p / "hyperparams.json").is_file():
        return [p]
    found = sorted({q.parent for q in p.rglob(SAE_CFG) if (q.parent / SAE_WEIGHTS).is_file()})
    if not found:
        raise LmlabError(f"no SAE under {p} (looked for {SAE_CFG} + {SAE_WEIGHTS})")
    return found


# ----------------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainState:
    """Per-SAE training state (the model, its optimizer and dead-latent bookkeeping)."""

    sae: SAE
    opt: torch.optim.Optimizer
    since_fired: torch.Tensor  # (d_sae,) tokens since each latent last fired
    fired_count: torch.Tensor  # (d_sae,) total firings (feature density)
    tokens: int = 0
    last: dict[str, float] = field(default_factory=dict)


def train_step(sae: SAE, x: torch.Tensor, y: torch.Tensor, k: int, dead: torch.Tensor | None = None,
               k_aux: int = 0, aux_coef: float = 1 / 32, dist: Any = None) -> dict[str, Any]:
    """Loss of one batch (in the SAE's normalized space): x (N, d_in), y (N, d_out) raw activations.

    Returns ``loss`` (a graph), ``fvu``, ``aux``, the TopK ``idx`` (N, k) and ``vals``. With ``dist`` (a
    :class:`lmlab.interp.sae_dist.DistContext`) x/y are the global batch: this rank computes its row shard's part
    of the global FVU (summed over ranks = the single-process loss)."""
    x = x * sae.scale_in
    y = y * sae.scale_out
    den = None
    if dist is not None:
        den = (y - y.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)  # global-batch FVU denominator
        x, y = dist.shard(x), dist.shard(y)
    with torch.no_grad():
        n = sae.dec_norm() if sae.topk_by_decoder_norm else torch.ones(sae.d_sae, device=x.device)  # (d_sae,)
        # score = ReLU(h) * n before the ReLU: one dense matmul with the norms folded into W_E's columns
        score = torch.addmm(sae.b_enc * n, x, sae.W_enc * n)  # (N, d_sae)
        idx = score.topk(k, dim=-1, sorted=False).indices.sort(dim=1).values  # (N, k), rows sorted (CSR)
        main_plan = _transpose_plan(idx, sae.d_sae)
        vals0 = (score.gather(1, idx) / n[idx]).relu()
        use_aux = dead is not None and k_aux > 0 and bool(dead.any())
        if use_aux:
            dead_idx = dead.nonzero().squeeze(1)  # (n_dead,)
            m = min(k_aux, dead_idx.numel())
            aux_pre = score.index_select(1, dead_idx) / n[dead_idx]  # (N, n_dead) pre-activations
            aux_idx = dead_idx[aux_pre.topk(m, dim=-1, sorted=False).indices]  # (N, m)
            aux_plan = _transpose_plan(aux_idx, sae.d_sae)
            all_idx = torch.cat([idx, aux_idx], 1)
            segments = [(0, k, main_plan), (k, k + m, aux_plan)]
        else:
            all_idx, segments = idx, [(0, k, main_plan)]
        all_pre = score.gather(1, all_idx) / n[all_idx]
        del score
    h = _SparseEncode.apply(x, sae.W_enc, sae.b_enc, all_idx, all_pre, segments).relu()  # (N, k [+ m])
    vals = h[:, :k]
    y_hat = _SparseDecode.apply(vals, idx, sae.W_dec, main_plan) + sae.b_dec  # (N, d_out)
    rec = fvu(y_hat, y) if den is None else (y_hat - y).pow(2).sum() / den
    loss = rec
    aux = torch.zeros(())
    if use_aux:
        e = (y - y_hat).detach()  # residual the dead latents should explain
        e_hat = _SparseDecode.apply(h[:, k:], aux_idx, sae.W_dec, aux_plan)
        aux = fvu(e_hat, e) if dist is None else (e_hat - e).pow(2).sum() / dist.global_denom(e)
        loss = loss + aux_coef * aux
    return {"loss": loss, "fvu": rec.detach(), "aux": aux.detach(), "idx": idx, "vals": vals0}  # idx (N, k)


def dataset_scale(x: torch.Tensor) -> float:
    """Dataset-wise normalization factor ``sqrt(d) / E||x||`` (Llama Scope)."""
    mean_norm = float(x.float().norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise LmlabError(f"activation norms are {mean_norm}: cannot normalize (NaN/Inf or all-zero activations)")
    return math.sqrt(x.shape[-1]) / mean_norm


def check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(-1).sum())
        raise LmlabError(f"{name}: {bad} of {x.shape[0]} activation rows contain NaN/Inf; check the model and "
                         "its dtype (try --dtype float32)")


# ----------------------------------------------------------------------------------------------------------
# CLI configs


_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


def parse_count(text: str | int, what: str = "tokens") -> int:
    """``"2M"`` -> 2_000_000, ``"500k"`` -> 500_000, ``4096`` -> 4096."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(text))
        if not m:
            raise ConfigError(f"{what}: expected a count like 2M, 500k or 4096, got {text!r}")
        n = int(float(m[1]) * _SUFFIX.get(m[2].lower(), 1))
    if n < 1:
        raise ConfigError(f"{what} must be >= 1, got {text!r}")
    return n


@dataclass
class SAETrainConfig(RunArgs):
    """Train Top-K SAEs (Llama Scope recipe) on every requested hook point from one pass over the data."""

    model: str = "ref:dense"
    """Model: ref:dense, ref:mamba, a HF name or a local path."""
    hooks: list[str] = field(default_factory=lambda: ["blocks.*.hook_resid_post"])
    """Hook points (comma-separated; wildcards, Llama Scope aliases L3R/L3A/L3M; 'IN->OUT' trains a transcoder)."""
    k: int = 50
    """Active latents per token (L0)."""
    expansion: int = 8
    """Dictionary size = expansion * d_in (ignored when d_sae is set)."""
    d_sae: int = 0
    """Dictionary size (0: expansion * d_in)."""
    tokens: str = "2M"
    """Training tokens per SAE (e.g. 2M, 500k)."""
    batch_size: int = 4096
    """SAE batch in tokens (Llama Scope: 2048)."""
    lr: float = 8e-4
    """Adam learning rate (Llama Scope 8x: 8e-4)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.9999])
    """Adam betas."""
    warmup_steps: int = 5000
    """Linear learning-rate warm-up steps (capped at 10% of the run)."""
    cooldown: float = 0.2
    """Fraction of steps at the end over which the lr decays linearly to lr_end_ratio * lr."""
    lr_end_ratio: float = 0.01
    """Final learning rate as a fraction of lr."""
    k_start: int = 0
    """Initial k of the annealing (0: d_in / 2, as Llama Scope); annealed to k over k_anneal of the steps."""
    k_anneal: float = 0.1
    """Fraction of steps over which k decays from k_start to k (0: off)."""
    init_decoder_norm: float = 0.5
    """Norm of each decoder row at initialization (W_E = W_D^T)."""
    init_b_dec: str = "zero"
    """Decoder-bias init: zero (Llama Scope) | mean | geometric_median (OpenAI/Anthropic: b_D = data centre from the
    normalization probe, and b_E = -W_E b_D so the first encoder sees centred inputs)."""
    normalize: str = "dataset"
    """Input normalization: dataset (x * sqrt(d) / E||x||, folded after training) | none."""
    topk_by_decoder_norm: bool = True
    """Select TopK by ReLU(h) * ||W_D,i|| (Llama Scope) instead of ReLU(h)."""
    auxk: bool = True
    """AuxK dead-latent loss (OpenAI recipe); false reproduces the 2024 Llama Scope recipe."""
    auxk_coef: float = 0.03125
    """AuxK coefficient (1/32)."""
    k_aux: int = 0
    """Dead latents used by AuxK per token (0: d_in / 2)."""
    dead_tokens: int = 0
    """A latent is dead after not firing for this many tokens (0: min(10M, tokens / 20))."""
    clip_grad_norm: float = 0.0
    """Gradient-norm clipping (0: off)."""
    data: str = "code,prose,math"
    """Text: corpus domains (comma-separated), a text/jsonl/parquet path, or hf:NAME."""
    max_bytes: int = 8_000_000
    """Corpus build cap per domain."""
    seq_len: int = 256
    """LM context length in tokens."""
    lm_batch: int = 16
    """Sequences per LM forward."""
    buffer_tokens: int = 500_000
    """Shuffling buffer per SAE in tokens (refilled when half consumed; Llama Scope 500k)."""
    prepend_bos: bool = True
    """Prepend the tokenizer's BOS token to every sequence (its position is excluded from training)."""
    cache: str = ""
    """Folder for on-disk activation shards (safetensors, resumable; reused when it matches); empty: online."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: 10 per run); an interrupted run resumes from the last one."""
    stop_after: int = 0
    """Stop after this many steps of this invocation, keeping a checkpoint (as if interrupted); rerunning the same
    command with the same --out resumes. 0: run to the end."""
    eval_tokens: int = 16_384
    """Held-out tokens for the final quick evaluation (EV, L0, dead, delta CE); 0 skips it."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hooks:
            raise ConfigError("give at least one hook (--hooks)")
        self.n_tokens = parse_count(self.tokens)
        for name in ("k", "batch_size", "seq_len", "lm_batch", "expansion", "buffer_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_sae and self.k > self.d_sae:
            raise ConfigError(f"k={self.k} is larger than the dictionary d_sae={self.d_sae}")
        if self.normalize not in ("dataset", "none"):
            raise ConfigError(f"normalize must be dataset|none, got {self.normalize!r}")
        if self.init_b_dec not in B_DEC_INITS:
            raise ConfigError(f"init_b_dec must be one of {'|'.join(B_DEC_INITS)}, got {self.init_b_dec!r}")
        if self.lr <= 0 or not 0 <= self.cooldown < 1 or not 0 <= self.k_anneal < 1:
            raise ConfigError("need lr > 0, 0 <= cooldown < 1, 0 <= k_anneal < 1")
        if len(self.betas) != 2:
            raise ConfigError(f"betas needs two values, got {self.betas}")


def parse_hook_specs(hooks: list[str]) -> list[tuple[str, str]]:
    """``["a", "x->y"]`` -> ``[("a", "a"), ("x", "y")]`` (input hook, output hook) before wildcard expansion."""
    out = []
    for h in hooks:
        if "->" in h:
            a, b = (s.strip() for s in h.split("->", 1))
            if not a or not b:
                raise ConfigError(f"transcoder spec {h!r} must be IN->OUT")
            out.append((a, b))
        else:
            out.append((h.strip(), h.strip()))
    return out


def resolve_pairs(model: nn.Module, hooks: list[str]) -> list[tuple[str, str]]:
    """Expand wildcards/aliases to canonical (in, out) hook pairs; an unknown name raises (listing valid ones)."""
    pairs: list[tuple[str, str]] = []
    for a, b in parse_hook_specs(hooks):
        ins = _canonical_names(model, a)
        if a == b:
            pairs += [(n, n) for n in ins]
        else:
            outs = _canonical_names(model, b)
            if len(ins) != len(outs):
                raise LmlabError(f"transcoder {a}->{b}: {len(ins)} input hooks but {len(outs)} output hooks")
            pairs += list(zip(ins, outs))
    seen: set[tuple[str, str]] = set()
    return [p for p in pairs if not (p in seen or seen.add(p))]


def _canonical_names(model: nn.Module, name: str) -> list[str]:
    """Names after alias/wildcard expansion (aliases map to their canonical name)."""
    from lmlab.core.hooks import resolve

    m = re.fullmatch(r"L(\d+)([RAM])", name)
    if m:
        name = f"blocks.{m[1]}." + {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out"}[m[2]]
    return [hp.name for hp in resolve(model, name)]


def _sae_dirname(a: str, b: str) -> str:
    return a if a == b else f"{a}__to__{b}"


def main_train(cfg: SAETrainConfig) -> Path:
    """``lmlab interp sae train``: one LM pass feeds every SAE; checkpoints; SAELens folders under ``saes/``."""
    from tqdm.auto import tqdm

    from lmlab.core.models import load
    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import load_tensors, read_json, save_tensors, start_run, write_json
    from lmlab.core.runtime import setup
    from lmlab.interp import sae_dist
    from lmlab.interp.activations import ActivationStore, open_source

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    ddp, dev = sae_dist.init_from_env(dev)  # under torchrun: data-parallel (see lmlab.interp.sae_dist)
    if ddp is not None and (not cfg.out or cfg.cache):
        raise ConfigError("torchrun SAE training needs --out (all ranks share the run dir) and no --cache")
    model, tok = load(cfg.model, dev, dtype, cfg.trust_remote_code)
    pairs = resolve_pairs(model, cfg.hooks)  # unknown hook -> LmlabError before the run dir
    names = sorted({h for p in pairs for h in p})
    source = open_source(model, tok, names, data=cfg.data, max_bytes=cfg.max_bytes, seq_len=cfg.seq_len,
                         lm_batch=cfg.lm_batch, prepend_bos=cfg.prepend_bos, seed=cfg.seed, cache=cfg.cache,
                         split="train")
    dims = source.dims()
    d_sae = {p: cfg.d_sae or cfg.expansion * dims[p[0]] for p in pairs}
    for p, n in d_sae.items():
        if cfg.k > n:
            raise LmlabError(f"k={cfg.k} is larger than the dictionary of {p[0]} ({n} latents)")
    steps = max(1, cfg.n_tokens // cfg.batch_size)
    warmup = min(cfg.warmup_steps, steps // 10)
    ckpt_every = cfg.checkpoint_every or max(1, steps // 10)
    run_cfg = cfg
    if ddp is not None and ddp.rank > 0:  # only rank 0 writes the run dir; the others use a scratch dir
        import dataclasses
        import tempfile

        run_cfg = dataclasses.replace(cfg, out=tempfile.mkdtemp(prefix=f"lmlab-sae-rank{ddp.rank}-"))
    with start_run(run_cfg, "interp-sae-train", device=dev, dtype=dtype, threads=threads) as run:
        gen = torch.Generator().manual_seed(cfg.seed)
        buffer = min(cfg.buffer_tokens, max(cfg.n_tokens, 2 * cfg.batch_size))
        store = ActivationStore(source, pairs, buffer_tokens=buffer, batch_size=cfg.batch_size, seed=cfg.seed,
                                rows=sae_dist.token_rows(source, ddp) if ddp is not None else None)
        states: dict[tuple[str, str], TrainState] = {}
        for p in pairs:
            d_in, d_out = dims[p[0]], dims[p[1]]
            sae = SAE(d_in, d_sae[p], cfg.k, d_out=d_out, hook_name=p[0], hook_name_out=p[1], model_name=cfg.model,
                      topk_by_decoder_norm=cfg.topk_by_decoder_norm).init_llama_scope(cfg.init_decoder_norm, gen)
            sae = sae.to(dev)  # SAE maths on the run's device; activations are buffered on the CPU
            opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
            states[p] = TrainState(sae, opt, torch.zeros(d_sae[p], dtype=torch.long),
                                   torch.zeros(d_sae[p], dtype=torch.long))
        ck = (Path(cfg.out) if ddp is not None else run.path) / "checkpoint"
        start = 0
        if (ck / "state.json").is_file():  # resume an interrupted run
            info = read_json(ck / "state.json")
            start = int(info["step"])
            for p, st in states.items():
                tens = load_tensors(ck / f"{_sae_dirname(*p)}.safetensors")
                _load_state(st, tens, info["saes"][_sae_dirname(*p)])
            store.skip_sequences(int(info["sequences"]))
            log.info("resuming from step %d of %d", start, steps)
        else:  # dataset-wise normalization from 8 batches (before any step)
            probe = store.peek(8 * cfg.batch_size)
            for p, st in states.items():
                x, y = probe[p]
                check_finite(p[0], x)
                if cfg.normalize == "dataset":
                    st.sae.scale_in.fill_(dataset_scale(x))
                    st.sae.scale_out.fill_(dataset_scale(y))
                if cfg.init_b_dec != "zero":
                    st.sae.init_centre(x, y, B_DEC_INITS[cfg.init_b_dec])
        k_aux = {p: cfg.k_aux or max(1, dims[p[1]] // 2) for p in pairs}  # OpenAI: d / 2
        dead_after = cfg.dead_tokens or max(cfg.batch_size, min(10_000_000, cfg.n_tokens // 20))
        k_start = {p: min(cfg.k_start or max(cfg.k, dims[p[0]] // 2), d_sae[p]) for p in pairs}
        curves: dict[str, list[float]] = {_sae_dirname(*p): [] for p in pairs}
        bar = tqdm(range(start, steps), desc="sae train", total=steps, initial=start, disable=None)
        for step in bar:
            batch = store.next_batch()
            f = lr_factor(step, steps, warmup, cfg.cooldown, cfg.lr_end_ratio)
            rec: dict[str, Any] = {"step": step + 1, "lr": cfg.lr * f}
            for p, st in states.items():
                x, y = (t.to(dev, non_blocking=True) for t in batch[p])
                check_finite(p[0], x)  # NaN/Inf activations: one clear error, not a NaN loss later
                k_t = k_schedule(step, steps, cfg.k, k_start[p], cfg.k_anneal)
                dead = (st.since_fired >= dead_after).to(dev) if cfg.auxk else None
                for g in st.opt.param_groups:
                    g["lr"] = cfg.lr * f
                out = train_step(st.sae, x, y, k_t, dead, k_aux[p], cfg.auxk_coef, ddp)
                st.opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                if ddp is not None:
                    ddp.all_reduce_grads(st.sae)
                if cfg.clip_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(st.sae.parameters(), cfg.clip_grad_norm)
                st.opt.step()
                active = out["idx"][out["vals"] > 0].reshape(-1).cpu()  # latents that fired in this batch
                fired = torch.bincount(active, minlength=st.sae.d_sae)  # (d_sae,)
                fvu_aux = torch.stack([out["fvu"].cpu(), out["aux"].cpu()]).double()
                if ddp is not None:  # global firing counts and loss: every rank keeps identical bookkeeping
                    both = ddp.all_reduce(torch.cat([fired.double(), fvu_aux]))
                    fired, fvu_aux = both[:-2].round().long(), both[-2:]
                st.since_fired += x.shape[0]
                st.since_fired[fired > 0] = 0
                st.fired_count += fired
                st.tokens += x.shape[0]
                loss_v = float(fvu_aux[0])
                if not math.isfinite(loss_v):
                    raise LmlabError(f"{p[0]}: loss became {loss_v} at step {step + 1}; lower --lr")
                key = _sae_dirname(*p)
                st.last = {"fvu": loss_v, "aux": float(fvu_aux[1]), "k": k_t,
                           "dead_frac": float((st.since_fired >= dead_after).float().mean())}
                rec[key] = st.last
                curves[key].append(1.0 - loss_v)
            if (step + 1) % 10 == 0 or step + 1 == steps:
                run.log(rec)
                bar.set_postfix(ev=f"{1 - next(iter(states.values())).last['fvu']:.3f}")
            stop = cfg.stop_after > 0 and step + 1 - start >= cfg.stop_after and step + 1 < steps
            if (((step + 1) % ckpt_every == 0 and step + 1 < steps) or stop) and (ddp is None or ddp.rank == 0):
                ck.mkdir(exist_ok=True)
                saes_info = {}
                for p, st in states.items():
                    tens, inf = _dump_state(st)
                    save_tensors(ck / f"{_sae_dirname(*p)}.safetensors", tens)
                    saes_info[_sae_dirname(*p)] = inf
                write_json(ck / "state.json", {"step": step + 1, "sequences": store.sequences_consumed(),
                                               "saes": saes_info})
            if stop:
                raise LmlabError(f"stopped after step {step + 1} of {steps} (stop_after={cfg.stop_after}); rerun "
                                 f"with --out {run.path} to resume")
        bar.close()
        if ddp is not None and ddp.rank > 0:  # rank 0 saves and evaluates; this rank's scratch dir goes at exit
            import atexit
            import shutil

            run.finish({"rank": ddp.rank})
            atexit.register(shutil.rmtree, run.path, True)
            sae_dist.close()
            return Path(cfg.out)
        results: dict[str, Any] = {"model": cfg.model, "steps": steps, "batch_size": cfg.batch_size,
                                   "tokens_per_sae": steps * cfg.batch_size, "lm_forward_calls": source.forward_calls,
                                   "saes": {}}
        saved: dict[tuple[str, str], Path] = {}
        for p, st in states.items():
            sae = st.sae.fold().eval().cpu()
            sae.meta.update({"k": cfg.k, "train_tokens": st.tokens, "seed": cfg.seed, "auxk": cfg.auxk,
                             "normalize": cfg.normalize, "lmlab_command": "interp sae train",
                             "seq_len": cfg.seq_len, "world_size": ddp.world if ddp else 1})
            density = st.fired_count.float() / max(1, st.tokens)
            saved[p] = save_sae(sae, run.path / "saes" / _sae_dirname(*p), torch.log10(density + 1e-10))
            results["saes"][_sae_dirname(*p)] = {"path": str(saved[p].relative_to(run.path)), "d_in": sae.d_in,
                                                 "d_sae": sae.d_sae, "k": sae.k, "train": st.last}
        line_plot(run.plots / "explained_variance.png", {k: list(range(1, len(v) + 1)) for k, v in curves.items()},
                  curves, title="training explained variance (1 - FVU)", xlabel="step", ylabel="EV")
        if cfg.eval_tokens > 0:
            from lmlab.interp.activations import open_source as _open

            val = _open(model, tok, names, data=cfg.data, max_bytes=cfg.max_bytes, seq_len=cfg.seq_len,
                        lm_batch=cfg.lm_batch, prepend_bos=cfg.prepend_bos, seed=cfg.seed, split="val")
            ev = evaluate_saes(model, val, {p: states[p].sae for p in pairs}, cfg.eval_tokens, splice="each")
            for p in pairs:
                results["saes"][_sae_dirname(*p)]["eval"] = ev["saes"][_sae_dirname(*p)]
            results["clean_ce"] = ev["clean_ce"]
        write_json(run.path / "saes" / "index.json", results["saes"])
        if ck.exists():
            import shutil

            shutil.rmtree(ck, ignore_errors=True)
        run.finish(results)
    if ddp is not None:
        sae_dist.close()
    return run.path


def _dump_state(st: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to resume: SAE tensors, Adam moments and step, dead-latent counters."""
    tens = {f"sae.{k}": v for k, v in st.sae.state_dict().items()}
    osd = st.opt.state_dict()
    for pid, s in osd["state"].items():
        for k, v in s.items():
            tens[f"opt.{pid}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    tens["since_fired"], tens["fired_count"] = st.since_fired, st.fired_count
    return tens, {"tokens": st.tokens, "last": st.last}


def _load_state(st: TrainState, tens: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    st.sae.load_state_dict({k[4:]: v for k, v in tens.items() if k.startswith("sae.")})
    osd = st.opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tens.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    osd["state"] = state
    st.opt.load_state_dict(osd)
    st.since_fired.copy_(tens["since_fired"])
    st.fired_count.copy_(tens["fired_count"])
    st.tokens, st.last = int(info["tokens"]), dict(info.get("last") or {})


# ----------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_saes(model: nn.Module, source: Any, saes: dict[tuple[str, str], SAE], n_tokens: int,
                  splice: str = "each") -> dict[str, Any]:
    """L0, explained variance, dead fraction over ``n_tokens``; delta CE / KL / CE score with the SAE
    reconstruction spliced in at its output hook (``splice``: each | all | both).

    CE score = (CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean) (SAELens ``ce_loss_score``)."""
    from lmlab.core.hooks import patch

    stats = {p: {"sse": 0.0, "sy": None, "syy": 0.0, "n": 0, "l0": 0.0,
                 "fired": torch.zeros(s.d_sae, dtype=torch.bool)} for p, s in saes.items()}
    ce: dict[str, float] = {}
    kl: dict[str, float] = {}
    n_ce = 0
    modes = ["each", "all"] if splice == "both" else [splice]
    for batch in source.lm_batches(n_tokens):
        ids, mask, acts = batch["input_ids"], batch["mask"], batch["acts"]  # (B, T), (B, T) bool, name -> (B,T,d)
        for p, s in saes.items():
            dev = s.W_enc.device
            x, y = acts[p[0]][mask].to(dev), acts[p[1]][mask].to(dev)
            f = s.encode(x)
            y_hat = s.decode(f)
            st = stats[p]
            st["sse"] += float((y_hat - y).double().pow(2).sum())
            sy = y.double().sum(0).cpu()
            st["sy"] = sy if st["sy"] is None else st["sy"] + sy
            st["syy"] += float(y.double().pow(2).sum())
            st["n"] += x.shape[0]
            st["l0"] += float((f != 0).sum())
            st["fired"] |= (f != 0).any(0).cpu()
        mdev = next(model.parameters()).device
        ids = ids.to(mdev)
        lp_clean = model(input_ids=ids).logits.float().log_softmax(-1)  # (B, T, V)
        tgt = ids[:, 1:]
        pm = mask[:, :-1].to(mdev)  # predictions made from trained-on positions
        n_ce += int(pm.sum())

        ce["clean"] = ce.get("clean", 0.0) + _nll(lp_clean, tgt, pm)
        runs: list[tuple[str, dict[str, Any]]] = []
        if "each" in modes:
            for p, s in saes.items():
                runs.append((_sae_dirname(*p), {p[1]: _splice_fn(s, p[0], mask, acts)}))
                runs.append((_sae_dirname(*p) + "::zero", {p[1]: _zero_fn(mask)}))
        if "all" in modes and len(saes) > 1:
            fns: dict[str, Any] = {}
            for p, s in saes.items():
                fns[p[1]] = _splice_fn(s, p[0], mask, acts)
            runs.append(("__all__", fns))
        for key, fns in runs:
            with patch(model, fns):
                lp = model(input_ids=ids).logits.float().log_softmax(-1)
            ce[key] = ce.get(key, 0.0) + _nll(lp, tgt, pm)
            kl[key] = kl.get(key, 0.0) + _kl(lp_clean, lp, pm)
    n_ce = max(1, n_ce)
    clean = ce["clean"] / n_ce
    out: dict[str, Any] = {"tokens": stats[next(iter(saes))]["n"] if saes else 0, "clean_ce": clean, "saes": {}}
    for p, s in saes.items():
        st = stats[p]
        n = max(1, st["n"])
        var = st["syy"] - float((st["sy"].pow(2)).sum()) / n
        key = _sae_dirname(*p)
        r: dict[str, Any] = {"l0": st["l0"] / n, "explained_variance": 1.0 - st["sse"] / max(var, 1e-12),
                             "mse": st["sse"] / (n * s.d_out), "dead_frac": 1.0 - float(st["fired"].float().mean()),
                             "architecture": s.architecture, "tokens": st["n"]}
        if key in ce:
            sae_ce, zero_ce = ce[key] / n_ce, ce[key + "::zero"] / n_ce
            r.update({"ce_clean": clean, "ce_sae": sae_ce, "delta_ce": sae_ce - clean, "kl": kl[key] / n_ce,
                      "ce_zero_ablation": zero_ce,
                      "ce_score": (zero_ce - sae_ce) / (zero_ce - clean) if zero_ce != clean else float("nan")})
        out["saes"][key] = r
    if "__all__" in ce:
        out["all_spliced"] = {"ce": ce["__all__"] / n_ce, "delta_ce": ce["__all__"] / n_ce - clean,
                              "kl": kl["__all__"] / n_ce}
    return out


def _nll(lp: torch.Tensor, tgt: torch.Tensor, pm: torch.Tensor) -> float:
    """Summed next-token NLL at prediction positions ``pm`` (B, T-1): lp (B, T, V) log-probs, tgt (B, T-1)."""
    return float(-(lp[:, :-1].gather(-1, tgt[..., None]).squeeze(-1))[pm].sum())


def _kl(lp_clean: torch.Tensor, lp: torch.Tensor, pm: torch.Tensor) -> float:
    """Summed KL(clean || patched) at prediction positions ``pm``."""
    return float((lp_clean.exp() * (lp_clean - lp)).sum(-1)[:, :-1][pm].sum())


def _splice_fn(sae: SAE, hook_in: str, mask: torch.Tensor, acts: dict[str, torch.Tensor]) -> Any:
    """Patch function writing the reconstruction at masked (non-special) positions. An SAE reads the live
    activation (so with several SAEs spliced at once each sees its upstream SAEs' effect); a transcoder reads the
    clean input captured at ``hook_in``."""

    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        m = mask.to(x.device)
        src = x if name == hook_in or hook_in == sae.hook_name_out else acts[hook_in].to(x.device)  # (B, T, d_in)
        out = x.clone()
        out[m] = sae(src[m].to(sae.W_enc.device, torch.float32)).to(x.device, x.dtype)
        return out

    return fn


def _zero_fn(mask: torch.Tensor) -> Any:
    def fn(x: torch.Tensor, _name: str) -> torch.Tensor:
        out = x.clone()
        out[mask.to(x.device)] = 0
        return out

    return fn


# ----------------------------------------------------------------------------------------------------------
# TopK -> JumpReLU


@torch.no_grad()
def jumprelu_thresholds(sae: SAE, x: torch.Tensor, method: str = "global") -> torch.Tensor:
    """Thresholds (d_sae,) for a folded TopK SAE from activations x (N, d_in).

    global: one theta = the (N k)-th largest ReLU pre-activation (Llama Scope; mean L0 = k).
    per_feature: theta_i between the c_i-th and (c_i+1)-th largest h_i, c_i = feature i's TopK firing count
    (each feature keeps its TopK firing rate)."""
    if method not in JUMPRELU:
        raise LmlabError(f"unknown JumpReLU method {method!r}; choose from {list(JUMPRELU)}")
    return JUMPRELU[method](sae, x)


def _theta_global(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    h = sae.pre_acts(x).relu()
    if sae.topk_by_decoder_norm:
        h = h * sae.W_dec.norm(dim=1)
    n_keep = min(h.numel(), x.shape[0] * sae.k)
    theta = float(h.reshape(-1).topk(n_keep).values[-1])
    t = torch.full((sae.d_sae,), theta)
    return t / sae.W_dec.norm(dim=1).clamp_min(1e-12) if sae.topk_by_decoder_norm else t


def _theta_per_feature(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    h = sae.pre_acts(x)  # (N, d_sae)
    _, idx = topk_select(h, sae.k, sae.dec_norm())
    counts = torch.bincount(idx.reshape(-1), minlength=sae.d_sae)  # (d_sae,)
    srt = h.sort(dim=0, descending=True).values  # (N, d_sae)
    n = h.shape[0]
    c = counts.clamp(max=n - 1)
    above = srt.gather(0, (c - 1).clamp_min(0)[None]).squeeze(0)
    below = srt.gather(0, c[None]).squeeze(0)
    theta = (above + below) / 2
    theta = torch.where(counts == 0, srt[0] + 1.0, theta)  # never fired under TopK: never fire
    return theta.clamp_min(0.0)


JUMPRELU = {"global": _theta_global, "per_feature": _theta_per_feature}


def to_jumprelu(sae: SAE, x: torch.Tensor, method: str = "global") -> SAE:
    """A JumpReLU copy of a TopK SAE with thresholds fitted on activations x (N, d_in)."""
    import copy

    if sae.architecture != "topk":
        raise LmlabError("to_jumprelu needs a TopK SAE")
    if float(sae.scale_in) != 1.0:
        raise LmlabError("fold() the SAE first")
    new = copy.deepcopy(sae)
    new.threshold.copy_(jumprelu_thresholds(sae, x, method))
    new.architecture = "jumprelu"
    new.meta = {**new.meta, "jumprelu": method}
    return new


@dataclass
class SAEEvalConfig(RunArgs):
    """Evaluate SAEs: L0, explained variance, dead fraction, delta CE / KL / CE score when spliced in."""

    sae: list[str] = field(default_factory=list)
    """SAE folders (SAELens or Llama Scope layout) or a training run dir (all SAEs in it)."""
    model: str = ""
    """Model (default: the model_name stored with the SAEs)."""
    tokens: int = 32_768
    """Evaluation tokens (held-out split)."""
    splice: str = "both"
    """Splice reconstructions one hook at a time (each), all at once (all), or both."""
    jumprelu: list[str] = field(default_factory=lambda: ["global", "per_feature"])
    """TopK -> JumpReLU conversions to fit and report (global, per_feature; empty: none)."""
    fit_tokens: int = 8192
    """Training-split tokens used to fit JumpReLU thresholds."""
    save_jumprelu: bool = False
    """Also write the converted SAEs (SAELens layout) into the run dir."""
    data: str = "code,prose,math"
    """Text: corpus domains, a path, or hf:NAME."""
    max_bytes: int = 8_000_000
    """Corpus build cap per domain."""
    seq_len: int = 256
    """LM context length."""
    lm_batch: int = 8
    """Sequences per LM forward."""
    prepend_bos: bool = True
    """Prepend BOS (excluded from the metrics)."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""
    context: list[int] = field(default_factory=list)
    """Context lengths to sweep, e.g. 64,128,256,512: EV, delta CE and L0 per length and per token-position bin
    (lmlab.interp.generalization); empty: no sweep."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(c < 2 for c in self.context):
            raise ConfigError(f"context lengths must be >= 2, got {self.context}")
        if self.splice not in ("each", "all", "both"):
            raise ConfigError(f"splice must be each|all|both, got {self.splice!r}")
        bad = [m for m in self.jumprelu if m not in JUMPRELU]
        if bad:
            raise ConfigError(f"unknown jumprelu method(s) {bad}; choose from {list(JUMPRELU)}")
        if self.tokens < 1 or self.fit_tokens < 1:
            raise ConfigError("tokens and fit_tokens must be >= 1")


def load_saes(paths: list[str]) -> dict[tuple[str, str], SAE]:
    out: dict[tuple[str, str], SAE] = {}
    for p in paths:
        for d in find_saes(p):
            s = load_sae(d)
            out[(s.hook_name, s.hook_name_out)] = s
    return out


def load_saes_and_model(cfg: Any, dev: Any, dtype: Any) -> tuple[dict, str, Any, Any, list[str]]:
    """SAEs of ``cfg.sae`` and the model they were trained on (``cfg.model`` overrides); checks the hooks exist.

    Shared by ``sae eval`` and ``sae dashboard``; returns ``(saes, model_name, model, tokenizer, hook names)``.
    """
    from lmlab.core.models import load

    if not cfg.sae:
        raise ConfigError("give at least one SAE folder or training run dir")
    saes = load_saes(cfg.sae)
    model_name = cfg.model or next(iter(saes.values())).model_name
    if not model_name:
        raise LmlabError("the SAEs do not record their model; pass --model")
    model, tok = load(model_name, dev, dtype, cfg.trust_remote_code)
    names = sorted({h for p in saes for h in p})
    resolve_pairs(model, names)  # hooks must exist on this model
    return saes, model_name, model, tok, names


def main_eval(cfg: SAEEvalConfig) -> Path:
    """``lmlab interp sae eval``."""
    from lmlab.core.plotting import bar_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.interp.activations import open_source

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    saes, model_name, model, tok, names = load_saes_and_model(cfg, dev, dtype)
    common = dict(data=cfg.data, max_bytes=cfg.max_bytes, seq_len=cfg.seq_len, lm_batch=cfg.lm_batch,
                  prepend_bos=cfg.prepend_bos, seed=cfg.seed)
    if cfg.context:
        from lmlab.interp.generalization import check_context, context_sweep

        check_context(model, cfg.context)  # before the run dir: a too-long context is one clear error
    with start_run(cfg, "interp-sae-eval", device=dev, dtype=dtype, threads=threads) as run:
        val = open_source(model, tok, names, split="val", **common)
        res = evaluate_saes(model, val, saes, cfg.tokens, cfg.splice)
        results: dict[str, Any] = {"model": model_name, "topk": res, "jumprelu": {}}
        sae_list = [s for s in saes.values() if s.architecture == "topk"]
        if cfg.jumprelu and sae_list:
            fit = open_source(model, tok, names, split="train", **common).collect(cfg.fit_tokens)
            for method in cfg.jumprelu:
                conv = {p: to_jumprelu(s, fit[p[0]], method) for p, s in saes.items() if s.architecture == "topk"}
                r = evaluate_saes(model, val, conv, cfg.tokens, "each")
                results["jumprelu"][method] = r
                if cfg.save_jumprelu:
                    for p, s in conv.items():
                        save_sae(s, run.path / f"jumprelu-{method}" / _sae_dirname(*p))
        keys = list(res["saes"])
        series = {"topk": [res["saes"][k]["explained_variance"] for k in keys]}
        for m, r in results["jumprelu"].items():
            series[f"jumprelu {m}"] = [r["saes"][k]["explained_variance"] for k in keys if k in r["saes"]]
        series = {k: v for k, v in series.items() if len(v) == len(keys)}
        bar_plot(run.plots / "explained_variance.png", keys, series, title="explained variance", ylabel="EV")
        if cfg.context:
            results["context"] = context_sweep(model, tok, names, saes, cfg.context, cfg.tokens, data=cfg.data,
                                               max_bytes=cfg.max_bytes, lm_tokens=cfg.lm_batch * cfg.seq_len,
                                               prepend_bos=cfg.prepend_bos, seed=cfg.seed, plots=run.plots)
        run.finish(results)
    return run.path


def metrics_table(results: dict[str, Any]) -> str:
    """Markdown-ish text table of an eval/train result's per-SAE metrics."""
    rows = ["| SAE | L0 | EV | dead | delta CE | KL | CE score |", "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        r = r.get("eval", r)
        rows.append(f"| {key} | {r.get('l0', float('nan')):.1f} | {r.get('explained_variance', float('nan')):.3f} | "
                    f"{r.get('dead_frac', float('nan')):.3f} | {r.get('delta_ce', float('nan')):.4f} | "
                    f"{r.get('kl', float('nan')):.4f} | {r.get('ce_score', float('nan')):.3f} |")
    return "\n".join(rows)


def iter_sae_dirs(run_dir: str | Path) -> Iterator[Path]:
    yield from find_saes(run_dir)


# ----------------------------------------------------------------------------------------------------------
# tour


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """``lmlab tour`` SAE section: a Top-K SAE on ref:dense's middle resid_post (quick: 64k tokens; --full: 2M
    tokens on ref:dense and ref:mamba), metrics table, and a feature dashboard."""
    from lmlab.core.hooks import n_layers
    from lmlab.core.models import load_model
    from lmlab.interp.dashboard import SAEDashboardConfig
    from lmlab.interp.dashboard import main as dashboard_main

    models = ["ref:dense", "ref:mamba"] if cfg.full else ["ref:dense"]
    hooks = []
    for m in models:
        hooks.append(f"blocks.{n_layers(load_model(m)) // 2}.hook_resid_post")
    common = dict(seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads)
    runs, lines = [], []
    for m, hook in zip(models, hooks):
        name = m.replace("ref:", "")
        tcfg = SAETrainConfig(model=m, hooks=[hook], k=16, expansion=8, tokens="2M" if cfg.full else "64k",
                              batch_size=2048 if cfg.full else 1024, buffer_tokens=200_000 if cfg.full else 32_768,
                              eval_tokens=32_768 if cfg.full else 4096, out=str(out / f"train-{name}"), **common)
        run = main_train(tcfg)
        runs.append(run)
        res = _json(run / "results.json")
        dash = dashboard_main(SAEDashboardConfig(sae=[str(run)], tokens=16_384 if cfg.full else 4096,
                                                 features=64 if cfg.full else 16, out=str(out / f"dashboard-{name}"),
                                                 **common))
        lines.append(f"{m} {hook}: {res['tokens_per_sae']} training tokens, k=16, 8x ({res['lm_forward_calls']} LM "
                     f"forward passes).")
        lines.append(metrics_table(res["saes"]))
        lines.append(f"Feature dashboard: {dash / 'dashboard' / 'index.html'}")
    return runs[0], "\n\n".join(lines)


def _json(p: Path) -> dict[str, Any]:
    return json.loads(Path(p).read_text())
