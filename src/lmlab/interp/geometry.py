"""Feature geometry and feature splitting between SAEs of different sizes (``lmlab interp sae geometry``).

Paper: Z. He et al., *Llama Scope: Extracting Millions of Features from Llama-3.1-8B with Sparse Autoencoders*,
arXiv 2410.20526, feature-geometry analysis (8x vs 32x SAEs of the same hook point): a wider SAE finds genuinely
new features, and a latent of the small SAE often *splits* into several more specific latents of the large one
(feature splitting: Bricken et al. 2023, *Towards Monosemanticity*). lmlab measures, for SAE_SMALL and SAE_LARGE
trained on the same hook point of the same model:

**Decoder geometry** (over live latents: those firing >= 10 times on the held-out tokens; dead latents keep
their random initial directions). Unit decoder rows ``w_i = W_D,i / ||W_D,i||`` (d,). Nearest-neighbour cosine::

    nn(i) = max_{j != i} <w_i, w_j>                                   (n,) per dictionary

compared with the same statistic for ``n`` random Gaussian directions in ``d`` dimensions (the baseline: a learned
dictionary has far closer neighbours than chance when features cluster or split).

**Small -> large matching.** ``C = W_small W_large^T`` (n_s, n_l) cosine matrix; every small latent's ``top``
nearest large latents (cosine and index); the distribution of the best cosine.

**Split detection** on the same N held-out tokens, with firing sets ``S_i`` (tokens where small latent i is
non-zero) and ``T_j`` (large latent j). A small latent i *splits* into children J when

    candidates   j with cos(w_i, v_j) >= cos_min                      decoder direction kept
    share_j      = |T_j ∩ S_i| / |S_i|   >= min_share                 each child covers part of the parent
    precision_j  = |T_j ∩ S_i| / |T_j|   >= min_precision             and fires mostly where the parent does
    greedy (largest share first): keep j only if its overlap coefficient
                 |T_a ∩ T_b ∩ S_i| / min(|T_a ∩ S_i|, |T_b ∩ S_i|) <= max_overlap with every kept child
    |J| >= min_children  and  coverage = |∪_j T_j ∩ S_i| / |S_i| >= min_coverage

i.e. several large latents with high decoder cosine to the parent *partition* its activation contexts. A
persisting feature (one large latent that alone covers the parent) blocks a split, as it should.

Outputs: ``results.json`` (geometry statistics, matches, every split with children, cosines, shares and top
tokens), ``splits.html`` (each split: the parent's and every child's top-activating contexts, dashboard style),
``plots/nn_cosine.png`` (nearest-neighbour cosine histograms vs random directions), ``plots/match_cosine.png``
and ``plots/decoder_map.png`` (2-D PCA map of both dictionaries' decoder directions coloured by split family).

Defaults: cos_min 0.5, min_share 0.05, min_precision 0.3, max_overlap 0.2, min_children 2, min_coverage 0.5,
32,768 held-out tokens.
"""

from __future__ import annotations

import html
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
# pure maths


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm: (n, d) -> (n, d)."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_neighbour_cos(W: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``nn(i) = max_{j != i} cos(w_i, w_j)`` for the rows of W (n, d) -> (n,) (chunked: O(chunk * n) memory)."""
    U = unit_rows(W)
    n = U.shape[0]
    out = torch.empty(n)
    for a in range(0, n, chunk):
        c = U[a: a + chunk] @ U.T  # (c, n)
        c[torch.arange(c.shape[0]), torch.arange(a, a + c.shape[0])] = -math.inf
        out[a: a + chunk] = c.max(1).values
    return out


def random_directions(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``n`` isotropic random unit vectors in ``d`` dimensions (the geometry baseline): (n, d)."""
    return unit_rows(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def match_latents(W_small: torch.Tensor, W_large: torch.Tensor, top: int = 5, chunk: int = 2048
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each small latent's ``top`` nearest large latents by decoder cosine: (n_s, top) cosines, (n_s, top) ids."""
    A, B = unit_rows(W_small), unit_rows(W_large)
    top = min(top, B.shape[0])
    vals, idx = [], []
    for a in range(0, A.shape[0], chunk):
        r = (A[a: a + chunk] @ B.T).topk(top, dim=1)  # (c, top)
        vals.append(r.values)
        idx.append(r.indices)
    return torch.cat(vals), torch.cat(idx)


def firing_positions(pos: torch.Tensor, feat: torch.Tensor, n_features: int) -> list[torch.Tensor]:
    """Sparse code ``(token position (nnz,), feature (nnz,))`` -> per feature the sorted positions where it fires."""
    order = torch.argsort(feat * (int(pos.max()) + 1 if pos.numel() else 1) + pos)  # by feature, then position
    counts = torch.bincount(feat, minlength=n_features).tolist()
    return list(pos[order].split(counts))


def _inter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted intersection of two sorted position tensors."""
    if a.numel() == 0 or b.numel() == 0:
        return a[:0]
    return a[torch.isin(a, b)]


@dataclass
class SplitParams:
    """Thresholds of the split detector (see the module docstring)."""

    cos_min: float = 0.5
    """Minimum decoder cosine between a parent and a child."""
    min_share: float = 0.05
    """A child must fire on at least this fraction of the parent's tokens."""
    min_precision: float = 0.3
    """A child must fire inside the parent's tokens at least this often."""
    max_overlap: float = 0.2
    """Maximum overlap coefficient between two children's contexts inside the parent (partition)."""
    min_children: int = 2
    """Children needed for a split."""
    min_coverage: float = 0.5
    """The children together must cover at least this fraction of the parent's tokens."""
    min_fires: int = 10
    """A latent firing on fewer held-out tokens counts as dead (not a parent or child)."""
    candidates: int = 16
    """Nearest large latents (by decoder cosine) examined per small latent."""

    def __post_init__(self) -> None:
        if self.min_children < 2 or self.min_fires < 1 or self.candidates < 1:
            raise ConfigError("split: need min_children >= 2, min_fires >= 1, candidates >= 1")
        for name in ("cos_min", "min_share", "min_precision", "max_overlap", "min_coverage"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"split.{name} must be in [0, 1], got {getattr(self, name)}")


def detect_splits(W_small: torch.Tensor, W_large: torch.Tensor, fires_small: list[torch.Tensor],
                  fires_large: list[torch.Tensor], params: SplitParams | None = None) -> list[dict[str, Any]]:
    """Small latents whose activation contexts are partitioned by several large latents with high decoder cosine.

    W_small (n_s, d), W_large (n_l, d) decoder rows; fires_*: per latent the sorted token positions where it fires
    (:func:`firing_positions`, same token stream for both). Returns one dict per split: ``parent``, ``children``
    (list of ``{latent, cos, share, precision}``), ``coverage``, ``max_overlap``, ``parent_fires``."""
    p = params or SplitParams()
    cos, idx = match_latents(W_small, W_large, top=p.candidates)  # (n_s, c)
    splits = []
    for i in range(W_small.shape[0]):
        S = fires_small[i]
        if S.numel() < p.min_fires:
            continue
        kids = []
        for c, j in zip(cos[i].tolist(), idx[i].tolist()):
            if c < p.cos_min:
                break  # sorted descending
            T = fires_large[j]
            inter = _inter(T, S)
            share = inter.numel() / S.numel()
            prec = inter.numel() / max(1, T.numel())
            if share >= p.min_share and prec >= p.min_precision:
                kids.append({"latent": j, "cos": c, "share": share, "precision": prec, "_inter": inter})
        if len(kids) < p.min_children:
            continue
        kids.sort(key=lambda r: -r["share"])
        kept: list[dict[str, Any]] = []
        worst = 0.0
        for k in kids:
            ov = [_inter(k["_inter"], q["_inter"]).numel() / max(1, min(k["_inter"].numel(), q["_inter"].numel()))
                  for q in kept]
            if all(o <= p.max_overlap for o in ov):
                kept.append(k)
                worst = max([worst, *ov])
        if len(kept) < p.min_children:
            continue
        union = torch.unique(torch.cat([k["_inter"] for k in kept]))
        coverage = union.numel() / S.numel()
        if coverage < p.min_coverage:
            continue
        splits.append({"parent": i, "parent_fires": int(S.numel()), "coverage": coverage, "max_overlap": worst,
                       "children": [{k2: v for k2, v in k.items() if k2 != "_inter"} for k in kept]})
    splits.sort(key=lambda s: (-len(s["children"]), -s["coverage"]))
    return splits


def summarize(x: torch.Tensor) -> dict[str, float]:
    x = x.float()
    if x.numel() == 0:
        return {"n": 0}
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9]))
    return {"n": int(x.numel()), "mean": float(x.mean()), "p10": float(q[0]), "median": float(q[1]),
            "p90": float(q[2]), "frac_gt_0.5": float((x > 0.5).float().mean()),
            "frac_gt_0.7": float((x > 0.7).float().mean()), "frac_gt_0.9": float((x > 0.9).float().mean())}


def pca_2d(X: torch.Tensor) -> torch.Tensor:
    """First two principal components of the rows of X (n, d) -> (n, 2)."""
    Xc = X.float() - X.float().mean(0, keepdim=True)
    _, _, V = torch.linalg.svd(Xc, full_matrices=False)
    return Xc @ V[:2].T


def geometry_stats(small: Any, large: Any, seed: int = 0, top: int = 5, alive_small: torch.Tensor | None = None,
                   alive_large: torch.Tensor | None = None) -> dict[str, Any]:
    """Decoder geometry of two SAEs: nearest-neighbour cosines (and random baselines of the same counts), and
    small->large matches. With ``alive_*`` masks (d_sae,) bool only those latents count (dead latents keep their
    random initial directions); match indices are always in the full large dictionary."""
    d = small.W_dec.shape[1]
    a_s = alive_small if alive_small is not None else torch.ones(small.d_sae, dtype=torch.bool)
    a_l = alive_large if alive_large is not None else torch.ones(large.d_sae, dtype=torch.bool)
    Ws, Wl = small.W_dec.detach()[a_s], large.W_dec.detach()[a_l]
    if Ws.shape[0] < 2 or Wl.shape[0] < 2:
        raise LmlabError(f"too few live latents to compare ({Ws.shape[0]} small, {Wl.shape[0]} large); "
                         "use more --tokens")
    nn_s, nn_l = nearest_neighbour_cos(Ws), nearest_neighbour_cos(Wl)
    rnd_s = nearest_neighbour_cos(random_directions(Ws.shape[0], d, seed))
    rnd_l = nearest_neighbour_cos(random_directions(Wl.shape[0], d, seed + 1))
    cos, idx = match_latents(Ws, Wl, top)
    return {"nn_small": nn_s, "nn_large": nn_l, "nn_random_small": rnd_s, "nn_random_large": rnd_l,
            "match_cos": cos, "match_idx": a_l.nonzero().squeeze(1)[idx], "small_ids": a_s.nonzero().squeeze(1)}


def check_compatible(small: Any, large: Any) -> None:
    """Geometry compares dictionaries of the same activation space: same model, hook point(s) and width."""
    if (small.hook_name, small.hook_name_out) != (large.hook_name, large.hook_name_out):
        raise LmlabError(f"the SAEs read different hook points ({small.hook_name} vs {large.hook_name}); geometry "
                         "compares SAEs of the same hook point")
    if small.model_name and large.model_name and small.model_name != large.model_name:
        raise LmlabError(f"the SAEs were trained on different models ({small.model_name} vs {large.model_name}); "
                         "geometry compares SAEs of the same model")
    if small.d_out != large.d_out or small.d_in != large.d_in:
        raise LmlabError(f"the SAEs have different widths (d_in {small.d_in} vs {large.d_in})")


# ----------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class GeometryConfig(RunArgs):
    """Decoder geometry and feature splitting between a small and a large SAE of the same hook point."""

    small: str = ""
    """The smaller SAE (an SAE folder or a training run dir)."""
    large: str = ""
    """The larger SAE (same model and hook point)."""
    hook: str = ""
    """Hook point to pick when a run dir holds several SAEs."""
    model: str = ""
    """Model (default: the model_name stored with the SAEs)."""
    tokens: int = 32_768
    """Held-out tokens on which firing sets are compared."""
    split: SplitParams = field(default_factory=SplitParams)
    """Thresholds of the split detector (``split.cos_min=0.6`` ...)."""
    top: int = 5
    """Nearest large latents reported per small latent."""
    examples: int = 12
    """Splits shown in splits.html."""
    contexts: int = 5
    """Top-activating contexts shown per latent."""
    window: int = 8
    """Tokens of context either side."""
    data: str = "code,prose,math"
    """Text: corpus domains, a path, or hf:NAME."""
    max_bytes: int = 8_000_000
    """Corpus build cap per domain."""
    seq_len: int = 256
    """LM context length."""
    lm_batch: int = 8
    """Sequences per LM forward."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens < 1 or self.top < 1:
            raise ConfigError("need tokens >= 1, top >= 1")


def _load_one(path: str, hook: str, what: str) -> Any:
    from lmlab.interp.sae import find_saes, load_sae

    if not path:
        raise ConfigError(f"give the {what} SAE (positional argument)")
    saes = [load_sae(d) for d in find_saes(path)]
    if hook:
        saes = [s for s in saes if s.hook_name == hook]
    if len(saes) != 1:
        hooks = sorted(s.hook_name for s in saes) if saes else "none"
        raise LmlabError(f"{path}: {len(saes)} SAEs match (hooks: {hooks}); pick one with --hook")
    return saes[0]


def _contexts(tok: Any, ids: torch.Tensor, pos: torch.Tensor, val: torch.Tensor, n: int, window: int) -> list[str]:
    """HTML of the ``n`` top-activating contexts of one latent: pos/val (m,) its firing positions and values."""
    from lmlab.interp.dashboard import _span, _tok_str

    if pos.numel() == 0:
        return []
    T = ids.shape[1]
    flat = ids.reshape(-1)
    act = dict(zip(pos.tolist(), val.tolist()))
    vmax = float(val.max())
    rows = []
    for t_i in val.topk(min(n, val.numel())).indices.tolist():
        p = int(pos[t_i])
        s, t = divmod(p, T)
        lo, hi = max(0, t - window), min(T, t + window + 1)
        spans = "".join(_span(_tok_str(tok, flat[s * T + j]), act.get(s * T + j, 0.0), vmax, j == t)
                        for j in range(lo, hi))
        rows.append(f"<div class='ex'><span class='act'>{float(val[t_i]):.3f}</span>{spans}</div>")
    return rows


def _top_tokens(tok: Any, ids: torch.Tensor, pos: torch.Tensor, n: int = 5) -> list[str]:
    from lmlab.interp.dashboard import _tok_str

    if pos.numel() == 0:
        return []
    t = ids.reshape(-1)[pos]
    vals, counts = t.unique(return_counts=True)
    return [_tok_str(tok, int(vals[i])) for i in counts.argsort(descending=True)[:n].tolist()]


def render_splits(small: Any, large: Any, splits: list[dict[str, Any]], ctx: dict[str, Any], n: int) -> str:
    """splits.html: per split the parent's and each child's top contexts (dashboard styling)."""
    from lmlab.interp.dashboard import _CSS

    parts = [f"<!doctype html><meta charset='utf-8'><title>feature splits</title><style>{_CSS}</style>",
             f"<h1>Feature splits: {small.d_sae} &rarr; {large.d_sae} latents</h1>",
             f"<p>model <code>{html.escape(small.model_name)}</code>, hook <code>{html.escape(small.hook_name)}"
             f"</code>; {len(splits)} splits found; showing {min(n, len(splits))}.</p>"]
    for s in splits[:n]:
        i = s["parent"]
        parts.append(f"<div class='card'><h3>small latent {i} &rarr; large latents "
                     + ", ".join(str(c["latent"]) for c in s["children"])
                     + f"</h3><p>parent fires on {s['parent_fires']} tokens; children cover {s['coverage']:.0%}, "
                     f"max overlap {s['max_overlap']:.2f}</p><p><b>parent</b> (small {i})</p>")
        parts += ctx["small"](i)
        for c in s["children"]:
            parts.append(f"<p><b>child</b> large {c['latent']}: cos {c['cos']:.2f}, covers {c['share']:.0%} of the "
                         f"parent, fires inside the parent {c['precision']:.0%} of the time</p>")
            parts += ctx["large"](c["latent"])
        parts.append("</div>")
    return "\n".join(parts) + "\n"


def main(cfg: GeometryConfig) -> Path:
    """``lmlab interp sae geometry SAE_SMALL SAE_LARGE``."""
    from lmlab.core.models import load
    from lmlab.core.plotting import line_plot, scatter_plot
    from lmlab.core.runs import atomic_write, start_run
    from lmlab.core.runtime import setup
    from lmlab.interp.activations import open_source
    from lmlab.interp.dashboard import feature_records

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    small, large = _load_one(cfg.small, cfg.hook, "small"), _load_one(cfg.large, cfg.hook, "large")
    check_compatible(small, large)
    if small.d_sae > large.d_sae:
        log.warning("SAE_SMALL has more latents (%d) than SAE_LARGE (%d); swapping them", small.d_sae, large.d_sae)
        small, large = large, small
    model_name = cfg.model or small.model_name
    if not model_name:
        raise LmlabError("the SAEs do not record their model; pass --model")
    model, tok = load(model_name, dev, dtype, cfg.trust_remote_code)
    from lmlab.interp.sae import resolve_pairs

    resolve_pairs(model, [small.hook_name])
    with start_run(cfg, "interp-sae-geometry", device=dev, dtype=dtype, threads=threads) as run:
        names = sorted({small.hook_name, small.hook_name_out})
        src = open_source(model, tok, names, data=cfg.data, max_bytes=cfg.max_bytes, seq_len=cfg.seq_len,
                          lm_batch=cfg.lm_batch, seed=cfg.seed, split="val")
        keys = {"small": (small.hook_name, "small"), "large": (small.hook_name, "large")}
        rec = feature_records(src, {keys["small"]: small, keys["large"]: large}, cfg.tokens)
        codes = {k: rec["codes"][v] for k, v in keys.items()}  # (pos, feat, val) per SAE
        fires = {"small": firing_positions(codes["small"][0], codes["small"][1], small.d_sae),
                 "large": firing_positions(codes["large"][0], codes["large"][1], large.d_sae)}
        splits = detect_splits(small.W_dec, large.W_dec, fires["small"], fires["large"], cfg.split)
        min_fires = cfg.split.min_fires
        alive = {k: torch.tensor([f.numel() >= min_fires for f in v]) for k, v in fires.items()}
        geo = geometry_stats(small, large, cfg.seed, cfg.top, alive["small"], alive["large"])  # live latents only
        by_feat = {}
        for k, (pos, feat, val) in codes.items():
            order = torch.argsort(feat, stable=True)
            n_f = small.d_sae if k == "small" else large.d_sae
            cnt = torch.bincount(feat, minlength=n_f).tolist()
            by_feat[k] = (list(pos[order].split(cnt)), list(val[order].split(cnt)))

        def ctx_fn(k: str):
            return lambda i: _contexts(tok, rec["ids"], by_feat[k][0][i], by_feat[k][1][i], cfg.contexts,
                                       cfg.window)

        for s in splits:
            s["parent_tokens"] = _top_tokens(tok, rec["ids"], by_feat["small"][0][s["parent"]])
            for c in s["children"]:
                c["tokens"] = _top_tokens(tok, rec["ids"], by_feat["large"][0][c["latent"]])
        atomic_write(run.path / "splits.html",
                     render_splits(small, large, splits, {"small": ctx_fn("small"), "large": ctx_fn("large")},
                                   cfg.examples))
        # plots
        edges = torch.linspace(-0.2, 1.0, 25)
        centers = ((edges[1:] + edges[:-1]) / 2).tolist()
        hist = {}
        for label, key in (("small SAE", "nn_small"), ("large SAE", "nn_large"),
                           ("random (small n)", "nn_random_small"), ("random (large n)", "nn_random_large")):
            h = torch.histogram(geo[key].clamp(-0.2, 1.0), bins=edges).hist
            hist[label] = (h / h.sum().clamp_min(1)).tolist()
        line_plot(run.plots / "nn_cosine.png", centers, hist, title="nearest-neighbour decoder cosine",
                  xlabel="max cosine to another latent", ylabel="fraction of latents")
        h = torch.histogram(geo["match_cos"][:, 0].clamp(-0.2, 1.0), bins=edges).hist
        line_plot(run.plots / "match_cosine.png", centers, {"small -> best large": (h / h.sum()).tolist()},
                  title="best decoder cosine of each small latent in the large SAE", xlabel="cosine",
                  ylabel="fraction of small latents")
        U = torch.cat([unit_rows(small.W_dec), unit_rows(large.W_dec)])  # all latents; dead ones are drawn too
        xy = pca_2d(U)
        ns = small.d_sae
        series_x: dict[str, list[float]] = {}
        series_y: dict[str, list[float]] = {}
        in_family: set[int] = set()
        for f, s in enumerate(splits[:8]):
            rows = [s["parent"]] + [ns + c["latent"] for c in s["children"]]
            in_family.update(rows)
            label = f"split {f + 1}: small {s['parent']} -> {len(s['children'])}"
            series_x[label], series_y[label] = xy[rows, 0].tolist(), xy[rows, 1].tolist()
        for label, rng in (("small SAE", range(ns)), ("large SAE", range(ns, U.shape[0]))):
            rows = [r for r in rng if r not in in_family]
            series_x[label], series_y[label] = xy[rows, 0].tolist(), xy[rows, 1].tolist()
        order = ["small SAE", "large SAE"] + [k for k in series_x if k.startswith("split")]
        scatter_plot(run.plots / "decoder_map.png", {k: series_x[k] for k in order}, {k: series_y[k] for k in order},
                     title="decoder directions, PCA (coloured by split family)", xlabel="PC1", ylabel="PC2")
        alive_small = int(alive["small"].sum())
        best = geo["match_cos"][:, 0]
        results = {
            "model": model_name, "hook": small.hook_name, "tokens": rec["tokens"],
            "small": {"d_sae": small.d_sae, "k": small.k, "alive": alive_small},
            "large": {"d_sae": large.d_sae, "k": large.k, "alive": int(alive["large"].sum())},
            "alive_min_fires": min_fires,
            "nn_cos": {k: summarize(geo[k]) for k in ("nn_small", "nn_large", "nn_random_small", "nn_random_large")},
            "match_best_cos": summarize(best),
            "matches": [{"small": int(i), "large": geo["match_idx"][r].tolist(),
                         "cos": [round(c, 4) for c in geo["match_cos"][r].tolist()]}
                        for r, i in enumerate(geo["small_ids"].tolist())],
            "n_splits": len(splits),
            "split_fraction_of_alive": len(splits) / max(1, alive_small),
            "children_histogram": {str(n): sum(1 for s in splits if len(s["children"]) == n)
                                   for n in sorted({len(s["children"]) for s in splits})},
            "splits": splits,
            "params": vars(cfg.split),
            "pages": {"splits": "splits.html"},
        }
        run.finish(results)
    return run.path


def splits_table(res: dict[str, Any], n: int = 5) -> str:
    """Short text of a geometry result: geometry numbers and the first ``n`` splits."""
    nn = res["nn_cos"]
    lines = [f"{res['small']['d_sae']} -> {res['large']['d_sae']} latents ({res['small']['alive']} / "
             f"{res['large']['alive']} live) at {res['hook']} on {res['tokens']} tokens: "
             f"nearest-neighbour cosine mean small {nn['nn_small']['mean']:.3f} / large {nn['nn_large']['mean']:.3f} "
             f"(random directions {nn['nn_random_small']['mean']:.3f} / {nn['nn_random_large']['mean']:.3f}); "
             f"best small->large cosine median {res['match_best_cos']['median']:.3f}; "
             f"{res['n_splits']} splits ({res['split_fraction_of_alive']:.1%} of alive small latents)."]
    for s in res["splits"][:n]:
        kids = "; ".join(f"L{c['latent']} cos {c['cos']:.2f} {c['share']:.0%} [{' '.join(c.get('tokens', [])[:3])}]"
                         for c in s["children"])
        lines.append(f"  small {s['parent']} [{' '.join(s.get('parent_tokens', [])[:3])}] -> {kids}")
    return "\n".join(lines)


__all__ = ["GeometryConfig", "SplitParams", "check_compatible", "detect_splits", "firing_positions",
           "geometry_stats", "main", "match_latents", "nearest_neighbour_cos", "pca_2d", "random_directions",
           "splits_table", "unit_rows"]
