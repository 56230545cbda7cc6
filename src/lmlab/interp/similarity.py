"""Feature universality across models: Max Pairwise Pearson Correlation (``lmlab interp similarity``).

Paper: *Towards Universality: Studying Mechanistic Similarity Across Language Model Architectures*
(Wang, Ge, Shu, Tang, Zhou, He, Qiu; arXiv 2410.06672, ICLR 2025). SAEs isolate features of a Transformer and a
Mamba trained on the same data; features are matched on their activation patterns over identical tokens:

    MPPC(i) = max_j corr(a_i, b_j)          a_i, b_j in R^N: activations of feature i of A / j of B on N tokens

reported as a distribution over i (mean, fraction > 0.7, histogram) against reference points: a **random-weights
baseline** (B's architecture, untrained), and skylines (another model seed; another SAE seed) passed as extra
SAE runs. Pearson correlations are computed **streaming** from running sums (no N x F activation matrix)::

    corr(a, b) = (n Σab - Σa Σb) / sqrt((n Σa² - (Σa)²) (n Σb² - (Σb)²))

accumulated in float64 over chunks of tokens: memory O(F_A · F_B), not O(N · F). Features that never vary on the
stream (dead) have no correlation and are excluded (reported as ``n_dead``).

Extras from the paper: a depth matrix (mean over A-features of layer l of the max correlation inside B-layer m),
a neuron-level comparison (raw hook activations instead of SAE features), and a complexity proxy (entropy of the
token distribution a feature fires on, instead of the paper's GPT-4o ratings) with Spearman(MPPC, entropy).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import ConfigError, RunArgs
from lmlab.core.zoo import REF_MAX_BYTES
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

THRESHOLDS = (0.5, 0.7)


# ----------------------------------------------------------------------------------------------------------
# the maths (pure, streaming)


class PearsonAccumulator:
    """Running sums for the full cross-correlation matrix between two feature sets, fed chunk by chunk."""

    def __init__(self, f_a: int, f_b: int):
        self.n = 0
        self.sa = torch.zeros(f_a, dtype=torch.float64)  # Σ a_i
        self.sb = torch.zeros(f_b, dtype=torch.float64)  # Σ b_j
        self.saa = torch.zeros(f_a, dtype=torch.float64)  # Σ a_i²
        self.sbb = torch.zeros(f_b, dtype=torch.float64)  # Σ b_j²
        self.sab = torch.zeros(f_a, f_b, dtype=torch.float64)  # Σ a_i b_j

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a (n, F_A), b (n, F_B): activations on the same n tokens."""
        if a.shape[0] != b.shape[0]:
            raise LmlabError(f"feature chunks cover different token counts ({a.shape[0]} vs {b.shape[0]})")
        a, b = a.double(), b.double()
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b  # (F_A, F_B)

    def corr(self) -> torch.Tensor:
        """(F_A, F_B) Pearson matrix; NaN rows/columns for constant features."""
        if self.n < 2:
            raise LmlabError(f"need at least 2 tokens to correlate, got {self.n} (empty token stream?)")
        n = self.n
        cov = n * self.sab - torch.outer(self.sa, self.sb)  # (F_A, F_B)
        va = n * self.saa - self.sa ** 2  # (F_A,)
        vb = n * self.sbb - self.sb ** 2  # (F_B,)
        eps_a = 1e-12 * n * self.saa.clamp_min(1e-300)
        eps_b = 1e-12 * n * self.sbb.clamp_min(1e-300)
        va = torch.where(va > eps_a, va, torch.full_like(va, float("nan")))
        vb = torch.where(vb > eps_b, vb, torch.full_like(vb, float("nan")))
        return (cov / torch.sqrt(torch.outer(va, vb))).clamp(-1, 1)


def pearson_matrix(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Cross-correlation (F_A, F_B) of a (N, F_A) and b (N, F_B), computed in chunks of tokens."""
    acc = PearsonAccumulator(a.shape[1], b.shape[1])
    for s in range(0, a.shape[0], chunk):
        acc.update(a[s: s + chunk], b[s: s + chunk])
    return acc.corr()


def mppc(corr: torch.Tensor) -> torch.Tensor:
    """MPPC(i) = max_j corr(i, j): (F_A, F_B) -> (F_A,); NaN for a dead feature of A (or no live feature of B)."""
    c = torch.nan_to_num(corr, nan=-2.0)
    m = c.max(1).values
    return torch.where(m < -1.5, torch.full_like(m, float("nan")), m)


def summarize(values: torch.Tensor | np.ndarray, bins: int = 20, seed: int = 0) -> dict[str, Any]:
    """Mean (bootstrap 95% CI), median, fraction above 0.5 / 0.7, histogram of MPPC values (NaNs dropped)."""
    from lmlab.core.metrics import bootstrap_ci

    v = np.asarray(values, dtype=np.float64)
    n_dead = int(np.isnan(v).sum())
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise LmlabError("no live feature to compare (every feature is constant on the token stream)")
    counts, edges = np.histogram(v, bins=bins, range=(-1.0, 1.0) if v.min() < 0 else (0.0, 1.0))
    out: dict[str, Any] = {"n": int(v.size), "n_dead": n_dead, "mean": float(v.mean()), "median": float(np.median(v))}
    if v.size >= 2:
        _, lo, hi = bootstrap_ci(v, n=1000, seed=seed)
        out["mean_ci"] = [lo, hi]
    for t in THRESHOLDS:
        out[f"frac_gt_{t}"] = float((v > t).mean())
    out["hist"] = {"counts": counts.tolist(), "edges": edges.tolist()}
    return out


class TokenEntropy:
    """Complexity proxy: per-feature entropy (nats) of the token ids a feature fires on, weighted by activation,
    and the top-token share (concentration). Streaming over chunks: (F, V) weight table."""

    def __init__(self, n_features: int, vocab: int):
        self.w = torch.zeros(n_features, vocab, dtype=torch.float64)

    def update(self, feats: torch.Tensor, ids: torch.Tensor) -> None:
        """feats (n, F) >= 0 activations, ids (n,) token ids."""
        f = feats.double().clamp_min(0).T  # (F, n)
        self.w.index_add_(1, ids.long(), f)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        tot = self.w.sum(1, keepdim=True)  # (F, 1)
        p = self.w / tot.clamp_min(1e-300)
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
        top = p.max(1).values
        dead = tot.squeeze(1) <= 0
        return ent.masked_fill(dead, float("nan")), top.masked_fill(dead, float("nan"))


# ----------------------------------------------------------------------------------------------------------
# the command


@dataclass
class SimilarityConfig(RunArgs):
    """Compare the SAE features of two models on one token stream (Max Pairwise Pearson Correlation)."""

    sae_a: str = ""
    """SAE training run dir (or one SAE folder) of model A."""
    sae_b: str = ""
    """SAE training run dir (or one SAE folder) of model B (same tokenizer as A)."""
    extra: list[str] = field(default_factory=list)
    """More B-sides as LABEL=SAE_RUN (e.g. sae_seed=runs/sae-s1 for the SAE-seed skyline, model_seed=...)."""
    random_baseline: bool = True
    """Also compare A against B's SAEs applied to B's architecture with random (untrained) weights."""
    neurons: bool = True
    """Also compare raw hook activations (neurons) of A and B, and A against the random-weights B."""
    tokens: int = 32_768
    """Tokens of the validation stream used for the correlations."""
    data: str = "code,prose,math"
    """Text: corpus domains (comma-separated), a text/jsonl/parquet path, or hf:NAME."""
    max_bytes: int = REF_MAX_BYTES
    """Corpus build cap per domain (keep the models' training value so the val split is held out)."""
    seq_len: int = 256
    """LM context length in tokens."""
    lm_batch: int = 16
    """Sequences per LM forward."""
    min_fires: int = 10
    """A-features firing on fewer tokens than this are excluded from the summary (too sparse to correlate)."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens < 2 or self.seq_len < 2 or self.lm_batch < 1:
            raise ConfigError("need tokens >= 2, seq_len >= 2, lm_batch >= 1")
        for e in self.extra:
            if "=" not in e:
                raise ConfigError(f"--extra takes LABEL=SAE_RUN, got {e!r}")


@dataclass
class _Side:
    """One model with its SAEs, ordered by layer."""

    label: str
    model_name: str
    model: Any
    saes: list[Any]  # SAEs in hook order
    hooks: list[str]


def _load_side(label: str, path: str, dev: Any, dtype: Any, trust: bool) -> tuple[_Side, Any]:
    from lmlab.core.models import load
    from lmlab.interp.sae import load_saes, resolve_pairs

    if not Path(path).exists():
        raise LmlabError(f"{label}: SAE run not found: {path}")
    saes = load_saes([path])
    names = {s.model_name for s in saes.values()}
    if len(names) != 1 or not next(iter(names)):
        raise LmlabError(f"{label}: the SAEs under {path} must come from one recorded model, found {sorted(names)}")
    model_name = names.pop()
    model, tok = load(model_name, dev, dtype, trust)
    items = sorted(saes.items(), key=lambda kv: _layer_key(kv[0][0]))
    hooks = [p[0] for p, _ in items]
    resolve_pairs(model, hooks)
    return _Side(label, model_name, model.eval(), [s.to(dev) for _, s in items], hooks), tok


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, name)


def same_tokenizer(tok_a: Any, tok_b: Any) -> bool:
    """Identical vocabularies (token -> id) and special tokens."""
    return tok_a.get_vocab() == tok_b.get_vocab() and tok_a.bos_token_id == tok_b.bos_token_id


def random_weights_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture (config) with freshly initialised weights: the random-weights baseline."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed + 12345)
    p = next(model.parameters())
    return AutoModelForCausalLM.from_config(model.config).to(p.device, p.dtype).eval()


def _encode(side: _Side, acts: dict[str, torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer SAE features on the masked tokens: list of (n, F_l)."""
    with torch.no_grad():
        return [s.encode(acts[h][mask].to(s.W_enc.device, s.W_enc.dtype)).float().cpu()
                for s, h in zip(side.saes, side.hooks)]


def main(cfg: SimilarityConfig) -> Path:
    """``lmlab interp similarity SAE_RUN_A SAE_RUN_B``."""
    from tqdm.auto import tqdm

    from lmlab.core.metrics import spearman
    from lmlab.core.plotting import bar_plot, heatmap, line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.interp.activations import LMActivationSource, special_token_ids

    if not cfg.sae_a or not cfg.sae_b:
        raise ConfigError("give two SAE runs: SAE_RUN_A SAE_RUN_B")
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    side_a, tok = _load_side("A", cfg.sae_a, dev, dtype, cfg.trust_remote_code)
    sides: list[_Side] = []
    specs = [("main", cfg.sae_b)] + [tuple(e.split("=", 1)) for e in cfg.extra]
    for label, path in specs:
        s, tok_b = _load_side(label, path, dev, dtype, cfg.trust_remote_code)
        if not same_tokenizer(tok, tok_b):
            raise LmlabError(f"{label}: {s.model_name} and {side_a.model_name} use different tokenizers; MPPC needs "
                             "both models run on identical token streams")
        sides.append(s)
    if cfg.random_baseline:
        b = sides[0]
        sides.append(_Side("random", b.model_name + " (random weights)", random_weights_copy(b.model, cfg.seed),
                           b.saes, b.hooks))
    from lmlab.core.zoo import token_streams

    _, ids, _ = token_streams(tok, cfg.data, cfg.max_bytes, seed=0)
    ids = np.asarray(ids).reshape(-1)[: cfg.tokens + cfg.tokens // max(1, cfg.seq_len - 1) + cfg.seq_len]
    if ids.size < cfg.seq_len:
        raise LmlabError(f"empty token stream: {cfg.data!r} gives {ids.size} validation tokens, fewer than one "
                         f"sequence of {cfg.seq_len}")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    special = special_token_ids(tok)

    def source(model: Any, hooks: list[str]) -> LMActivationSource:
        return LMActivationSource(model, hooks, ids, seq_len=cfg.seq_len, lm_batch=cfg.lm_batch, bos_id=bos,
                                  special_ids=special, shuffle=False)

    vocab = len(tok.get_vocab())
    with start_run(cfg, "interp-similarity", device=dev, dtype=dtype, threads=threads) as run:
        src_a = source(side_a.model, side_a.hooks)
        srcs = [source(s.model, s.hooks) for s in sides]
        fa = [s.d_sae for s in side_a.saes]
        acc = {s.label: [[PearsonAccumulator(x, y.d_sae) for y in s.saes] for x in fa] for s in sides}
        neuron_sides = [s for s in sides if s.label in ("main", "random")] if cfg.neurons else []
        nacc: dict[str, list[list[PearsonAccumulator]]] = {}
        dims_a = src_a.dims()
        for s, src in zip(sides, srcs):
            if s in neuron_sides:
                db = src.dims()
                nacc[s.label] = [[PearsonAccumulator(dims_a[h], db[g]) for g in s.hooks] for h in side_a.hooks]
        ent = TokenEntropy(sum(fa), vocab)
        fires = torch.zeros(sum(fa), dtype=torch.long)
        seen = 0
        bar = tqdm(total=cfg.tokens, desc="similarity", disable=None)
        gens = [src.lm_batches(None) for src in srcs]
        for batch_a in src_a.lm_batches(None):
            if seen >= cfg.tokens:
                break
            mask = batch_a["mask"]
            feats_a = _encode(side_a, batch_a["acts"], mask)
            cat_a = torch.cat(feats_a, 1)
            tok_ids = batch_a["input_ids"][mask]
            ent.update(cat_a, tok_ids)
            fires += (cat_a > 0).sum(0)
            for s, g in zip(sides, gens):
                batch_b = next(g)
                if not torch.equal(batch_b["input_ids"], batch_a["input_ids"]):
                    raise LmlabError("internal: the two models saw different tokens")
                feats_b = _encode(s, batch_b["acts"], mask)
                for i, x in enumerate(feats_a):
                    for j, y in enumerate(feats_b):
                        acc[s.label][i][j].update(x, y)
                if s.label in nacc:
                    for i, h in enumerate(side_a.hooks):
                        for j, gname in enumerate(s.hooks):
                            nacc[s.label][i][j].update(batch_a["acts"][h][mask], batch_b["acts"][gname][mask])
            n = int(mask.sum())
            seen += n
            bar.update(n)
        bar.close()
        if seen < 2:
            raise LmlabError("empty token stream: no scorable tokens (all BOS/EOS/PAD?)")
        if seen < cfg.tokens:
            log.warning("the validation stream has only %d of the %d requested tokens", seen, cfg.tokens)
        live = fires >= cfg.min_fires  # (F_A,) features of A with enough firings
        entropy, top_share = ent.result()
        results: dict[str, Any] = {"model_a": side_a.model_name, "hooks_a": side_a.hooks, "tokens": seen,
                                   "n_features_a": int(live.numel()), "n_live_a": int(live.sum()),
                                   "comparisons": {}, "neurons": {}, "depth": {}}
        hist_series: dict[str, list[float]] = {}
        per_feature: dict[str, torch.Tensor] = {}
        for s in sides:
            rows, depth = [], np.zeros((len(fa), len(s.saes)))
            for i in range(len(fa)):
                cs = [acc[s.label][i][j].corr() for j in range(len(s.saes))]
                live_i = _live(live, fa, i)
                for j, c in enumerate(cs):
                    depth[i, j] = float(np.nanmean(mppc(c).numpy()[live_i])) if live_i.any() else float("nan")
                rows.append(mppc(torch.cat(cs, 1)))
            m = torch.cat(rows).masked_fill(~live, float("nan"))  # (F_A,)
            per_feature[s.label] = m
            summ = summarize(m, seed=cfg.seed)
            summ.update(model_b=s.model_name, hooks_b=s.hooks)
            results["comparisons"][s.label] = summ
            results["depth"][s.label] = depth.tolist()
            hist_series[s.label] = summ["hist"]["counts"]
            edges = summ["hist"]["edges"]
            heatmap(run.plots / f"depth_{s.label}.png", depth, title=f"mean MPPC by layer: A vs {s.label}",
                    xlabel=f"B layer ({s.model_name})", ylabel=f"A layer ({side_a.model_name})",
                    yticklabels=[str(i) for i in range(len(fa))], xticklabels=[str(j) for j in range(len(s.saes))])
        for label, grid in nacc.items():
            m = torch.cat([mppc(torch.cat([c.corr() for c in row], 1)) for row in grid])
            results["neurons"][label] = summarize(m, seed=cfg.seed)
        main_m = per_feature["main"].numpy()
        ok = ~np.isnan(main_m) & ~np.isnan(entropy.numpy())
        if ok.sum() >= 3:
            results["complexity"] = {
                "spearman_mppc_entropy": float(spearman(main_m[ok], entropy.numpy()[ok])),
                "spearman_mppc_top_token_share": float(spearman(main_m[ok], top_share.numpy()[ok])),
                "mean_mppc_by_entropy_tercile": _terciles(entropy.numpy()[ok], main_m[ok]),
            }
        centers = [(edges[k] + edges[k + 1]) / 2 for k in range(len(edges) - 1)]
        line_plot(run.plots / "mppc_hist.png", {k: centers for k in hist_series}, hist_series,
                  title=f"MPPC of {side_a.model_name} features", xlabel="MPPC", ylabel="features")
        labels = list(results["comparisons"])
        bar_plot(run.plots / "mppc_mean.png", labels, [results["comparisons"][k]["mean"] for k in labels],
                 title="mean MPPC", ylabel="mean MPPC")
        run.finish(results)
    return run.path


def _live(live: torch.Tensor, sizes: list[int], i: int) -> np.ndarray:
    s = sum(sizes[:i])
    return live[s: s + sizes[i]].numpy()


def _terciles(x: np.ndarray, y: np.ndarray) -> list[float]:
    q = np.quantile(x, [1 / 3, 2 / 3])
    groups = [y[x <= q[0]], y[(x > q[0]) & (x <= q[1])], y[x > q[1]]]
    return [float(g.mean()) if g.size else math.nan for g in groups]


def synthetic_codes(n: int, n_latents: int, d: int, p: float = 0.03, seed: int = 0,
                    codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic 'model' activations: sparse codes (n, L) (prob p, magnitude U[0.5, 2.5]) through a random unit
    dictionary (L, d) -> (n, d). Reusing ``codes`` with another seed = same features, different basis."""
    g = torch.Generator().manual_seed(seed)
    if codes is None:
        on = torch.rand(n, n_latents, generator=g) < p
        codes = on * (0.5 + 2.0 * torch.rand(n, n_latents, generator=g))
    dic = torch.randn(n_latents, d, generator=g)
    dic = dic / dic.norm(dim=1, keepdim=True)
    return codes, codes @ dic
