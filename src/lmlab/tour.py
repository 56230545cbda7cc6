"""``lmlab tour``: every capability on the embedded default, one HTML report.

Each capability registers one *section* in :data:`SECTIONS`: a function ``(cfg, out_dir) -> (run_dir, summary)``
that runs that capability's own ``main`` with a quick config (``--full`` selects the long version) and writes a
normal run directory under the tour's folder. The tour then builds ``report.html`` from those run dirs
(reports read artifacts only). A failing section is recorded and the tour goes on; the tour exits non-zero at
the end if any section failed, and the report shows it with a FAILED badge.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)


@dataclass
class TourConfig(RunArgs):
    """Run every capability on the reference models and write one report."""

    sections: list[str] = field(default_factory=list)
    """Sections to run (default: all, in order)."""
    full: bool = False
    """Run the long versions (minutes to hours) instead of the quick ones."""
    max_tokens: int = 8192
    """Tokens scored per domain in the perplexity section (quick mode)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"unknown tour section(s) {unknown}; valid: {list(SECTIONS)}")


# ----------------------------------------------------------------------------------------------------------
# sections


def foundation(cfg: TourConfig, out: Path) -> tuple[Path, str]:
    """Corpus -> tokenizer -> reference models -> perplexity / bits-per-byte per domain."""
    from lmlab.core import zoo
    from lmlab.core.corpus import build_corpus
    from lmlab.core.models import load_model, n_params
    from lmlab.core.plotting import bar_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.evaluate.perplexity import PROMPTS, evaluate_model, greedy_sample

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    sub = RunArgs(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    domains = zoo.DEFAULT_DOMAINS
    with start_run(sub, "tour-foundation", device=dev, dtype=dtype, threads=threads) as run:
        corpus = build_corpus(domains=domains, max_bytes=zoo.REF_MAX_BYTES, seed=0)
        tok = zoo.reference_tokenizer()
        from lmlab.core.tokenizer import bytes_per_token

        bpt = {d: round(bytes_per_token(tok, corpus.val[d][:200]), 3) for d in domains}
        models: dict[str, Any] = {}
        samples = []
        max_tokens = 65_536 if cfg.full else cfg.max_tokens
        for name in ("dense", "mamba"):
            spec = f"ref:{name}"
            if not zoo.is_available(name):
                log.warning("%s is not built; training it now with the reference recipe", spec)
                zoo.train_main(zoo.ZooTrainConfig(name=name, seed=0, out=str(out / f"zoo-train-{name}")))
            model = load_model(spec, dev, dtype)
            res = evaluate_model(model, tok, {d: corpus.val[d] for d in domains}, max_tokens, 256)
            models[spec] = {"params": n_params(model), "card": zoo.card(name), "domains": res}
            for prompt in PROMPTS:
                samples.append({"model": spec, "prompt": prompt, "completion": greedy_sample(model, tok, prompt)})
        run.write_samples(samples)
        bar_plot(run.plots / "bits_per_byte.png", list(domains),
                 {s: [m["domains"][d]["bpb"] for d in domains] for s, m in models.items()},
                 title="reference models: validation bits/byte", ylabel="bits/byte")
        results = {
            "corpus_hash": corpus.hash,
            "tokenizer": {"vocab_size": len(tok), "hash": zoo.tokenizer_hash(tok)},
            "domains": [{"domain": d, "train_docs": corpus.stats[d]["train"]["docs"],
                         "train_MB": round(corpus.stats[d]["train"]["bytes"] / 1e6, 2),
                         "val_docs": corpus.stats[d]["val"]["docs"], "bytes_per_token": bpt[d]} for d in domains],
            "models": [{"model": s, "params": m["params"],
                        **{f"{d} bits/byte": round(m["domains"][d]["bpb"], 4) for d in domains},
                        **{f"{d} ppl": round(m["domains"][d]["ppl"], 2) for d in domains}}
                       for s, m in models.items()],
            "eval": {"window": 256, "max_tokens_per_domain": max_tokens},
        }
        run.finish(results)
    lines = [f"Corpus {corpus.hash[:12]}: " + ", ".join(
        f"{d} {corpus.stats[d]['train']['bytes'] / 1e6:.1f} MB" for d in domains) + ".",
        f"Tokenizer: byte-level BPE, vocab {len(tok)}, bytes/token " + ", ".join(f"{d} {v}" for d, v in bpt.items()),
        ]
    for s, m in models.items():
        lines.append("")
        lines.append(f"{s} ({m['params'] / 1e6:.2f}M params): " + ", ".join(
            f"{d} {r['bpb']:.3f} bits/byte (ppl {r['ppl']:.1f})" for d, r in m["domains"].items()))
    return run.path, "\n".join(lines)


def _lazy(target: str) -> Callable[[TourConfig, Path], tuple[Path, str]]:
    """A section implemented in a capability module, imported only when the section runs."""

    def run(cfg: TourConfig, out: Path) -> tuple[Path, str]:
        import importlib

        mod, _, fn = target.partition(":")
        return getattr(importlib.import_module(mod), fn)(cfg, out)

    run.__doc__ = f"tour section {target}"
    return run


SECTIONS: dict[str, Callable[[TourConfig, Path], tuple[Path, str]]] = {
    "foundation": foundation,
    "reason": _lazy("lmlab.reason.search:tour_section"),
    "reason_learn": _lazy("lmlab.reason.learn:tour_section"),
    "exam_irt": _lazy("lmlab.evaluate.exam:tour_section"),
    "compress": _lazy("lmlab.compress.bitstack:tour_section"),
    "sae": _lazy("lmlab.interp.sae:tour_section"),
    "sae_generalization": _lazy("lmlab.interp.generalization:tour_section"),
    "universality": _lazy("lmlab.interp.circuits:tour_section"),
    "data_mix": _lazy("lmlab.data.mixing:tour_section"),
    "comments": _lazy("lmlab.data.comments:tour_section"),
    "moe": _lazy("lmlab.train.moe:tour_section"),
    "anygpt": _lazy("lmlab.train.anygpt.model:tour_section"),
}
"""Tour sections in report order. Each capability adds its own (kept short; ``--full`` for the long run)."""


# ----------------------------------------------------------------------------------------------------------


def main(cfg: TourConfig) -> Path:
    from lmlab.core.report import write_report
    from lmlab.core.runs import start_run

    names = cfg.sections or list(SECTIONS)
    with start_run(cfg, "tour") as run:
        done: list[Path] = []
        summaries: dict[str, str] = {}
        status: dict[str, Any] = {}
        for i, name in enumerate(names, 1):
            log.info("tour [%d/%d] %s", i, len(names), name)
            t0 = time.time()
            try:
                path, summary = SECTIONS[name](cfg, run.path / name)
                done.append(path)
                summaries[str(path)] = summary
                status[name] = {"status": "complete", "seconds": round(time.time() - t0, 1), "summary": summary}
            except Exception as e:  # a failing section must not hide the others
                log.error("tour section %s failed: %s", name, e)
                log.debug("%s", traceback.format_exc())
                status[name] = {"status": "failed", "seconds": round(time.time() - t0, 1),
                                "error": f"{type(e).__name__}: {e}"}
                if (run.path / name / "meta.json").is_file():
                    done.append(run.path / name)
        failed = [n for n, s in status.items() if s["status"] != "complete"]
        intro = ("<p>Every capability of lmlab on the embedded default (reference models trained on the "
                 "offline corpus). " + ("Long versions (--full)." if cfg.full else "Quick versions; "
                 "<code>lmlab tour --full</code> runs the long ones.") + "</p>")
        report = write_report(done, run.path / "report.html", title="lmlab tour", intro_html=intro,
                              summaries=summaries)
        run.save_json("sections.json", status)
        if failed:
            raise LmlabError(f"tour sections failed: {', '.join(failed)} (see {report})")
        run.finish({"sections": status, "report": str(report)})
    log.info("report: %s", report)
    return report
