"""SAE generalization: longer contexts and fine-tuned models (Llama Scope, ``lmlab interp sae eval --context`` and
``lmlab interp sae transfer``).

Paper: Z. He et al., *Llama Scope: Extracting Millions of Features from Llama-3.1-8B with Sparse Autoencoders*,
arXiv 2410.20526. Llama Scope SAEs are trained on base-model activations at context 1024 and the paper checks that
they still work (i) on **longer contexts** than they were trained on and (ii) spliced into an **instruction-tuned
descendant** of the base model. lmlab measures both on any model and SAE:

**Context-length generalization.** For every context length L in ``--context`` (e.g. 64,128,256,512) the *same*
held-out text (chunks of max(L) tokens spread over the split) is cut into sequences of L tokens (BOS first,
excluded) and, per SAE and per token-position bin
``[lo, hi)`` (powers of two: 1-16, 16-32, 32-64, ...)::

    EV_bin   = 1 - sum_{t in bin} ||y^_t - y_t||^2 / sum_{t in bin} ||y_t - mean_bin y||^2
    L0_bin   = mean_{t in bin} ||f_t||_0
    dCE_bin  = mean_{t in bin} [ NLL(next token | SAE spliced at every position) - NLL(clean) ]

plus the totals per L. A context beyond the model's ``max_position_embeddings`` is refused (one clear error);
SAEs record the context they were trained at (``seq_len`` in their metadata) so the table can mark it.

**Fine-tuned transfer.** Fine-tune the base model on one domain (default: the built-in math domain) with the
foundation's training loop (:func:`lmlab.core.pretrain.train`), splice the *base* model's SAEs into the fine-tuned
model and compare, on held-out text of that domain:

    rows     base SAE on base model | base SAE on fine-tuned model | SAE trained on the fine-tuned model
    metrics  EV, L0, delta CE, CE score, dead fraction
    latents  dead on the fine-tuned model (alive on the base), over-active (density_ft > ratio * density_base
             and > min_density), and the latents whose firing frequency changes most (|log10 density ratio|)

The comparison SAE is trained with the base SAE's recipe (k, width, tokens, data) on the fine-tuned model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# context length


def model_max_context(model: torch.nn.Module) -> int | None:
    """The longest context a model accepts (``max_position_embeddings`` / ``n_positions``); None = unbounded (SSMs,
    or no such field)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", "") in ("mamba", "mamba2"):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(model: torch.nn.Module, contexts: list[int]) -> None:
    """Refuse a context longer than the model's maximum (one clear line)."""
    cap = model_max_context(model)
    too_long = [c for c in contexts if cap is not None and c > cap]
    if too_long:
        raise LmlabError(f"context {max(too_long)} is longer than the model's maximum context {cap} "
                         "(max_position_embeddings); use --context values <= " + str(cap))


def position_edges(seq_len: int, first: int = 16) -> list[int]:
    """Token-position bin edges ``[0, 16, 32, 64, ..., seq_len]`` (powers of two after ``first``)."""
    edges, e = [0], first
    while e < seq_len:
        edges.append(e)
        e *= 2
    edges.append(seq_len)
    return edges


@torch.no_grad()
def evaluate_by_position(model: torch.nn.Module, source: Any, saes: dict[tuple[str, str], Any],
                         n_tokens: int | None, edges: list[int]) -> dict[str, Any]:
    """EV, L0 and delta CE per token-position bin (and in total) for every SAE, each spliced in on its own.

    ``source`` yields LM batches (:class:`lmlab.interp.activations.LMActivationSource`); ``edges`` from
    :func:`position_edges`; ``n_tokens`` None: one pass over the source.
    Returns ``{"clean_ce", "tokens", "bins": [[lo, hi], ...], "saes": {name: {...}}}``."""
    from lmlab.core.hooks import patch
    from lmlab.interp.sae import _sae_dirname, _splice_fn

    nb = len(edges) - 1
    bound = torch.tensor(edges[1:-1])
    st = {p: {"sse": torch.zeros(nb, dtype=torch.float64), "sy": None, "syy": torch.zeros(nb, dtype=torch.float64),
              "n": torch.zeros(nb, dtype=torch.float64), "l0": torch.zeros(nb, dtype=torch.float64),
              "nll": torch.zeros(nb, dtype=torch.float64)} for p in saes}
    clean = torch.zeros(nb, dtype=torch.float64)
    n_pred = torch.zeros(nb, dtype=torch.float64)
    seen = 0
    for batch in source.lm_batches(n_tokens):
        ids, mask, acts = batch["input_ids"], batch["mask"], batch["acts"]  # (B, T), (B, T), name -> (B, T, d)
        B, T = ids.shape
        pos_bin = torch.bucketize(torch.arange(T), bound, right=True).expand(B, T)  # (B, T) bin of each position
        rb = pos_bin[mask]  # (n,)
        for p, s in saes.items():
            x, y = acts[p[0]][mask], acts[p[1]][mask]  # (n, d)
            f = s.encode(x.to(s.W_enc.device)).cpu()
            y_hat = s.decode(f.to(s.W_enc.device)).cpu()
            a = st[p]
            a["sse"].index_add_(0, rb, (y_hat - y).double().pow(2).sum(1))
            a["syy"].index_add_(0, rb, y.double().pow(2).sum(1))
            sy = torch.zeros(nb, y.shape[1], dtype=torch.float64).index_add_(0, rb, y.double())
            a["sy"] = sy if a["sy"] is None else a["sy"] + sy
            a["n"].index_add_(0, rb, torch.ones_like(rb, dtype=torch.float64))
            a["l0"].index_add_(0, rb, (f != 0).sum(1).double())
        dev = next(model.parameters()).device
        ids_d = ids.to(dev)
        pm = mask[:, :-1]  # (B, T-1) predictions made from non-special positions
        pb = pos_bin[:, :-1][pm]
        tgt = ids_d[:, 1:]

        clean.index_add_(0, pb, _nll_at(model, ids_d, tgt, pm))
        n_pred.index_add_(0, pb, torch.ones_like(pb, dtype=torch.float64))
        for p, s in saes.items():
            with patch(model, {p[1]: _splice_fn(s, p[0], mask, acts)}):
                st[p]["nll"].index_add_(0, pb, _nll_at(model, ids_d, tgt, pm))
        seen += int(mask.sum())
    if seen == 0:
        raise LmlabError("no evaluation tokens (empty validation text?)")
    npr = n_pred.clamp_min(1)
    out: dict[str, Any] = {"tokens": seen, "bins": [[edges[i], edges[i + 1]] for i in range(nb)],
                           "clean_ce": float(clean.sum() / npr.sum()), "clean_ce_bins": (clean / npr).tolist(),
                           "saes": {}}
    for p, a in st.items():
        n = a["n"].clamp_min(1)
        var = a["syy"] - a["sy"].pow(2).sum(1) / n  # (nb,) sum ||y - mean_bin y||^2
        var_tot = float(a["syy"].sum() - a["sy"].sum(0).pow(2).sum() / n.sum())
        ev_bins = [float(1 - a["sse"][i] / var[i]) if a["n"][i] > 1 and var[i] > 0 else float("nan")
                   for i in range(nb)]
        out["saes"][_sae_dirname(*p)] = {
            "explained_variance": float(1 - a["sse"].sum() / max(var_tot, 1e-12)),
            "l0": float(a["l0"].sum() / n.sum()),
            "delta_ce": float((a["nll"].sum() - clean.sum()) / npr.sum()),
            "ev_bins": ev_bins, "l0_bins": (a["l0"] / n).tolist(),
            "delta_ce_bins": ((a["nll"] - clean) / npr).tolist(), "tokens_bins": a["n"].tolist()}
    return out


def _nll_at(model: torch.nn.Module, ids: torch.Tensor, tgt: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
    """Next-token NLL at prediction positions ``pm`` (B, T-1): ids (B, T) -> (n_pred,) float64 on the CPU."""
    lp = model(input_ids=ids).logits.float().log_softmax(-1)  # (B, T, V)
    return -(lp[:, :-1].gather(-1, tgt[..., None]).squeeze(-1)).cpu()[pm].double()


def same_text_sources(model: torch.nn.Module, tok: Any, names: list[str], contexts: list[int], n_tokens: int, *,
                      data: str, max_bytes: int, lm_tokens: int = 2048, prepend_bos: bool = True,
                      split: str = "val") -> dict[int, Any]:
    """One activation source per context length over **the same text**: ``ceil(n_tokens / C)`` chunks of
    ``C = max(contexts)`` tokens (BOS excluded) spread evenly over the held-out stream; context L cuts every chunk
    into ``C // L`` sequences (the remainder of a chunk is dropped), so no sequence straddles two chunks and every L
    sees the same documents. Sequences in stream order (no shuffle), one epoch each."""
    import numpy as np

    from lmlab.core.zoo import token_streams
    from lmlab.interp.activations import LMActivationSource, special_token_ids

    train, val, _ = token_streams(tok, data, max_bytes, seed=0)
    ids = np.asarray(val if split == "val" else train, dtype=np.int64)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    body = {L: L - 1 if (prepend_bos and bos is not None) else L for L in contexts}
    C = max(body.values())
    n_chunks = max(1, min(math.ceil(n_tokens / C), len(ids) // C))
    if len(ids) < C:
        raise LmlabError(f"held-out text has {len(ids)} tokens, fewer than one context of {C + 1}")
    starts = np.linspace(0, len(ids) - C, n_chunks).astype(np.int64)
    out = {}
    for L in contexts:
        b = body[L]
        keep = (C // b) * b
        stream = np.concatenate([ids[s: s + keep] for s in starts])  # sequences never straddle chunks
        out[L] = LMActivationSource(model, names, stream, seq_len=L, lm_batch=max(1, lm_tokens // L), bos_id=bos,
                                    special_ids=special_token_ids(tok), prepend_bos=prepend_bos, shuffle=False)
    return out


def context_sweep(model: torch.nn.Module, tok: Any, names: list[str], saes: dict[tuple[str, str], Any],
                  contexts: list[int], n_tokens: int, *, data: str, max_bytes: int, lm_tokens: int = 2048,
                  prepend_bos: bool = True, seed: int = 0, plots: Path | None = None) -> dict[str, Any]:
    """:func:`evaluate_by_position` at every context length on the same ~``n_tokens`` of held-out text
    (:func:`same_text_sources`). ``lm_tokens``: tokens per LM forward. Writes plots when ``plots``."""
    from lmlab.interp.sae import _sae_dirname

    check_context(model, contexts)
    res: dict[str, Any] = {"contexts": list(contexts), "trained_context": {}, "by_context": {}}
    for p, s in saes.items():
        res["trained_context"][_sae_dirname(*p)] = s.meta.get("seq_len")
    sources = same_text_sources(model, tok, names, contexts, n_tokens, data=data, max_bytes=max_bytes,
                                lm_tokens=lm_tokens, prepend_bos=prepend_bos)
    for L in contexts:
        res["by_context"][str(L)] = evaluate_by_position(model, sources[L], saes, None, position_edges(L))
    if plots is not None:
        plot_context(res, plots)
    return res


def plot_context(res: dict[str, Any], plots: Path) -> list[Path]:
    """EV / delta CE vs context length (one line per SAE) and vs position bin (one line per context, first SAE)."""
    from lmlab.core.plotting import line_plot

    ctxs = res["contexts"]
    first = next(iter(res["by_context"].values()))
    names = list(first["saes"])
    out = []
    for metric, label in (("explained_variance", "EV"), ("delta_ce", "delta CE (nats)")):
        out.append(line_plot(plots / f"context_{metric}.png", {n: ctxs for n in names},
                             {n: [res["by_context"][str(c)]["saes"][n][metric] for c in ctxs] for n in names},
                             title=f"{label} vs context length", xlabel="context length (tokens)", ylabel=label,
                             logx=True))
    for metric, label in (("ev_bins", "EV"), ("delta_ce_bins", "delta CE (nats)")):
        xs, ys = {}, {}
        for c in ctxs:
            r = res["by_context"][str(c)]
            xs[f"context {c}"] = [hi for _, hi in r["bins"]]
            ys[f"context {c}"] = r["saes"][names[0]][metric]
        out.append(line_plot(plots / f"position_{metric}.png", xs, ys,
                             title=f"{names[0]}: {label} by token position", xlabel="position bin (upper edge)",
                             ylabel=label, logx=True))
    return out


def context_table(res: dict[str, Any]) -> str:
    rows = ["| SAE | trained at | context | EV | L0 | delta CE | EV last bin | delta CE last bin |",
            "|---|---|---|---|---|---|---|---|"]
    for c in res["contexts"]:
        r = res["by_context"][str(c)]
        for n, m in r["saes"].items():
            rows.append(f"| {n} | {res['trained_context'].get(n)} | {c} | {m['explained_variance']:.3f} | "
                        f"{m['l0']:.1f} | {m['delta_ce']:.4f} | {m['ev_bins'][-1]:.3f} | "
                        f"{m['delta_ce_bins'][-1]:.4f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------
# fine-tuned transfer


@torch.no_grad()
def latent_density(source: Any, saes: dict[tuple[str, str], Any], n_tokens: int) -> dict[tuple[str, str], Any]:
    """Firing frequency of every latent over ``n_tokens`` masked tokens: (d_sae,) per SAE."""
    counts = {p: torch.zeros(s.d_sae, dtype=torch.float64) for p, s in saes.items()}
    n = 0
    for b in source.lm_batches(n_tokens):
        for p, s in saes.items():
            f = s.encode(b["acts"][p[0]][b["mask"]].to(s.W_enc.device))
            counts[p] += (f != 0).sum(0).double().cpu()
        n += int(b["mask"].sum())
    return {p: c / max(1, n) for p, c in counts.items()}


def density_shift(base: torch.Tensor, ft: torch.Tensor, *, over_ratio: float = 4.0, min_density: float = 1e-3,
                  top: int = 20, eps: float = 1e-5) -> dict[str, Any]:
    """Compare firing frequencies (d_sae,) on the base and the fine-tuned model.

    dead_on_ft: alive on base, never fires on ft; overactive: ft > over_ratio * base and ft > min_density;
    most_changed: the ``top`` latents with the largest |log10((ft + eps) / (base + eps))|."""
    base, ft = base.double(), ft.double()
    lr = torch.log10((ft + eps) / (base + eps))  # (d_sae,)
    dead_ft = (ft == 0) & (base > 0)
    over = (ft > over_ratio * base) & (ft > min_density)
    order = lr.abs().argsort(descending=True)[:top]
    alive_b = base > 0
    corr = float(torch.corrcoef(torch.stack([torch.log10(base[alive_b] + eps), torch.log10(ft[alive_b] + eps)]))[0, 1]
                 ) if int(alive_b.sum()) > 2 else float("nan")
    return {"dead_base": int((base == 0).sum()), "dead_ft": int((ft == 0).sum()), "newly_dead": int(dead_ft.sum()),
            "overactive": int(over.sum()), "dense_ft_gt_0.1": int((ft > 0.1).sum()),
            "log_density_corr": corr, "mean_abs_log10_ratio": float(lr[alive_b | (ft > 0)].abs().mean()),
            "most_changed": [{"latent": int(i), "density_base": float(base[i]), "density_ft": float(ft[i]),
                              "log10_ratio": float(lr[i])} for i in order.tolist()]}


@dataclass
class TransferConfig(RunArgs):
    """Splice a base model's SAEs into a fine-tuned descendant; compare with an SAE trained on the fine-tuned
    model."""

    sae: list[str] = field(default_factory=list)
    """Base-model SAE folders or a training run dir (all SAEs in it)."""
    model: str = ""
    """Base model (default: the model_name stored with the SAEs)."""
    finetuned: str = ""
    """Fine-tuned model (path or HF name); empty: fine-tune the base model on finetune_data now."""
    finetune_data: str = "math"
    """Domain(s), path or hf:NAME to fine-tune on (the built-in math domain by default)."""
    finetune_steps: int = 200
    """Optimizer steps of the fine-tune."""
    finetune_lr: float = 5e-4
    """Peak learning rate of the fine-tune (warm-up 10 steps, cosine)."""
    finetune_batch: int = 8
    """Sequences per fine-tune step."""
    finetune_seq_len: int = 256
    """Fine-tune sequence length."""
    eval_data: str = ""
    """Held-out text for the comparison (default: finetune_data)."""
    tokens: int = 16_384
    """Evaluation tokens."""
    train_sae: bool = True
    """Also train an SAE on the fine-tuned model with the base SAE's recipe (the comparison row)."""
    sae_tokens: str = ""
    """Training tokens for that SAE (default: as many as the base SAE saw)."""
    sae_data: str = "code,prose,math"
    """Training text for that SAE (the base SAEs' default mix)."""
    sae_batch_size: int = 1024
    """SAE batch in tokens for that SAE."""
    over_ratio: float = 4.0
    """A latent is over-active on the fine-tuned model when its density grows by more than this factor..."""
    min_density: float = 1e-3
    """...and exceeds this density."""
    top: int = 20
    """Latents listed as changing frequency most."""
    max_bytes: int = 3_000_000
    """Corpus build cap per domain."""
    seq_len: int = 256
    """LM context length for evaluation."""
    lm_batch: int = 8
    """Sequences per LM forward."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.finetune_steps < 1 or self.tokens < 1 or self.finetune_batch < 1 or self.finetune_seq_len < 2:
            raise ConfigError("finetune_steps, tokens, finetune_batch must be >= 1 and finetune_seq_len >= 2")
        if self.finetune_lr <= 0 or self.over_ratio <= 1:
            raise ConfigError("need finetune_lr > 0 and over_ratio > 1")


def finetune(model: torch.nn.Module, tok: Any, data: str, *, steps: int, lr: float, batch: int, seq_len: int,
             max_bytes: int, seed: int = 0, run: Any = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``data`` with the foundation's loop; returns losses before/after."""
    from lmlab.core import zoo
    from lmlab.core.pretrain import OptimConfig, eval_windows, evaluate, train

    train_ids, val_ids, meta = zoo.token_streams(tok, data, max_bytes, seed=0)
    opt = OptimConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, warmup=min(10, steps // 10),
                      eval_every=0, log_every=max(1, steps // 20), weight_decay=0.0)
    windows = eval_windows(val_ids, 4 * batch, seq_len)
    before = evaluate(model, windows, batch)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    st = train(model, train_ids, val_ids, opt, seed=seed, run=run, progress=False)
    after = evaluate(model, windows, batch)
    num = sum(float((v - theta0[k]).float().pow(2).sum()) for k, v in model.state_dict().items())
    den = sum(float(v.float().pow(2).sum()) for v in theta0.values())
    return {"data": data, "steps": steps, "tokens": st.tokens, "val_loss_before": before, "val_loss_after": after,
            "relative_weight_change": math.sqrt(num / max(den, 1e-12)), "corpus_hash": meta.get("corpus_hash")}


def main_transfer(cfg: TransferConfig) -> Path:
    """``lmlab interp sae transfer``: base SAEs on base vs fine-tuned model vs an SAE trained on the fine-tune."""
    from lmlab.core.models import load
    from lmlab.core.plotting import bar_plot, scatter_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.interp.activations import open_source
    from lmlab.interp.sae import SAETrainConfig, _sae_dirname, evaluate_saes, load_saes, main_train, resolve_pairs

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    if not cfg.sae:
        raise ConfigError("give at least one base SAE folder or training run dir")
    saes = load_saes(cfg.sae)
    model_name = cfg.model or next(iter(saes.values())).model_name
    if not model_name:
        raise LmlabError("the SAEs do not record their model; pass --model")
    base, tok = load(model_name, dev, dtype, cfg.trust_remote_code)
    names = sorted({h for p in saes for h in p})
    resolve_pairs(base, names)
    eval_data = cfg.eval_data or cfg.finetune_data
    with start_run(cfg, "interp-sae-transfer", device=dev, dtype=dtype, threads=threads) as run:
        results: dict[str, Any] = {"model": model_name, "eval_data": eval_data}
        if cfg.finetuned:
            ft, _ = load(cfg.finetuned, dev, dtype, cfg.trust_remote_code)
            ft_path = cfg.finetuned
        else:
            ft, _ = load(model_name, dev, torch.float32, cfg.trust_remote_code)
            results["finetune"] = finetune(ft, tok, cfg.finetune_data, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                                           batch=cfg.finetune_batch, seq_len=cfg.finetune_seq_len,
                                           max_bytes=cfg.max_bytes, seed=cfg.seed, run=run)
            ft_path = str(run.path / "finetuned")
            ft.save_pretrained(ft_path)
            tok.save_pretrained(ft_path)
            ft = ft.to(dtype).eval()
        resolve_pairs(ft, names)  # same hook points on the fine-tuned model
        common = dict(data=eval_data, max_bytes=cfg.max_bytes, seq_len=cfg.seq_len, lm_batch=cfg.lm_batch,
                      seed=cfg.seed, split="val")
        src_b, src_f = open_source(base, tok, names, **common), open_source(ft, tok, names, **common)
        rows = {"base SAE on base model": evaluate_saes(base, src_b, saes, cfg.tokens, "each"),
                "base SAE on fine-tuned model": evaluate_saes(ft, src_f, saes, cfg.tokens, "each")}
        dens_b, dens_f = latent_density(src_b, saes, cfg.tokens), latent_density(src_f, saes, cfg.tokens)
        shifts = {_sae_dirname(*p): density_shift(dens_b[p], dens_f[p], over_ratio=cfg.over_ratio,
                                                  min_density=cfg.min_density, top=cfg.top) for p in saes}
        for p in list(saes)[:1]:
            key = _sae_dirname(*p)
            eps = 1e-5
            scatter_plot(run.plots / "density_shift.png", torch.log10(dens_b[p] + eps).tolist(),
                         torch.log10(dens_f[p] + eps).tolist(), title=f"{key}: latent density, base vs fine-tuned",
                         xlabel="log10 density on base model", ylabel="log10 density on fine-tuned model",
                         diagonal=True)
        if cfg.train_sae:
            s0 = next(iter(saes.values()))
            tokens = cfg.sae_tokens or str(int(s0.meta.get("train_tokens") or 65_536))
            hooks = [p[0] if p[0] == p[1] else f"{p[0]}->{p[1]}" for p in saes]
            tcfg = SAETrainConfig(model=ft_path, hooks=hooks, k=s0.k, d_sae=s0.d_sae, tokens=tokens,
                                  batch_size=cfg.sae_batch_size, data=cfg.sae_data, max_bytes=cfg.max_bytes,
                                  seq_len=int(s0.meta.get("seq_len") or cfg.seq_len),
                                  buffer_tokens=min(200_000, max(4 * cfg.sae_batch_size, 32_768)), eval_tokens=0,
                                  auxk=bool(s0.meta.get("auxk", True)), seed=cfg.seed, device=cfg.device,
                                  dtype=cfg.dtype, threads=cfg.threads, out=str(run.path / "ft-sae"))
            ft_run = main_train(tcfg)
            ft_saes = load_saes([str(ft_run)])
            rows["SAE trained on fine-tuned model"] = evaluate_saes(ft, src_f, ft_saes, cfg.tokens, "each")
            results["ft_sae_run"] = str(ft_run.relative_to(run.path))
        results["rows"] = rows
        results["density_shift"] = shifts
        keys = [_sae_dirname(*p) for p in saes]
        bar_plot(run.plots / "transfer_ev.png", keys,
                 {r: [rows[r]["saes"][k]["explained_variance"] for k in keys] for r in rows},
                 title="explained variance: base vs fine-tuned model", ylabel="EV")
        bar_plot(run.plots / "transfer_delta_ce.png", keys,
                 {r: [rows[r]["saes"][k]["delta_ce"] for k in keys] for r in rows},
                 title="delta CE (nats): base vs fine-tuned model", ylabel="delta CE")
        run.finish(results)
    return run.path


def transfer_table(res: dict[str, Any]) -> str:
    rows = ["| SAE | setting | L0 | EV | dead | delta CE | CE score |", "|---|---|---|---|---|---|---|"]
    for setting, r in res["rows"].items():
        for key, m in r["saes"].items():
            rows.append(f"| {key} | {setting} | {m['l0']:.1f} | {m['explained_variance']:.3f} | "
                        f"{m['dead_frac']:.3f} | {m['delta_ce']:.4f} | {m['ce_score']:.3f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------
# tour


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """``lmlab tour`` generalization/geometry section (quick: < 30 s on one CPU thread): a 2x and an 8x SAE on
    ref:dense's middle resid_post trained at context 64, evaluated at contexts 64 and 256, and their feature
    splits (--full: 8x vs 32x, 1M tokens, contexts 64..1024)."""
    from lmlab.core.hooks import n_layers
    from lmlab.core.models import load_model
    from lmlab.core.runs import read_json
    from lmlab.interp.geometry import GeometryConfig, splits_table
    from lmlab.interp.geometry import main as geometry_main
    from lmlab.interp.sae import SAEEvalConfig, SAETrainConfig, main_eval, main_train

    hook = f"blocks.{n_layers(load_model('ref:dense')) // 2}.hook_resid_post"
    common = dict(seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads)
    sizes = (8, 32) if cfg.full else (2, 8)
    tokens = "1M" if cfg.full else "40k"
    runs = {}
    for i, e in enumerate(sizes):  # different seeds: SAEs of one seed share their first initial decoder rows
        tcfg = SAETrainConfig(model="ref:dense", hooks=[hook], k=16, expansion=e, tokens=tokens, seq_len=64,
                              batch_size=2048 if cfg.full else 1024, buffer_tokens=100_000 if cfg.full else 8192,
                              lm_batch=32, eval_tokens=0, out=str(out / f"train-{e}x"),
                              **{**common, "seed": cfg.seed + i})
        runs[e] = main_train(tcfg)
    contexts = [64, 128, 256, 512, 1024] if cfg.full else [64, 256]
    ev_run = main_eval(SAEEvalConfig(sae=[str(runs[sizes[0]])], context=contexts, tokens=16_384 if cfg.full else 2048,
                                     jumprelu=[], splice="each", out=str(out / "context"), **common))
    geo = geometry_main(GeometryConfig(small=str(runs[sizes[0]]), large=str(runs[sizes[1]]),
                                       tokens=32_768 if cfg.full else 4096, seq_len=64, out=str(out / "geometry"),
                                       **common))
    ev = read_json(ev_run / "results.json")
    text = [f"ref:dense {hook}: {sizes[0]}x and {sizes[1]}x Top-K SAEs (k=16, {tokens} tokens, trained at "
            "context 64).",
            f"Context-length generalization of the {sizes[0]}x SAE:", context_table(ev["context"]),
            "Feature geometry and splitting:", splits_table(read_json(geo / "results.json")),
            f"Split examples: {geo / 'splits.html'}"]
    return geo, "\n\n".join(text)


__all__ = ["TransferConfig", "check_context", "context_sweep", "context_table", "density_shift",
           "evaluate_by_position", "finetune", "latent_density", "main_transfer", "model_max_context",
           "plot_context", "position_edges", "same_text_sources", "tour_section", "transfer_table"]
