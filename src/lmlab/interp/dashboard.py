"""Static feature dashboards for SAEs (``lmlab interp sae dashboard``).

For each SAE, over ``tokens`` held-out tokens (BOS/EOS/PAD excluded), lmlab records every (token, feature,
activation) triple of the sparse code (TopK: exactly k per token) and writes one self-contained HTML page:

* a feature-density histogram (log10 firing frequency over all latents, dead ones counted at the left edge);
* for the ``features`` most frequently active latents: the top-activating contexts (``context`` tokens either
  side, the token itself highlighted, other tokens shaded by that feature's activation there), and the *logit
  effects* ``W_U W_D,i`` (direct path through the unembedding, final norm ignored, as Neuronpedia/SAEDashboard
  show): the most promoted and most suppressed tokens.

``index.html`` links every SAE page and lists every shown feature with its top tokens in one table with a search
box (plain JavaScript, no server, no download). Pages read only the run's artifacts.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.config import ConfigError, RunArgs

log = logging.getLogger(__name__)


@dataclass
class SAEDashboardConfig(RunArgs):
    """Static HTML feature dashboards: density histogram, top contexts, logit effects, searchable index."""

    sae: list[str] = field(default_factory=list)
    """SAE folders (SAELens or Llama Scope layout) or a training run dir (all SAEs in it)."""
    model: str = ""
    """Model (default: the model_name stored with the SAEs)."""
    tokens: int = 32_768
    """Held-out tokens to scan for activating contexts."""
    features: int = 64
    """Features shown per SAE (the most frequently active ones)."""
    examples: int = 10
    """Top-activating contexts per feature."""
    context: int = 10
    """Tokens of context shown either side of the activating token."""
    logits: int = 8
    """Promoted / suppressed tokens shown per feature."""
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
        for name in ("tokens", "features", "examples", "logits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 0:
            raise ConfigError("context must be >= 0")


@torch.no_grad()
def feature_records(source: Any, saes: dict[tuple[str, str], Any], n_tokens: int) -> dict[str, Any]:
    """Scan ``n_tokens`` masked tokens: ``ids`` (S, T) of every sequence seen, and per SAE the sparse code as
    ``(flat position (nnz,), feature (nnz,), value (nnz,))`` with flat position = seq * T + t, plus counts."""
    seqs, codes = [], {p: ([], [], []) for p in saes}
    seen, offset = 0, 0
    for b in source.lm_batches(n_tokens):
        ids, mask, acts = b["input_ids"], b["mask"], b["acts"]  # (B, T), (B, T), name -> (B, T, d)
        B, T = ids.shape
        pos = (torch.arange(B * T).reshape(B, T) + offset)[mask]  # (n,) flat positions of masked tokens
        for p, sae in saes.items():
            f = sae.encode(acts[p[0]][mask])  # (n, d_sae)
            nz = f.nonzero()  # (nnz, 2)
            codes[p][0].append(pos[nz[:, 0]])
            codes[p][1].append(nz[:, 1])
            codes[p][2].append(f[nz[:, 0], nz[:, 1]])
        seqs.append(ids)
        offset += B * T
        seen += int(mask.sum())
    out: dict[str, Any] = {"ids": torch.cat(seqs), "tokens": seen, "codes": {}}
    for p, (a, b, c) in codes.items():
        out["codes"][p] = (torch.cat(a), torch.cat(b), torch.cat(c))
    return out


def _tok_str(tok: Any, i: int) -> str:
    s = tok.decode([int(i)])
    return s.replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def _span(text: str, act: float, top: float, focus: bool = False) -> str:
    a = 0.0 if top <= 0 else max(0.0, min(1.0, act / top))
    style = f"background:rgba(255,140,0,{a:.2f})" + (";outline:2px solid #c00;font-weight:bold" if focus else "")
    title = f' title="{act:.3f}"' if act else ""
    return f'<span class="t" style="{style}"{title}>{html.escape(text)}</span>'


@torch.no_grad()
def build_feature_cards(sae: Any, rec: dict[str, Any], codes: tuple[torch.Tensor, ...], tok: Any,
                        unembed: torch.Tensor | None, n_features: int, n_examples: int, context: int,
                        n_logits: int) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Per-feature data (density, top contexts as HTML, logit effects) for the most active features."""
    pos, feat, val = codes
    ids = rec["ids"]
    T = ids.shape[1]
    flat = ids.reshape(-1)
    counts = torch.bincount(feat, minlength=sae.d_sae).float()  # (d_sae,)
    density = counts / max(1, rec["tokens"])
    order = counts.argsort(descending=True)[:n_features]
    cards = []
    for f_i in order.tolist():
        if counts[f_i] == 0:
            break
        sel = (feat == f_i).nonzero().squeeze(1)
        v = val[sel]
        top = v.topk(min(n_examples, v.numel())).indices
        vmax = float(v.max())
        feat_act = {int(pp): float(vv) for pp, vv in zip(pos[sel].tolist(), v.tolist())}
        examples = []
        for t_i in top.tolist():
            p = int(pos[sel[t_i]])
            s, t = divmod(p, T)
            lo, hi = max(0, t - context), min(T, t + context + 1)
            spans = [_span(_tok_str(tok, flat[s * T + j]), feat_act.get(s * T + j, 0.0), vmax, j == t)
                     for j in range(lo, hi)]
            examples.append({"act": float(v[t_i]), "html": "".join(spans), "token": _tok_str(tok, flat[p])})
        card: dict[str, Any] = {"feature": f_i, "density": float(density[f_i]), "max_act": vmax,
                                "mean_act": float(v.mean()), "examples": examples}
        if unembed is not None and sae.d_out == unembed.shape[1]:
            eff = unembed @ sae.W_dec[f_i].float()  # (V,)
            up, down = eff.topk(n_logits), (-eff).topk(n_logits)
            card["promoted"] = [(_tok_str(tok, i), float(x)) for x, i in zip(up.values, up.indices)]
            card["suppressed"] = [(_tok_str(tok, i), float(-x)) for x, i in zip(down.values, down.indices)]
        cards.append(card)
    return cards, density


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px}h1{font-size:1.4em}
.t{font-family:monospace;white-space:pre;border-radius:2px}.card{border:1px solid #ccc;border-radius:6px;
padding:.6em 1em;margin:1em 0}.ex{margin:.2em 0}.act{display:inline-block;width:4.5em;color:#555;font-size:.85em}
table{border-collapse:collapse}td,th{border-bottom:1px solid #eee;padding:2px 8px;text-align:left;font-size:.9em}
.pos{color:#060}.neg{color:#a00}input{font-size:1em;padding:4px;width:24em}"""


def render_sae_page(name: str, sae: Any, cards: list[dict[str, Any]], hist_png: str, summary: dict[str, Any]
                    ) -> str:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(name)}</title><style>{_CSS}</style>",
             f"<p><a href='index.html'>&larr; index</a></p><h1>{html.escape(name)}</h1>",
             f"<p>model <code>{html.escape(sae.model_name)}</code>, hook <code>{html.escape(sae.hook_name)}</code>"
             + (f" &rarr; <code>{html.escape(sae.hook_name_out)}</code>" if sae.is_transcoder else "")
             + f", {sae.architecture}, d_in {sae.d_in}, d_sae {sae.d_sae}, k {sae.k}; "
             + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
             + "</p>", f"<img src='{html.escape(hist_png)}' alt='feature density histogram' width='560'>"]
    for c in cards:
        parts.append(f"<div class='card' id='f{c['feature']}'><h3>feature {c['feature']}</h3>"
                     f"<p>density {c['density']:.2e}, max activation {c['max_act']:.3f}, mean {c['mean_act']:.3f}</p>")
        if "promoted" in c:
            parts.append("<p>logit effects: <span class='pos'>+ " + ", ".join(
                f"<code>{html.escape(t)}</code> {x:.2f}" for t, x in c["promoted"]) + "</span><br><span class='neg'>"
                "&minus; " + ", ".join(f"<code>{html.escape(t)}</code> {x:.2f}" for t, x in c["suppressed"])
                + "</span></p>")
        for e in c["examples"]:
            parts.append(f"<div class='ex'><span class='act'>{e['act']:.3f}</span>{e['html']}</div>")
        parts.append("</div>")
    return "\n".join(parts) + "\n"


def render_index(rows: list[dict[str, Any]], pages: dict[str, str]) -> str:
    body = ["<!doctype html><meta charset='utf-8'><title>SAE feature dashboards</title>",
            f"<style>{_CSS}</style><h1>SAE feature dashboards</h1><ul>"]
    body += [f"<li><a href='{html.escape(p)}'>{html.escape(n)}</a></li>" for n, p in pages.items()]
    body.append("</ul><p><input id='q' placeholder='search tokens, SAE, feature id' oninput='filt()'></p>"
                "<table id='tab'><tr><th>SAE</th><th>feature</th><th>density</th><th>top tokens</th>"
                "<th>promoted logits</th></tr>")
    for r in rows:
        body.append(f"<tr><td>{html.escape(r['sae'])}</td><td><a href='{html.escape(r['href'])}'>{r['feature']}</a>"
                    f"</td><td>{r['density']:.2e}</td><td>{html.escape(r['tokens'])}</td>"
                    f"<td>{html.escape(r['promoted'])}</td></tr>")
    body.append("</table><script>function filt(){var q=document.getElementById('q').value.toLowerCase();"
                "var rs=document.getElementById('tab').rows;for(var i=1;i<rs.length;i++){rs[i].style.display="
                "rs[i].textContent.toLowerCase().indexOf(q)>=0?'':'none';}}</script>")
    return "\n".join(body) + "\n"


def density_histogram(path: Path, density: torch.Tensor, title: str) -> Path:
    """Histogram of log10 feature density; never-firing features are put in the leftmost bin."""
    from lmlab.core.plotting import bar_plot

    logd = torch.log10(density.clamp_min(1e-7)).numpy()
    edges = list(range(-7, 1))
    counts = [int(((logd >= lo) & (logd < lo + 1)).sum()) for lo in edges[:-1]]
    counts[-1] += int((logd >= 0).sum())
    labels = ["dead" if lo == -7 else f"1e{lo}" for lo in edges[:-1]]
    return bar_plot(path, labels, counts, title=title, xlabel="feature density (fraction of tokens)",
                    ylabel="features")


def main(cfg: SAEDashboardConfig) -> Path:
    """``lmlab interp sae dashboard``: writes ``dashboard/index.html`` + one page per SAE."""
    from lmlab.core.runs import atomic_write, start_run
    from lmlab.core.runtime import setup
    from lmlab.interp.activations import open_source
    from lmlab.interp.sae import _sae_dirname, load_saes_and_model

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    saes, model_name, model, tok, names = load_saes_and_model(cfg, dev, dtype)
    with start_run(cfg, "interp-sae-dashboard", device=dev, dtype=dtype, threads=threads) as run:
        src = open_source(model, tok, names, data=cfg.data, max_bytes=cfg.max_bytes, seq_len=cfg.seq_len,
                          lm_batch=cfg.lm_batch, seed=cfg.seed, split="val")
        rec = feature_records(src, saes, cfg.tokens)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        unembed = out_emb.weight.detach().float().cpu() if out_emb is not None else None  # (V, d)
        dash = run.path / "dashboard"
        dash.mkdir(exist_ok=True)
        pages, rows, results = {}, [], {}
        for p, sae in saes.items():
            name = _sae_dirname(*p)
            fname = name.replace("/", "_") + ".html"
            cards, density = build_feature_cards(sae, rec, rec["codes"][p], tok, unembed, cfg.features, cfg.examples,
                                                 cfg.context, cfg.logits)
            png = density_histogram(dash / (fname[:-5] + "_density.png"), density, f"{name}: feature density")
            summary = {"tokens": rec["tokens"], "dead_frac": float((density == 0).float().mean()),
                       "l0": float(rec["codes"][p][0].numel() / max(1, rec["tokens"]))}
            atomic_write(dash / fname, render_sae_page(name, sae, cards, png.name, summary))
            pages[name] = fname
            for c in cards:
                rows.append({"sae": name, "feature": c["feature"], "density": c["density"],
                             "href": f"{fname}#f{c['feature']}",
                             "tokens": " ".join(sorted({e["token"] for e in c["examples"]})[:8]),
                             "promoted": " ".join(t for t, _ in c.get("promoted", []))})
            results[name] = {**summary, "page": f"dashboard/{fname}", "features_shown": len(cards)}
        atomic_write(dash / "index.html", render_index(rows, pages))
        run.finish({"model": model_name, "index": "dashboard/index.html", "saes": results})
    return run.path
