"""AnyGPT training and any-to-any generation (``lmlab train anygpt tokenizers|align|instruct``,
``lmlab anygpt generate``).

Paper: **AnyGPT: Unified Multimodal LLM with Discrete Sequence Modeling**, Zhan et al., arXiv 2402.12226.
The LLM is an unchanged ``LlamaForCausalLM`` whose vocabulary is expanded with modality tokens
(:mod:`lmlab.train.anygpt.data`); everything else happens at the data level:

* **stage 0** (lmlab's miniature only): text-only pretraining of the tiny LM, the "pretrained LLM".
* **stage 1, alignment** (``align``): x<->text pairs in the AnyGPT template, packed into a token stream,
  next-token loss on every token (AnyGPT packs to 4500-token blocks), with ``text_replay`` (30%) of the
  tokens plain text, as AnyGPT mixes text corpora into its multimodal pretraining.
  Runs on the foundation loop :func:`lmlab.core.pretrain.train`. AnyGPT: lr 3e-5, cosine, 3% warm-up.
* **stage 2, instructions** (``instruct``): multi-turn any-to-any chats in the AnyGPT conversation template,
  loss on assistant turns only (FastChat ``IGNORE_TOKEN_ID=-100``), with stage-1 replay (``replay``) -- without
  it the model forgets text->image and text.
* **generation**: :class:`ModalityGrammar`, a ``transformers.LogitsProcessor``: for a requested output modality
  it forces the answer prefix seen in training (the space token), then the start marker, then allows only that
  modality's code tokens (``min_span``..``max_span`` of them; images exactly ``tokens_per_item``), then the end
  marker and ``<eoa>``; for text it forbids every modality token. Generated codes are de-tokenized to PNG/WAV.

Defaults are the planning miniature (spec moe_multimodal.md 2.3): Llama d=96, 3 layers, 4 heads, ffn 256
(~0.4M params), BPE vocab 300 + 136 added tokens, stage 0 300 steps, stage 1 1200 steps x 32
(30% of tokens plain text), stage 2 1000.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import ConfigError, RunArgs
from lmlab.core.pretrain import OptimConfig
from lmlab.errors import LmlabError
from lmlab.train.anygpt import data as D
from lmlab.train.anygpt import tokenizers as T

log = logging.getLogger(__name__)

DIRECTIONS_STAGE1 = ("image->text", "speech->text", "text->image", "text->speech")
DIRECTIONS_STAGE2 = ("speech->image", "image->speech")
MODALITIES = ("text", "image", "speech")


# ----------------------------------------------------------------------------------------------------
# configs


@dataclass
class TokenizersConfig(RunArgs):
    """Train the built-in modality tokenizers (digit VQ-VAE, k-means log-mel speech units) and the judges."""

    codebook_size: int = 64
    """Image VQ-VAE codebook size K (4 tokens per 8x8 image)."""
    vq_steps: int = 2000
    """VQ-VAE training steps (batch 128)."""
    speech_units: int = 64
    """k-means clusters over log-mel frames (speech codebook size)."""
    speech_train: int = 30
    """Synthesized training utterances per digit word."""
    speech_test: int = 10
    """Held-out utterances per digit word (new voice/speed draws)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("codebook_size", "vq_steps", "speech_units", "speech_train", "speech_test"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")


def _opt(steps: int, bs: int, seq: int, lr: float) -> Any:
    return field(default_factory=lambda: OptimConfig(steps=steps, batch_size=bs, seq_len=seq, lr=lr, warmup=30,
                                                     eval_every=0, eval_batches=8, log_every=50))


@dataclass
class AlignConfig(RunArgs):
    """Stage 0 (text-only LM) + vocabulary expansion + stage 1 (alignment pairs); then evaluate every direction."""

    tokenizers: str = ""
    """A `train anygpt tokenizers` run dir ('' trains them first, inside this run)."""
    hidden_size: int = 96
    """Llama hidden size."""
    layers: int = 3
    """Llama layers."""
    heads: int = 4
    """Attention heads."""
    intermediate_size: int = 256
    """MLP width."""
    bpe_vocab: int = 300
    """Byte-level BPE vocabulary of the tiny text LM."""
    stage0: OptimConfig = _opt(300, 32, 64, 3e-3)
    """Text-only pretraining (the 'pretrained LLM')."""
    stage1: OptimConfig = _opt(1200, 32, 128, 3e-3)
    """Alignment pretraining on packed pairs."""
    n_pairs: int = 20_000
    """Stage-1 pairs in the packed stream (directions uniform)."""
    text_replay: float = 0.3
    """Fraction of stage-1 *tokens* that are plain text (AnyGPT mixes text into multimodal pretraining)."""
    init: str = "mean"
    """New embedding rows: mean (around the old rows' mean) | random."""
    eval_n: int = 100
    """Held-out items per direction in the evaluation (100 = every held-out utterance, 10 per digit)."""
    tokenizer_cfg: TokenizersConfig = field(default_factory=TokenizersConfig)
    """Tokenizer settings when `tokenizers` is ''."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.text_replay < 1:
            raise ConfigError(f"text_replay must be in [0, 1), got {self.text_replay}")
        if self.init not in ("mean", "random"):
            raise ConfigError(f"init must be mean|random, got {self.init!r}")
        if self.hidden_size % self.heads:
            raise ConfigError(f"hidden_size {self.hidden_size} must be divisible by heads {self.heads}")
        if self.n_pairs < 4 or self.eval_n < 1:
            raise ConfigError("n_pairs must be >= 4 and eval_n >= 1")


@dataclass
class InstructConfig(RunArgs):
    """Stage 2: any-to-any instruction tuning (multi-turn chats, loss on assistant turns) from an align run."""

    init: str = ""
    """The `train anygpt align` run dir to start from."""
    steps: int = 1000
    """Optimiser steps (500 leaves speech->image at 0.37 on n=100; 1000 reaches 0.66)."""
    batch_size: int = 16
    """Conversations per step."""
    lr: float = 2e-3
    """Peak learning rate (cosine, 30 warm-up steps)."""
    n_convs: int = 6000
    """Conversations in the instruction set."""
    replay: float = 0.5
    """Fraction of stage-1 pairs + plain text mixed in (0 reproduces the forgetting trap)."""
    system_prompt: str = D.ANYGPT_SYSTEM
    """System prompt of the AnyGPT conversation template ('' for none)."""
    eval_n: int = 100
    """Held-out items per direction in the evaluation (100 = every held-out utterance, 10 per digit)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.replay < 1:
            raise ConfigError(f"replay must be in [0, 1), got {self.replay}")
        if self.steps < 1 or self.batch_size < 1 or self.n_convs < 1:
            raise ConfigError("steps, batch_size and n_convs must be >= 1")


@dataclass
class GenerateConfig(RunArgs):
    """Any-to-any generation with a trained AnyGPT run: input text / image.png / speech.wav -> output modality."""

    model: str = ""
    """An align or instruct run dir (holds model/ and tokenizers/)."""
    input: str = ""
    """A PNG/JPEG image, a WAV file, or text."""
    output_modality: str = "text"
    """text | image | speech."""
    input_modality: str = "auto"
    """auto (from the file extension; otherwise text) | text | image | speech."""
    sample: bool = False
    """Sample at `temperature` (default greedy)."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 0
    """0: a budget computed from the training data (long enough for the longest caption / utterance)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_modality not in MODALITIES:
            raise ConfigError(f"output_modality must be one of {', '.join(MODALITIES)}, got {self.output_modality!r}")
        if self.input_modality not in ("auto", *MODALITIES):
            raise ConfigError(f"input_modality must be auto|text|image|speech, got {self.input_modality!r}")
        if self.temperature <= 0 or self.max_new_tokens < 0:
            raise ConfigError("temperature must be > 0 and max_new_tokens >= 0")


# ----------------------------------------------------------------------------------------------------
# tokenizers stage


@dataclass
class Bundle:
    """Everything the LM stages need: modality tokenizers, judges, raw held-out items, tokenized sources."""

    image_tok: T.VQImageTokenizer
    speech_tok: T.KMeansSpeechTokenizer
    image_judge: T.LinearJudge
    speech_judge: T.LinearJudge
    images: dict[str, np.ndarray]
    speech_test_wavs: list[np.ndarray]
    src: D.Sources
    metrics: dict[str, float]


def build_tokenizers(cfg: TokenizersConfig, out: Path) -> Bundle:
    """Train both tokenizers and both judges, measure round trips on held-out items, save under ``out``."""
    t0 = time.perf_counter()
    images = T.load_digit_images()
    vq = T.train_vqvae(images["train_x"], cfg.codebook_size, steps=cfg.vq_steps, seed=cfg.seed)
    image_tok = T.VQImageTokenizer(vq)
    t_img = time.perf_counter() - t0
    speech = T.make_speech_set(cfg.speech_train, cfg.speech_test, seed=cfg.seed)
    speech_tok = T.KMeansSpeechTokenizer.fit(speech["train_x"], cfg.speech_units, seed=cfg.seed)
    sp_train = [speech_tok.encode(w) for w in speech["train_x"]]
    sp_test = [speech_tok.encode(w) for w in speech["test_x"]]
    rt_train = [speech_tok.decode(c) for c in sp_train]
    rt_test = [speech_tok.decode(c) for c in sp_test]
    # judges: images -- trained on real training digits; speech -- on round-trip training audio (the
    # generated speech is always vocoded from units, so that is its domain)
    image_judge = T.LinearJudge.fit("image", list(images["train_x"]), images["train_y"])
    speech_judge = T.LinearJudge.fit("speech", rt_train, speech["train_y"])
    codes_test = image_tok.encode_batch(images["test_x"])
    recon = image_tok.decode_batch(codes_test)
    ty = images["test_y"]
    metrics = {
        "image_recon_mse": float(((recon - images["test_x"]) ** 2).mean()),
        "image_judge_real": float((image_judge.predict(list(images["test_x"])) == ty).mean()),
        "image_judge_recon": float((image_judge.predict(list(recon)) == ty).mean()),
        "image_codes_used": int(len(np.unique(image_tok.encode_batch(images["train_x"])))),
        "speech_judge_roundtrip": float((speech_judge.predict(rt_test) == speech["test_y"]).mean()),
        "speech_tokens_mean": float(np.mean([len(c) for c in sp_train])),
        "speech_tokens_max": int(max(len(c) for c in sp_train)),
        "tokenizer_seconds": round(time.perf_counter() - t0, 1), "vqvae_seconds": round(t_img, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    image_tok.save(out / "image_vqvae.safetensors")
    speech_tok.save(out / "speech_kmeans.safetensors")
    image_judge.save(out / "image_judge.safetensors")
    speech_judge.save(out / "speech_judge.safetensors")
    src = D.Sources(image_tok.encode_batch(images["train_x"]), images["train_y"], codes_test, ty,
                    sp_train, speech["train_y"], sp_test, speech["test_y"])
    _save_sources(out / "sources.safetensors", src)
    log.info("tokenizers: %s", metrics)
    return Bundle(image_tok, speech_tok, image_judge, speech_judge, images, rt_test, src, metrics)


def _save_sources(path: Path, src: D.Sources) -> None:
    from lmlab.core.runs import save_tensors

    def ragged(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([c for s in seqs for c in s]), torch.tensor([len(s) for s in seqs])

    t = {"image_train": torch.from_numpy(src.image_train), "image_train_y": torch.from_numpy(src.image_train_y),
         "image_test": torch.from_numpy(src.image_test), "image_test_y": torch.from_numpy(src.image_test_y),
         "speech_train_y": torch.from_numpy(src.speech_train_y), "speech_test_y": torch.from_numpy(src.speech_test_y)}
    t["speech_train"], t["speech_train_len"] = ragged(src.speech_train)
    t["speech_test"], t["speech_test_len"] = ragged(src.speech_test)
    save_tensors(path, t, {"kind": "anygpt-sources"})


def _load_sources(path: Path) -> D.Sources:
    from safetensors.torch import load_file

    t = {k: v.numpy() for k, v in load_file(str(path)).items()}

    def unragged(flat: np.ndarray, lens: np.ndarray) -> list[list[int]]:
        ends = np.cumsum(lens)
        return [flat[e - n: e].tolist() for e, n in zip(ends, lens)]

    return D.Sources(t["image_train"], t["image_train_y"], t["image_test"], t["image_test_y"],
                     unragged(t["speech_train"], t["speech_train_len"]), t["speech_train_y"],
                     unragged(t["speech_test"], t["speech_test_len"]), t["speech_test_y"])


def load_bundle(folder: str | Path) -> Bundle:
    """Load what :func:`build_tokenizers` saved (a tokenizers run dir or its ``tokenizers/`` folder)."""
    p = Path(folder)
    if (p / "tokenizers").is_dir():
        p = p / "tokenizers"
    if not (p / "image_vqvae.safetensors").is_file():
        raise LmlabError(f"{folder} holds no AnyGPT tokenizers (run `lmlab train anygpt tokenizers`)")
    from lmlab.core.runs import read_json

    metrics = read_json(p / "metrics.json") if (p / "metrics.json").is_file() else {}
    images = T.load_digit_images()
    return Bundle(T.VQImageTokenizer.load(p / "image_vqvae.safetensors"),
                  T.KMeansSpeechTokenizer.load(p / "speech_kmeans.safetensors"),
                  T.LinearJudge.load(p / "image_judge.safetensors"), T.LinearJudge.load(p / "speech_judge.safetensors"),
                  images, [], _load_sources(p / "sources.safetensors"), metrics)


def tokenizers_main(cfg: TokenizersConfig) -> Path:
    from lmlab.core.runs import start_run, write_json
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, "cpu", cfg.dtype, cfg.threads)
    with start_run(cfg, "train-anygpt-tokenizers", device=dev, dtype=dtype, threads=threads) as run:
        b = build_tokenizers(cfg, run.path / "tokenizers")
        write_json(run.path / "tokenizers" / "metrics.json", b.metrics)
        _sample_grid(run.plots / "image_roundtrip.png", b.images["test_x"][:10],
                     b.image_tok.decode_batch(b.src.image_test[:10]), "real (top) vs VQ-VAE round trip (bottom)")
        run.finish(b.metrics)
    return run.path


# ----------------------------------------------------------------------------------------------------
# the LM


def build_lm(vocab_size: int, cfg: AlignConfig, special: dict[str, int]) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                    num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                    intermediate_size=cfg.intermediate_size, max_position_embeddings=512, tie_word_embeddings=True,
                    **special)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(c)


def _stream(tok: Any, docs: list[str]) -> np.ndarray:
    eos = tok.eos_token_id
    out: list[int] = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        out += ids + [eos]
    return np.asarray(out, dtype=np.int64)


def text_ppl(model: Any, tok: Any, texts: list[str], seq_len: int = 64) -> float:
    """Perplexity on a packed held-out text stream (fixed non-overlapping windows)."""
    from lmlab.core.pretrain import eval_windows, evaluate

    w = eval_windows(_stream(tok, texts), 10_000, seq_len)
    return float(np.exp(evaluate(model, w, 32)))


# ----------------------------------------------------------------------------------------------------
# constrained generation

try:
    from transformers import LogitsProcessor as _LogitsProcessor
except ImportError:  # pragma: no cover
    _LogitsProcessor = object  # type: ignore[assignment,misc]


class ModalityGrammar(_LogitsProcessor):
    """``transformers.LogitsProcessor`` that keeps a reply inside one output modality.

    Rows are left-padded prompts of equal length ``prompt_len``; the state of a row is read from its generated
    ids: forced ``prefix`` tokens (what training put between ``[AnyGPT]:`` and the start marker, i.e. the space)
    -> start marker -> ``min_span``..``max_span`` code tokens -> end marker -> ``<eoa>``. For ``text`` every
    marker and code token is forbidden. Finished rows (``<eoa>`` seen) are left alone."""

    def __init__(self, vm: D.VocabMap, modality: str, prompt_len: int, prefix: list[int],
                 min_span: int = 1, max_span: int = 64):
        self.vm, self.modality, self.prompt_len, self.prefix = vm, modality, prompt_len, list(prefix)
        self.eoa = vm.roles[D.EOA]
        self.min_span, self.max_span = min_span, max_span
        if modality != "text":
            m = vm.modalities[modality]
            self.start, self.end = m["start"], m["end"]
            self.codes = torch.tensor(list(vm.code_ids(modality)))
        self.banned_in_text = torch.tensor([i for i in vm.special_ids() if i != self.eoa])

    def allowed(self, gen: list[int]) -> torch.Tensor | None:
        """Allowed next ids after the generated ids ``gen`` (None: anything)."""
        if self.eoa in gen:
            return None
        if self.modality == "text":
            return None
        n = len(gen)
        if n < len(self.prefix):
            return torch.tensor([self.prefix[n]])
        if n == len(self.prefix):
            return torch.tensor([self.start])
        if gen[-1] == self.end:
            return torch.tensor([self.eoa])
        k = n - len(self.prefix) - 1  # codes so far
        if k < self.min_span:
            return self.codes
        if k >= self.max_span:
            return torch.tensor([self.end])
        return torch.cat([self.codes, torch.tensor([self.end])])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for b in range(input_ids.shape[0]):
            gen = input_ids[b, self.prompt_len:].tolist()
            if self.modality == "text":
                if self.eoa not in gen:
                    out[b, self.banned_in_text[self.banned_in_text < out.shape[1]]] = -float("inf")
                continue
            allow = self.allowed(gen)
            if allow is None:
                continue
            row = torch.full_like(out[b], -float("inf"))
            row[allow] = out[b, allow]
            out[b] = row
        return out


def answer_prefix(tok: Any, vm: D.VocabMap, prompt: str, modality: str) -> list[int]:
    """Ids training puts between the prompt and the modality start marker (the lone space token)."""
    start = D.MODALITY_TOKENS[modality][1]
    p = D.encode(tok, prompt)
    full = D.encode(tok, f"{prompt} {start}")
    if full[: len(p)] != p:
        raise LmlabError("prompt is not a token prefix of its answer")
    return full[len(p): -1]


def text_budget(tok: Any, answers: list[str]) -> int:
    """max_new_tokens for a text answer: the longest answer's BPE length (+ its leading space and <eoa>) + 2."""
    return max(len(D.encode(tok, f" {a}{D.EOA}")) for a in answers) + 2


@torch.no_grad()
def generate(model: Any, tok: Any, vm: D.VocabMap, prompts: list[str], modality: str, *, max_new_tokens: int,
             sample: bool = False, temperature: float = 1.0, max_span: int = 64, seed: int = 0,
             constrain: bool = True, batch_size: int = 40) -> list[list[int]]:
    """Generate replies (ids after the prompt, up to and excluding ``<eoa>``) for a batch of prompts."""
    from transformers import LogitsProcessorList

    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eoa = vm.roles[D.EOA]
    outs: list[list[int]] = []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        chunk = [D.encode(tok, p) for p in prompts[i: i + batch_size]]
        L = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (L - len(c)) + c for c in chunk], device=dev)
        mask = torch.tensor([[0] * (L - len(c)) + [1] * len(c) for c in chunk], device=dev)
        procs = LogitsProcessorList()
        if constrain:
            prefix = answer_prefix(tok, vm, prompts[i], modality) if modality != "text" else []
            lo, hi = (4, 4) if modality == "image" else (1, max_span)
            procs.append(ModalityGrammar(vm, modality, L, prefix, min_span=lo, max_span=hi))
        kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if sample \
            else {"do_sample": False}
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eoa,
                             pad_token_id=pad, logits_processor=procs, **kw)
        for row in gen[:, L:].tolist():
            outs.append(row[: row.index(eoa)] if eoa in row else row)
    return outs


def parse_span(ids: list[int], vm: D.VocabMap, modality: str) -> list[int] | None:
    """Codes of the first ``modality`` span in ``ids`` (None when there is no well-formed span)."""
    m = vm.modalities[modality]
    if m["start"] not in ids:
        return None
    s = ids.index(m["start"])
    if m["end"] not in ids[s:]:
        return None
    e = ids.index(m["end"], s)
    codes = ids[s + 1: e]
    if not codes or any(not (m["offset"] <= c < m["offset"] + m["size"]) for c in codes):
        return None
    return [c - m["offset"] for c in codes]


def decode_text(tok: Any, vm: D.VocabMap, ids: list[int]) -> str:
    return tok.decode([i for i in ids if i < vm.text_vocab], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------
# evaluation of every direction


def direction_prompts(direction: str, src: D.Sources, n: int, chat: bool, system: str,
                      ) -> tuple[list[str], np.ndarray, list[Any]]:
    """Held-out prompts of one direction: (prompts, labels, inputs-for-display)."""
    a, b = direction.split("->")
    per = max(1, n // 10)
    labels = np.array([d for d in range(10) for _ in range(per)])[:n]
    prompts, shown = [], []
    im_by = {d: np.nonzero(src.image_test_y == d)[0] for d in range(10)}
    sp_by = {d: np.nonzero(src.speech_test_y == d)[0] for d in range(10)}
    seen: dict[int, int] = {}
    for y in labels:
        k = seen.get(int(y), 0)
        seen[int(y)] = k + 1
        if a == "image":
            j = int(im_by[int(y)][k % len(im_by[int(y)])])
            x = D.mm_string("image", src.image_test[j])
            shown.append(("image", j))
        elif a == "speech":
            j = int(sp_by[int(y)][k % len(sp_by[int(y)])])
            x = D.mm_string("speech", src.speech_test[j])
            shown.append(("speech", j))
        else:
            x = D.caption(int(y)) if b == "image" else T.DIGIT_WORDS[int(y)]
            shown.append(("text", x))
        if direction in D.STAGE2_USER:
            prompts.append(D.chat_prompt([(D.STAGE2_USER[direction].format(x=x), None)], system))
        else:
            instr = D.INSTRUCTIONS[direction][0]
            if chat:
                user = f"{instr} This is input: {x}" if a == "text" else f"{instr} {x}"
                prompts.append(D.chat_prompt([(user, None)], system))
            else:
                prompts.append(D.stage1_prompt(direction, x, instr))
    return prompts, labels, shown


def evaluate_directions(model: Any, tok: Any, vm: D.VocabMap, b: Bundle, directions: tuple[str, ...], n: int,
                        seed: int = 0, chat: bool = False, system: str = "", sample_outputs: bool = True
                        ) -> tuple[dict[str, float], dict[str, Any]]:
    """Accuracy per direction judged by exact label match (text) or the independent classifiers
    (image/speech); x->image and x->speech are sampled at T=1 (and text->image also greedy)."""
    res: dict[str, float] = {}
    outs: dict[str, Any] = {}
    for d in directions:
        prompts, labels, _ = direction_prompts(d, b.src, n, chat, system)
        tgt = d.split("->")[1]
        if tgt == "text":
            answers = [D.caption(k) for k in range(10)] if d.startswith("image") else list(T.DIGIT_WORDS)
            gen = generate(model, tok, vm, prompts, "text", max_new_tokens=text_budget(tok, answers), seed=seed)
            texts = [decode_text(tok, vm, g) for g in gen]
            pred = np.array([D.read_digit(t) if D.read_digit(t) is not None else -1 for t in texts])
            res[d] = float((pred == labels).mean())
            outs[d] = texts
            continue
        variants = [("", True)] + ([(" greedy", False)] if d == "text->image" else [])
        for suffix, sample in variants:
            if not sample_outputs and sample:
                sample = False
            budget = 1 + len(answer_prefix(tok, vm, prompts[0], tgt)) + (4 if tgt == "image" else 64) + 2
            gen = generate(model, tok, vm, prompts, tgt, max_new_tokens=budget, sample=sample, seed=seed)
            spans = [parse_span(g, vm, tgt) for g in gen]
            ok = [s is not None and (tgt != "image" or len(s) == 4) for s in spans]
            if tgt == "image":
                items = [b.image_tok.decode(s) if k else np.zeros((8, 8), np.float32) for s, k in zip(spans, ok)]
                pred = b.image_judge.predict(items)
            else:
                items = [b.speech_tok.decode(s) if k and len(s) >= 3 else np.zeros(T.N_FFT * 2, np.float32)
                         for s, k in zip(spans, ok)]
                pred = np.array([b.speech_judge.predict([w])[0] if np.any(w) else -1 for w in items])
            res[d + suffix] = float((pred == labels).mean())
            res[d + suffix + " valid"] = float(np.mean(ok))
            outs[d + suffix] = items
    return res, outs


# ----------------------------------------------------------------------------------------------------
# stage 1: align


def make_text_tokenizer(cfg: AlignConfig) -> Any:
    from lmlab.core.tokenizer import train_bpe

    return train_bpe(D.bpe_texts(cfg.seed), vocab_size=cfg.bpe_vocab)


def stage1_docs(tok: Any, src: D.Sources, n_pairs: int, text_replay: float, seed: int) -> list[str]:
    """Stage-1 pairs plus plain-text documents making ``text_replay`` of the stream's *tokens*."""
    docs = [D.stage1_text(d, i, o, ins) for d, i, o, ins, _ in D.stage1_samples(src, n_pairs, seed)]
    text_train, _ = D.text_corpus(seed)
    rng = np.random.default_rng(seed + 7)
    texts = [" ".join(rng.choice(text_train, 3)) for _ in range(200)]
    pair_len = np.mean([len(D.encode(tok, d)) for d in docs[:200]])
    text_len = np.mean([len(D.encode(tok, t)) for t in texts])
    n_text = int(round(len(docs) * text_replay / (1 - text_replay) * pair_len / text_len))
    docs += [" ".join(rng.choice(text_train, 3)) for _ in range(n_text)]
    rng.shuffle(docs)
    return docs


def run_align(cfg: AlignConfig, run: Any, bundle: Bundle) -> dict[str, Any]:
    """Stage 0 -> expand -> stage 1 -> evaluate; saves ``model/`` (HF folder + anygpt_vocab.json) in the run."""
    from lmlab.core.pretrain import train
    from lmlab.core.tokenizer import save_tokenizer

    t0 = time.perf_counter()
    tok = make_text_tokenizer(cfg)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = build_lm(len(tok), cfg, special)
    text_train, text_val = D.text_corpus(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    stage0_docs = [" ".join(rng.choice(text_train, 3)) for _ in range(6000)]
    st0 = train(model, _stream(tok, stage0_docs), None, cfg.stage0, seed=cfg.seed, run=run, progress=False)
    text_docs = D.text_eval_docs(cfg.seed)
    ppl0, ppl0_unseen = text_ppl(model, tok, text_docs), text_ppl(model, tok, text_val)
    vm = D.expand_vocab(tok, model, {"image": bundle.image_tok.codebook_size,
                                     "speech": bundle.speech_tok.codebook_size}, init=cfg.init)
    ppl_resized = text_ppl(model, tok, text_docs)
    docs = stage1_docs(tok, bundle.src, cfg.n_pairs, cfg.text_replay, cfg.seed)
    ids = _stream(tok, docs)
    log.info("stage 1: %d docs, %d tokens, vocab %d", len(docs), len(ids), len(tok))
    st1 = train(model, ids, None, cfg.stage1, seed=cfg.seed + 1, run=run, progress=False)
    ppl1, ppl1_unseen = text_ppl(model, tok, text_docs), text_ppl(model, tok, text_val)
    t_train = time.perf_counter() - t0
    acc, outs = evaluate_directions(model, tok, vm, bundle, DIRECTIONS_STAGE1 + DIRECTIONS_STAGE2, cfg.eval_n,
                                    cfg.seed)
    folder = run.path / "model"
    save_tokenizer(tok, folder)  # swaps the whole folder in: write it before the weights
    model.save_pretrained(folder)
    vm.save(folder)
    results = {"params": sum(p.numel() for p in model.parameters()), "text_vocab": vm.text_vocab,
               "vocab": len(tok), "stage0_final_loss": st0.losses[-1], "stage1_final_loss": st1.losses[-1],
               "ppl_stage0": ppl0, "ppl_after_resize": ppl_resized, "ppl_stage1": ppl1,
               "ppl_ratio": ppl1 / ppl0, "ppl_unseen_stage0": ppl0_unseen, "ppl_unseen_stage1": ppl1_unseen,
               "accuracy": acc, "train_seconds": round(t_train, 1),
               "stage1_tokens": int(len(ids))}
    return {"results": results, "model": model, "tok": tok, "vm": vm, "outs": outs}


def _bundle_for(cfg: AlignConfig, run: Any) -> Bundle:
    from lmlab.core.runs import write_json

    if cfg.tokenizers:
        return load_bundle(cfg.tokenizers)
    tcfg = dataclasses.replace(cfg.tokenizer_cfg, seed=cfg.seed)
    b = build_tokenizers(tcfg, run.path / "tokenizers")
    write_json(run.path / "tokenizers" / "metrics.json", b.metrics)
    return b


def align_main(cfg: AlignConfig) -> Path:
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, "cpu" if cfg.device == "auto" else cfg.device, cfg.dtype, cfg.threads)
    with start_run(cfg, "train-anygpt-align", device=dev, dtype=dtype, threads=threads) as run:
        b = _bundle_for(cfg, run)
        if cfg.tokenizers:
            _link_tokenizers(Path(cfg.tokenizers), run.path)
        out = run_align(cfg, run, b)
        _write_samples(run, out["outs"], b)
        run.finish({**out["results"], "tokenizers": b.metrics})
    return run.path


def _link_tokenizers(src: Path, run_path: Path) -> None:
    import shutil

    s = src / "tokenizers" if (src / "tokenizers").is_dir() else src
    if not (run_path / "tokenizers").exists():
        shutil.copytree(s, run_path / "tokenizers")


# ----------------------------------------------------------------------------------------------------
# stage 2: instruct (masked SFT loop)


def sft_examples(tok: Any, convs: list[Any], system: str) -> list[tuple[list[int], list[int]]]:
    out = []
    for c in convs:
        if isinstance(c, str):
            ids = D.encode(tok, c) + [tok.eos_token_id]
            out.append((ids, list(ids)))
        else:
            out.append(D.chat_masked(tok, c, system))
    return out


def masked_loss(model: Any, batch: list[tuple[list[int], list[int]]], pad: int) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (assistant) positions of right-padded examples."""
    dev = next(model.parameters()).device
    L = max(len(i) for i, _ in batch)
    ids = torch.tensor([i + [pad] * (L - len(i)) for i, _ in batch], device=dev)  # (B, L)
    lab = torch.tensor([y + [-100] * (L - len(y)) for _, y in batch], device=dev)  # (B, L)
    att = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i, _ in batch], device=dev)
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]  # (B, L-1, V)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), lab[:, 1:].reshape(-1),
                                             ignore_index=-100)


def train_sft(model: Any, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, lr: float,
              seed: int = 0, run: Any = None) -> list[float]:
    """AdamW + warm-up/cosine (the foundation loop's optimiser and schedule) over masked chat examples."""
    from lmlab.core.pretrain import lr_at, make_optimizer

    opt = OptimConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(30, steps // 10))
    optim = make_optimizer(model, opt)
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    pad = 0
    for step in range(steps):
        for g in optim.param_groups:
            g["lr"] = lr_at(step, opt)
        batch = [examples[int(i)] for i in rng.integers(0, len(examples), batch_size)]
        loss = masked_loss(model, batch, pad)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if run is not None and (step + 1) % 50 == 0:
            run.log({"stage": 2, "step": step + 1, "loss": float(np.mean(losses[-50:])), "lr": lr_at(step, opt)})
    model.eval()
    return losses


def run_instruct(cfg: InstructConfig, run: Any, model: Any, tok: Any, vm: D.VocabMap, b: Bundle
                 ) -> dict[str, Any]:
    t0 = time.perf_counter()
    _, text_val = D.text_corpus(cfg.seed)
    text_docs = D.text_eval_docs(cfg.seed)
    ppl_before = text_ppl(model, tok, text_docs)
    convs = D.stage2_conversations(b.src, cfg.n_convs, cfg.seed, cfg.replay)
    ex = sft_examples(tok, convs, cfg.system_prompt)
    losses = train_sft(model, ex, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed, run)
    ppl, ppl_unseen = text_ppl(model, tok, text_docs), text_ppl(model, tok, text_val)
    t_train = time.perf_counter() - t0
    acc, outs = evaluate_directions(model, tok, vm, b, DIRECTIONS_STAGE1 + DIRECTIONS_STAGE2, cfg.eval_n, cfg.seed,
                                    system=cfg.system_prompt)
    return {"results": {"ppl_before": ppl_before, "ppl_stage2": ppl, "ppl_unseen_stage2": ppl_unseen,
                        "final_loss": float(np.mean(losses[-20:])),
                        "accuracy": acc, "train_seconds": round(t_train, 1), "replay": cfg.replay},
            "outs": outs}


def load_anygpt(folder: str | Path) -> tuple[Any, Any, D.VocabMap]:
    from lmlab.core.models import load_model
    from lmlab.core.tokenizer import load_tokenizer

    p = Path(folder)
    m = p / "model" if (p / "model").is_dir() else p
    vm = D.VocabMap.load(m)
    return load_model(str(m)), load_tokenizer(m), vm


def instruct_main(cfg: InstructConfig) -> Path:
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.core.tokenizer import save_tokenizer

    if not cfg.init:  # checked here, not in __post_init__, so that --help and `config show` work
        raise ConfigError("init is required: the run dir of `lmlab train anygpt align`")

    dev, dtype, threads = setup(cfg.seed, "cpu" if cfg.device == "auto" else cfg.device, cfg.dtype, cfg.threads)
    model, tok, vm = load_anygpt(cfg.init)
    b = load_bundle(cfg.init)
    with start_run(cfg, "train-anygpt-instruct", device=dev, dtype=dtype, threads=threads) as run:
        _link_tokenizers(Path(cfg.init), run.path)
        out = run_instruct(cfg, run, model.to(dev), tok, vm, b)
        save_tokenizer(tok, run.path / "model")  # swaps the whole folder in: write it before the weights
        model.save_pretrained(run.path / "model")
        vm.save(run.path / "model")
        (run.path / "model" / "anygpt_chat").write_text(cfg.system_prompt)
        _write_samples(run, out["outs"], b)
        run.finish(out["results"])
    return run.path


# ----------------------------------------------------------------------------------------------------
# artifacts


def _sample_grid(path: Path, top: np.ndarray, bottom: np.ndarray, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from lmlab.core.runs import atomic_path

    n = len(top)
    fig, axes = plt.subplots(2, n, figsize=(n * 0.8, 2))
    for i in range(n):
        for r, img in enumerate((top[i], bottom[i])):
            ax = axes[r, i] if n > 1 else axes[r]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def image_grid(path: Path, rows: dict[str, list[np.ndarray]], title: str = "") -> Path:
    """A PNG grid: one row per label (e.g. direction), 10 images per row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from lmlab.core.runs import atomic_path

    names = list(rows)
    ncol = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(names), ncol, figsize=(ncol * 0.8, len(names) * 0.9 + 0.4), squeeze=False)
    for r, name in enumerate(names):
        for c in range(ncol):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(rows[name]):
                ax.imshow(rows[name][c], cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _write_samples(run: Any, outs: dict[str, Any], b: Bundle) -> None:
    rows = {}
    per = max(1, len(next(iter(outs.values()))) // 10) if outs else 1
    for d, items in outs.items():
        if d.endswith("image") or d.endswith("image greedy"):
            rows[d] = [items[k * per] for k in range(10) if k * per < len(items)]
        elif d.endswith("speech"):
            for k in (0, 3, 7):
                if k * per < len(items) and np.any(items[k * per]):
                    T.write_wav(run.path / "samples" / f"{d.replace('->', '_to_')}_{T.DIGIT_WORDS[k]}.wav",
                                items[k * per])
    if rows:
        image_grid(run.plots / "generated_images.png", rows, "generated digits 0..9 (columns)")
    run.write_samples([{"direction": d, "text": t} for d, v in outs.items() if d.endswith("text")
                       for t in v])


# ----------------------------------------------------------------------------------------------------
# `lmlab anygpt generate`


def _input_modality(cfg: GenerateConfig) -> str:
    if cfg.input_modality != "auto":
        return cfg.input_modality
    suf = Path(cfg.input).suffix.lower()
    if suf in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
        return "image"
    if suf in (".wav", ".wave"):
        return "speech"
    if suf and Path(cfg.input).exists():
        raise LmlabError(f"unsupported input format {suf!r}: give a PNG/JPEG image, a WAV file, or text")
    return "text"


def generate_main(cfg: GenerateConfig) -> Path:
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    if not cfg.model:  # checked here, not in __post_init__, so that --help and `config show` work
        raise ConfigError("model is required: an align/instruct run dir")
    if not cfg.input:
        raise ConfigError("input is required: an image file, a WAV file or text")

    dev, dtype, threads = setup(cfg.seed, "cpu" if cfg.device == "auto" else cfg.device, cfg.dtype, cfg.threads)
    src_mod = _input_modality(cfg)
    b = load_bundle(cfg.model)
    if src_mod == "image":
        x = D.mm_string("image", b.image_tok.encode(cfg.input))
    elif src_mod == "speech":
        x = D.mm_string("speech", b.speech_tok.encode(cfg.input))
    else:
        x = cfg.input
    model, tok, vm = load_anygpt(cfg.model)
    model = model.to(dev)
    chat_file = Path(cfg.model) / "model" / "anygpt_chat"
    direction = f"{src_mod}->{cfg.output_modality}"
    if direction in D.STAGE2_USER:
        prompt = D.chat_prompt([(D.STAGE2_USER[direction].format(x=x), None)],
                               chat_file.read_text() if chat_file.is_file() else "")
    elif direction in D.INSTRUCTIONS:
        prompt = D.stage1_prompt(direction, x, D.INSTRUCTIONS[direction][0])
    else:
        prompt = D.chat_prompt([(x, None)], chat_file.read_text() if chat_file.is_file() else "")
    if cfg.output_modality == "text":
        budget = cfg.max_new_tokens or text_budget(tok, [D.caption(d) for d in range(10)])
    else:
        budget = cfg.max_new_tokens or (len(answer_prefix(tok, vm, prompt, cfg.output_modality)) + 3
                                        + (4 if cfg.output_modality == "image" else 64))
    gen = generate(model, tok, vm, [prompt], cfg.output_modality, max_new_tokens=budget, sample=cfg.sample,
                   temperature=cfg.temperature, seed=cfg.seed)[0]
    with start_run(cfg, "anygpt-generate", device=dev, dtype=dtype, threads=threads) as run:
        res: dict[str, Any] = {"direction": direction, "prompt_tokens": len(D.encode(tok, prompt)),
                               "generated_ids": gen}
        if cfg.output_modality == "text":
            res["text"] = decode_text(tok, vm, gen)
            from lmlab.core.runs import atomic_write

            atomic_write(run.path / "output.txt", res["text"] + "\n")
        else:
            codes = parse_span(gen, vm, cfg.output_modality)
            if codes is None:
                raise LmlabError(f"the model produced no well-formed {cfg.output_modality} span "
                                 f"(budget {budget} tokens)")
            res["codes"] = codes
            if cfg.output_modality == "image":
                T.save_png(b.image_tok.decode(codes), run.path / "output.png")
                res["output"] = str(run.path / "output.png")
            else:
                T.write_wav(run.path / "output.wav", b.speech_tok.decode(codes))
                res["output"] = str(run.path / "output.wav")
        run.finish(res)
    return run.path


# ----------------------------------------------------------------------------------------------------
# tour


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """Any-to-any in miniature: train small tokenizers and a short stage 1, then show every direction
    (quick: VQ-VAE 300 steps, 10 utterances/digit, stage 0 40 steps, stage 1 200 steps of 8 x 128 tokens,
    10 items/direction; --full: the benchmark's stage-1 recipe)."""
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    full = bool(getattr(cfg, "full", False))
    dev, dtype, threads = setup(cfg.seed, "cpu", "float32", getattr(cfg, "threads", None))
    tcfg = TokenizersConfig(seed=cfg.seed) if full else TokenizersConfig(seed=cfg.seed, vq_steps=300,
                                                                         speech_train=10, speech_test=2)
    acfg = AlignConfig(out=str(out), seed=cfg.seed, tokenizer_cfg=tcfg, eval_n=40 if full else 10)
    if not full:
        acfg.stage0 = dataclasses.replace(acfg.stage0, steps=40)
        acfg.stage1 = dataclasses.replace(acfg.stage1, steps=200, batch_size=8)
        acfg.n_pairs = 3000
    with start_run(acfg, "tour-anygpt", device=dev, dtype=dtype, threads=threads) as run:
        b = _bundle_for(acfg, run)
        r = run_align(acfg, run, b)
        _write_samples(run, r["outs"], b)
        run.finish({**r["results"], "tokenizers": b.metrics})
    acc = r["results"]["accuracy"]
    lines = [f"tokenizers: image recon MSE {b.metrics['image_recon_mse']:.4f}, judge on recon "
             f"{b.metrics['image_judge_recon']:.2f}; speech round-trip judge {b.metrics['speech_judge_roundtrip']:.2f}",
             f"text ppl stage0 {r['results']['ppl_stage0']:.3f} -> stage1 {r['results']['ppl_stage1']:.3f}"]
    lines += [f"{d:<22} {acc[d]:.2f}" for d in DIRECTIONS_STAGE1 if d in acc]
    return run.path, "\n".join(lines)


__all__ = ["AlignConfig", "GenerateConfig", "InstructConfig", "ModalityGrammar", "TokenizersConfig", "align_main",
           "build_tokenizers", "evaluate_directions", "generate", "generate_main", "instruct_main", "load_anygpt",
           "load_bundle", "parse_span", "run_align", "run_instruct", "tokenizers_main", "tour_section"]
