"""The ``lmlab`` command tree.

Every leaf is one row of :data:`COMMANDS`: its words, the ``module:function`` that runs it, the ``module:Class``
of its config dataclass, a one-line help and the config fields taken as positional arguments. Modules are
imported only when their leaf runs (or its ``--help`` is asked for), so ``lmlab --help`` imports neither torch
nor transformers.

A leaf accepts::

    lmlab <words> [POSITIONAL ...] [-c FILE.yaml] [--field VALUE ...] [key.sub=value ...]

resolved as defaults -> ``-c`` file -> ``--field`` flags -> ``key=value`` overrides (see :mod:`lmlab.config`).
A leaf function returns the run directory (printed) or a text to print.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab import __version__


@dataclass(frozen=True)
class Leaf:
    words: str
    target: str
    config: str
    help: str
    positional: tuple[str, ...] = ()


COMMANDS: list[Leaf] = [
    Leaf("tour", "lmlab.tour:main", "lmlab.tour:TourConfig",
         "run every capability on the embedded default and write one HTML report"),
    Leaf("zoo train", "lmlab.core.zoo:train_main", "lmlab.core.zoo:ZooTrainConfig",
         "train a reference tiny model (dense, mamba) on the built-in corpus", ("name",)),
    Leaf("zoo list", "lmlab.core.zoo:list_main", "lmlab.core.zoo:ZooListConfig",
         "list reference models (shipped and cached)"),
    Leaf("train lm", "lmlab.core.pretrain:main", "lmlab.core.pretrain:PretrainConfig",
         "causal-LM pretraining of any HF model config on a corpus"),
    Leaf("train anygpt tokenizers", "lmlab.train.anygpt.model:tokenizers_main",
         "lmlab.train.anygpt.model:TokenizersConfig",
         "AnyGPT modality tokenizers: 8x8-digit VQ-VAE (4 tokens/image) + k-means log-mel speech units, with judges"),
    Leaf("train anygpt align", "lmlab.train.anygpt.model:align_main", "lmlab.train.anygpt.model:AlignConfig",
         "AnyGPT stage 0 (text LM) + vocabulary expansion + stage-1 alignment pairs; evaluates every direction"),
    Leaf("train anygpt instruct", "lmlab.train.anygpt.model:instruct_main", "lmlab.train.anygpt.model:InstructConfig",
         "AnyGPT stage 2: multi-turn any-to-any instructions (assistant-only loss) with stage-1 replay", ("init",)),
    Leaf("anygpt generate", "lmlab.train.anygpt.model:generate_main", "lmlab.train.anygpt.model:GenerateConfig",
         "any-to-any generation: text / image.png / speech.wav -> text | image (PNG) | speech (WAV)", ("model",)),
    Leaf("train moe", "lmlab.train.moe:main", "lmlab.train.moe:TrainMoEConfig",
         "MoE LM: capacity top-k routing, Rectify-Router (intra-gpu, fill-in), expert parallelism (--nproc)"),
    Leaf("eval ppl", "lmlab.evaluate.perplexity:main", "lmlab.evaluate.perplexity:PerplexityConfig",
         "perplexity and bits-per-byte of a model on corpus domains", ("model",)),
    Leaf("interp similarity", "lmlab.interp.similarity:main", "lmlab.interp.similarity:SimilarityConfig",
         "feature universality of two models' SAEs: max pairwise Pearson correlation (MPPC), baselines, depth",
         ("sae_a", "sae_b")),
    Leaf("interp circuits", "lmlab.interp.circuits:main", "lmlab.interp.circuits:CircuitsConfig",
         "induction heads (Transformer), conv-lag / mixer ablations and the Off-by-One probe (Mamba)", ("model",)),
    Leaf("data mix fit", "lmlab.data.mixing:fit_main", "lmlab.data.mixing:FitConfig",
         "fit data mixing laws to a table of runs (mixture -> losses)", ("data",)),
    Leaf("data mix predict", "lmlab.data.mixing:predict_main", "lmlab.data.mixing:PredictConfig",
         "predict validation losses of mixtures with a fitted law", ("law",)),
    Leaf("data mix optimize", "lmlab.data.mixing:optimize_main", "lmlab.data.mixing:OptimizeConfig",
         "the mixture minimising the predicted loss (convex, with availability caps)", ("law",)),
    Leaf("data mix run", "lmlab.data.mixing:run_main", "lmlab.data.mixing:RunConfig",
         "nested pipeline: proxy runs -> step/size laws -> mixing law -> optimum -> verification"),
    Leaf("data mix continual", "lmlab.data.mixing:continual_main", "lmlab.data.mixing:ContinualConfig",
         "continual pretraining: critical share of original data", ("model",)),
    Leaf("data comments density", "lmlab.data.comments:density_main", "lmlab.data.comments:DensityConfig",
         "comment density of code files (histogram, bigcode keep-range)", ("input",)),
    Leaf("data comments generate", "lmlab.data.comments:generate_main", "lmlab.data.comments:GenerateConfig",
         "comment augmentation of low-density code by an LLM commenter (+ preservation filter)", ("input",)),
    Leaf("data comments filter", "lmlab.data.comments:filter_main", "lmlab.data.comments:FilterConfig",
         "code-preservation invariant and NL-alignment filter on augmented code", ("input",)),
    Leaf("data comments tune", "lmlab.data.comments:tune_main", "lmlab.data.comments:TuneConfig",
         "instruction-tune a commenter on (code, commented code) pairs"),
    Leaf("data comments loop", "lmlab.data.comments:loop_main", "lmlab.data.comments:LoopConfig",
         "self-augmentation: augment, continue pretraining, comment again"),
    Leaf("data comments eval", "lmlab.data.comments:eval_main", "lmlab.data.comments:EvalConfig",
         "pass@k (sandboxed) and NL<->code alignment of models", ("model",)),
    Leaf("interp sae train", "lmlab.interp.sae:main_train", "lmlab.interp.sae:SAETrainConfig",
         "train Top-K sparse autoencoders (Llama Scope recipe) on every hook point from one LM pass", ("model",)),
    Leaf("interp sae eval", "lmlab.interp.sae:main_eval", "lmlab.interp.sae:SAEEvalConfig",
         "SAE metrics: L0, explained variance, dead latents, delta CE / KL, JumpReLU conversion, --context sweeps",
         ("sae",)),
    Leaf("interp sae dashboard", "lmlab.interp.dashboard:main", "lmlab.interp.dashboard:SAEDashboardConfig",
         "static HTML feature dashboards (top contexts, logit effects, density) with a searchable index", ("sae",)),
    Leaf("interp sae transfer", "lmlab.interp.generalization:main_transfer",
         "lmlab.interp.generalization:TransferConfig",
         "splice base-model SAEs into a fine-tuned model; compare with an SAE trained on the fine-tuned model",
         ("sae",)),
    Leaf("interp sae geometry", "lmlab.interp.geometry:main", "lmlab.interp.geometry:GeometryConfig",
         "feature geometry and splitting between a small and a large SAE of one hook point (cosines, splits, PCA map)",
         ("small", "large")),
    Leaf("reason rl", "lmlab.reason.learn:main", "lmlab.reason.learn:RLConfig",
         "search -> learn loop: expert iteration (RFT), GRPO, RLOO, PPO (value model + GAE), DPO, step-DPO; "
         "PRM-shaped rewards, PRM retraining; per-round datasets + checkpoints, resumable",
         ("policy",)),
    Leaf("compress bitstack", "lmlab.compress.bitstack:main", "lmlab.compress.bitstack:BitStackConfig",
         "BitStack: decompose a model into sorted ~1-bit residual blocks (one artifact, any size)", ("model",)),
    Leaf("compress load", "lmlab.compress.bitstack:load_main", "lmlab.compress.bitstack:LoadConfig",
         "load a BitStack at memory budgets: exact bytes, bits/byte, samples, HF export", ("stack",)),
    Leaf("compress bitstack-sizes", "lmlab.compress.bitstack:sizes_main", "lmlab.compress.bitstack:SizesConfig",
         "print a BitStack's size range (min, max, number of sizes, step sizes)", ("stack",)),
    Leaf("compress rankk", "lmlab.compress.rankk:main", "lmlab.compress.rankk:RankKConfig",
         "data-free joint rank-k compression of linears sharing an input", ("model",)),
    Leaf("compress quant", "lmlab.compress.quant:main", "lmlab.compress.quant:QuantConfig",
         "RTN / GPTQ weight-only quantisation baselines", ("model",)),
    Leaf("eval exam", "lmlab.evaluate.exam:main", "lmlab.evaluate.exam:ExamConfig",
         "run models on an exam (JSONL / GAOKAO-Bench / builtin:math) and score every answer", ("items",)),
    Leaf("eval matrix", "lmlab.evaluate.exam:matrix_main", "lmlab.evaluate.exam:MatrixConfig",
         "models x items response matrix from exam runs (binary, partial credit or binomial)", ("runs",)),
    Leaf("eval irt fit", "lmlab.evaluate.irt:fit_main", "lmlab.evaluate.irt:IrtFitConfig",
         "fit a Rasch model (CML/MML/JML/PCM) with SEs, fit statistics and a Wright map", ("matrix",)),
    Leaf("eval irt diagnose", "lmlab.evaluate.irt:diagnose_main", "lmlab.evaluate.irt:IrtDiagnoseConfig",
         "D1 difficulty invariance + D2 variance at similar difficulty, with null baselines", ("matrix",)),
    Leaf("eval irt report", "lmlab.evaluate.irt:report_main", "lmlab.evaluate.irt:IrtReportConfig",
         "markdown + HTML report from irt fit/diagnose runs", ("runs",)),
    Leaf("eval grading", "lmlab.evaluate.grading:main", "lmlab.evaluate.grading:GradingConfig",
         "grader consistency: ISR with its null, ICC(2,1)/(2,k), Krippendorff alpha", ("scores",)),
    Leaf("reason sft", "lmlab.reason.policy:main", "lmlab.reason.policy:SFTConfig",
         "policy initialization: SFT a causal LM on (noisy) step-by-step task demonstrations", ("model",)),
    Leaf("reason rm", "lmlab.reason.reward:main", "lmlab.reason.reward:RMConfig",
         "train a PRM/ORM/Bradley-Terry reward model (gold or Math-Shepherd MC labels)", ("policy",)),
    Leaf("reason search", "lmlab.reason.search:main", "lmlab.reason.search:SearchConfig",
         "test-time search: greedy, majority, (weighted) best-of-N, beam, DVTS, MCTS, revision", ("policy",)),
    Leaf("reason scaling", "lmlab.reason.search:scaling_main", "lmlab.reason.search:ScalingConfig",
         "accuracy vs generated tokens per search method at budgets 1..N (JSON + PNG)", ("policy",)),
    Leaf("report", "lmlab.core.report:main", "lmlab.core.report:ReportConfig",
         "build a static single-file report.html from run directories", ("runs",)),
]

GROUP_HELP = {
    "zoo": "reference tiny models",
    "train": "training (causal LM, MoE, AnyGPT)",
    "eval": "evaluation: perplexity, exams, Rasch/IRT, grading",
    "irt": "Rasch/IRT: fit, diagnose, report",
    "config": "show documented default configs",
    "data": "data mixing laws, comment augmentation",
    "reason": "reasoning: tasks, policy init, reward models, search, learning",
    "compress": "BitStack, rank-k, quantisation",
    "interp": "SAEs, similarity, circuits",
    "anygpt": "AnyGPT any-to-any generation (text, image, speech)",
    "sae": "Top-K sparse autoencoders: train (torchrun-ready), eval (--context sweeps), dashboard, transfer, geometry",
    "mix": "data mixing laws: fit, predict, optimize, run, continual",
    "comments": "comment augmentation for code data: density, generate, filter, tune, loop, eval",
}

log = logging.getLogger("lmlab")


def _import(spec: str) -> Any:
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _children(prefix: tuple[str, ...]) -> dict[str, str]:
    """Next words below ``prefix`` -> help (a leaf's help or the group's)."""
    out: dict[str, str] = {}
    for leaf in COMMANDS:
        w = tuple(leaf.words.split())
        if w[: len(prefix)] == prefix and len(w) > len(prefix):
            nxt = w[len(prefix)]
            out.setdefault(nxt, leaf.help if len(w) == len(prefix) + 1 else GROUP_HELP.get(nxt, ""))
    if not prefix:
        out.setdefault("config", GROUP_HELP["config"])
    return out


def _group_help(prefix: tuple[str, ...]) -> str:
    name = " ".join(("lmlab",) + prefix)
    kids = _children(prefix)
    width = max(len(k) for k in kids) + 2
    lines = [f"usage: {name} <command> [args] [-h]", ""]
    if not prefix:
        lines += ["lmlab: ten LLM research methods on tiny reference models or any HF causal LM.", ""]
    lines.append("commands:")
    lines += [f"  {k.ljust(width)}{v}" for k, v in sorted(kids.items())]
    lines += ["", f"Run '{name} <command> --help' for a command's options."]
    if not prefix:
        lines += ["Common leaf flags: -c FILE.yaml, key.sub=value, --out, --device, --dtype, --seed, --threads.",
                  f"lmlab {__version__}"]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the contract for bad input), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _field_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _leaf_parser(leaf: Leaf, cfg_cls: type) -> argparse.ArgumentParser:
    from lmlab.config import field_docs

    docs = field_docs(cfg_cls)
    defaults = cfg_cls()
    p = _Parser(
        prog=f"lmlab {leaf.words}",
        description=f"{leaf.help}.\n\nValues resolve as defaults -> -c FILE -> --flags -> key.sub=value.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", metavar="FILE", help=f"YAML config (see 'lmlab config show {leaf.words}')")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    pos_help = " ".join(n.upper() for n in leaf.positional)
    p.add_argument("args", nargs="*", metavar=(pos_help + " " if pos_help else "") + "KEY=VALUE",
                   help="positional " + (pos_help or "(none)") + ", then key.sub=value overrides")
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        default = getattr(defaults, f.name)
        doc = docs.get(f.name, "")
        if dataclasses.is_dataclass(default):
            continue  # nested sections: key.sub=value only
        if hints[f.name] is bool:
            p.add_argument(_field_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=f"{doc} (default: {default})")
        else:
            p.add_argument(_field_flag(f.name), dest=f.name, metavar="V", default=None,
                           help=f"{doc} (default: {default!r})".replace("%", "%%"))
    return p


def _split_positional(leaf: Leaf, cfg_cls: type, args: list[str]) -> tuple[dict[str, Any], list[str]]:
    import re

    over = [a for a in args if re.match(r"^[A-Za-z_][\w.\-]*=", a)]
    pos = [a for a in args if a not in over]
    hints = typing.get_type_hints(cfg_cls)
    values: dict[str, Any] = {}
    for name in leaf.positional:
        if not pos:
            break
        origin = typing.get_origin(hints[name])
        if origin in (list, tuple):
            values[name], pos = list(pos), []
        else:
            values[name] = pos.pop(0)
    if pos:
        from lmlab.errors import LmlabError

        raise LmlabError(f"unexpected argument(s): {' '.join(pos)}")
    return values, over


def _config_show(words: list[str]) -> int:
    from lmlab.config import dump_yaml

    key = " ".join(w for w in words if not w.startswith("-"))
    leaf = next((c for c in COMMANDS if c.words == key), None)
    usage = "usage: lmlab config show <command words>\n\ncommands:\n  " + "\n  ".join(c.words for c in COMMANDS)
    if any(w in ("-h", "--help") for w in words):
        print(usage)
        return 0
    if leaf is None:
        print(f"lmlab config show: error: unknown command {key!r}\n\n{usage}", file=sys.stderr)
        return 2
    print(dump_yaml(_import(leaf.config)(), with_docs=True), end="")
    return 0


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_leaf(leaf: Leaf, argv: list[str]) -> int:
    from lmlab.config import ConfigError, RunArgs, parse_override, resolve
    from lmlab.errors import LmlabError

    prog = f"lmlab {leaf.words}"
    if not ({"-v", "--verbose"} & set(argv)):  # library chatter off: lmlab's own logging and bars remain
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        cfg_cls = _import(leaf.config)
        parser = _leaf_parser(leaf, cfg_cls)
        ns = parser.parse_intermixed_args(argv)
        flags = {k: v for k, v in vars(ns).items()
                 if k not in ("config", "verbose", "quiet", "args") and v is not None}
        for k, v in list(flags.items()):
            if isinstance(v, str):  # same parsing as key=value ("--name '#1'" stays text)
                flags[k] = parse_override(f"{k}={v}")[1]
        pos, overrides = _split_positional(leaf, cfg_cls, ns.args)
        cfg = resolve(cfg_cls, ns.config, overrides, extra={**pos, **flags})
        _setup_logging(ns.verbose, ns.quiet)
        if isinstance(cfg, RunArgs) and cfg.out:  # a bad --out fails before any work (models, corpora)
            from lmlab.core.runs import check_out

            check_out(cfg.out)
        result = _import(leaf.target)(cfg)
    except (LmlabError, ConfigError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = str(e) if isinstance(e, LmlabError) else f"{e.strerror or e}: {e.filename}" if getattr(
            e, "filename", None) else str(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, Path) or result is not None:
        print(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"lmlab {__version__}")
        return 0
    if argv[:1] == ["config"]:
        if argv[1:2] == ["show"]:
            return _config_show(argv[2:])
        print("usage: lmlab config show <command words>")
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    prefix: list[str] = []
    rest = argv
    while rest and not rest[0].startswith("-"):
        cand = tuple(prefix + [rest[0]])
        leaf = next((c for c in COMMANDS if tuple(c.words.split()) == cand), None)
        if leaf is not None:
            return run_leaf(leaf, rest[1:])
        if rest[0] not in _children(tuple(prefix)):
            print(f"lmlab: error: unknown command {' '.join(cand)!r}\n\n{_group_help(tuple(prefix))}",
                  file=sys.stderr)
            return 2
        prefix.append(rest[0])
        rest = rest[1:]
    if rest and rest[0] not in ("-h", "--help"):
        print(f"lmlab: error: unknown option {rest[0]!r}\n\n{_group_help(tuple(prefix))}", file=sys.stderr)
        return 2
    print(_group_help(tuple(prefix)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
