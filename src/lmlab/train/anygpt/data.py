"""AnyGPT data: vocabulary expansion, modality strings, stage-1/stage-2 templates and the built-in sets.

Paper: **AnyGPT** (Zhan et al., arXiv 2402.12226), code ``OpenMOSS/AnyGPT`` (``m_utils/anything2token.py``,
``m_utils/prompter.py``, ``stage1_pretrain.py``, ``stage2_sft.py``).

Vocabulary expansion (no architecture change): ``tokenizer.add_tokens`` of one token per code of every
modality plus start/end markers and role tokens, then ``model.resize_token_embeddings(len(tokenizer))``;
new rows are drawn around the mean of the old ones (``mean_resizing``), old rows are untouched, so text-only
ids and their logits are unchanged (tested). lmlab's default token strings are ASCII::

    image   <img_0> ... <img_{K-1}>      <soi> ... <eoi>
    speech  <sp_0>  ... <sp_{K-1}>       <sos> ... <eos_speech>
    music   <mu_0>  ... <mu_{K-1}>       <som> ... <eom>
    roles   [Human]  [AnyGPT]  <eoh> (end of human turn)  <eoa> (end of AnyGPT's turn)

(AnyGPT's own strings are ``<👀i>``/``<🗣️i>``/``<🎶i>``, ``<soim>``..; its chat template ends a model turn with
``<eom>``, which the issue assigns to music, so lmlab calls the end of a model turn ``<eoa>``.)

Stage-1 templates (loss on every token, samples packed into a stream)::

    x -> text : "[Human]: {instruction} {modality string}<eoh> [AnyGPT]: {text}<eoa>"
    text -> x : "[Human]: {instruction} This is input: {text}<eoh> [AnyGPT]: {modality string}<eoa>"

Stage-2 chat (AnyGPT conversation template; loss on the assistant turns only)::

    "{system} [Human]: {user}<eoh> [AnyGPT]: {reply}<eoa> [Human]: ..."

A generation prompt ends at ``"[AnyGPT]:"`` with **no trailing space** (AnyGPT's prompter does the same): the
space belongs to the first answer token (BPE ``Ġseven``), and a prompt that ends in a lone space token puts the
model off its training distribution (the miniature's ASR fell 0.975 -> 0.475). :func:`check_prompt_prefix`
asserts that every prompt tokenizes to a prefix of its training sequence.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import LmlabError
from lmlab.train.anygpt.tokenizers import DIGIT_WORDS

log = logging.getLogger(__name__)

HUMAN, BOT, EOH, EOA = "[Human]", "[AnyGPT]", "<eoh>", "<eoa>"
ROLE_TOKENS = (HUMAN, BOT, EOH, EOA)
MODALITY_TOKENS: dict[str, tuple[str, str, str]] = {
    "image": ("img", "<soi>", "<eoi>"),
    "speech": ("sp", "<sos>", "<eos_speech>"),
    "music": ("mu", "<som>", "<eom>"),
}
"""modality -> (code prefix, start marker, end marker)."""
ANYGPT_SYSTEM = ("You are an AI assistant named AnyGPT who can understand and generate multimodal content, "
                 "including text, speech, images and audio.")
"""AnyGPT's system prompt (stage-2 conversation template)."""

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "image->text": ("Describe the image.", "What is in this picture?", "Write a caption for this image."),
    "text->image": ("Draw the digit.", "Generate an image of this caption."),
    "speech->text": ("Transcribe the speech.", "What word is spoken?"),
    "text->speech": ("Say this aloud.", "Read this text."),
}
"""Stage-1 instruction pools (one is drawn per sample, as AnyGPT's prompter does)."""


def caption(digit: int) -> str:
    """The caption of a digit image (image->text is scored by the digit word in the generated caption)."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def read_digit(text: str) -> int | None:
    """The first digit word in ``text`` (None when there is none)."""
    words = [w.strip(".,!?;:") for w in text.lower().split()]
    for w in words:
        if w in DIGIT_WORDS:
            return DIGIT_WORDS.index(w)
    return None


# ----------------------------------------------------------------------------------------------------
# vocabulary expansion


@dataclass
class VocabMap:
    """Where the added tokens live in the expanded vocabulary (saved as ``anygpt_vocab.json``)."""

    text_vocab: int
    """len(tokenizer) before expansion: ids below it are the original text vocabulary."""
    roles: dict[str, int]
    """role token -> id."""
    modalities: dict[str, dict[str, int]] = field(default_factory=dict)
    """modality -> {start, end, offset (id of code 0), size}."""

    def code_ids(self, modality: str) -> range:
        m = self.modalities[modality]
        return range(m["offset"], m["offset"] + m["size"])

    def modality_of(self, token_id: int) -> str | None:
        for name, m in self.modalities.items():
            if m["offset"] <= token_id < m["offset"] + m["size"]:
                return name
        return None

    def special_ids(self) -> list[int]:
        """Every id that is not plain text (markers, roles, codes)."""
        out = list(self.roles.values())
        for name, m in self.modalities.items():
            out += [m["start"], m["end"], *self.code_ids(name)]
        return out

    def save(self, folder: str | Path) -> Path:
        from lmlab.core.runs import write_json

        return write_json(Path(folder) / "anygpt_vocab.json", asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> VocabMap:
        import json

        p = Path(folder) / "anygpt_vocab.json"
        if not p.is_file():
            raise LmlabError(f"{folder} is not an AnyGPT model folder (no anygpt_vocab.json)")
        return cls(**json.loads(p.read_text()))


def modality_token(modality: str, code: int) -> str:
    return f"<{MODALITY_TOKENS[modality][0]}_{code}>"


def expand_vocab(tok: Any, model: Any | None, modalities: dict[str, int], init: str = "mean") -> VocabMap:
    """Add role tokens, markers and codebook tokens to ``tok`` and resize ``model``'s embeddings in place.

    ``modalities``: name -> codebook size (names from :data:`MODALITY_TOKENS`). ``init``: ``mean`` (new rows
    drawn around the old rows' mean and covariance, transformers' ``mean_resizing``) or ``random`` (the
    model's initializer). Old rows are never touched.
    """
    if not hasattr(tok, "add_tokens") or not hasattr(tok, "get_vocab"):
        raise LmlabError(f"{type(tok).__name__} is not a Hugging Face tokenizer (no add_tokens)")
    for name, size in modalities.items():
        if name not in MODALITY_TOKENS:
            raise LmlabError(f"unknown modality {name!r}; known: {', '.join(MODALITY_TOKENS)}")
        if size < 1:
            raise LmlabError(f"codebook size of {name} must be >= 1, got {size}")
    if init not in ("mean", "random"):
        raise LmlabError(f"init must be mean|random, got {init!r}")
    vocab = tok.get_vocab()
    new = [t for t in ROLE_TOKENS]
    for name, size in modalities.items():
        _, start, end = MODALITY_TOKENS[name]
        new += [start, end] + [modality_token(name, i) for i in range(size)]
    clash = [t for t in new if t in vocab]
    if clash:
        raise LmlabError(f"tokenizer already has {clash[:3]}: it looks expanded already")
    text_vocab = len(tok)
    old_rows = None
    if model is not None:
        emb = _input_embeddings(model)
        old_rows = emb.weight.shape[0]
    tok.add_tokens(new)
    ids = tok.convert_tokens_to_ids(new)
    if len(set(ids)) != len(new) or min(ids) < text_vocab:
        raise LmlabError("tokenizer did not give the added tokens fresh ids")
    vm = VocabMap(text_vocab=text_vocab, roles={t: tok.convert_tokens_to_ids(t) for t in ROLE_TOKENS})
    for name, size in modalities.items():
        _, start, end = MODALITY_TOKENS[name]
        code = tok.convert_tokens_to_ids([modality_token(name, i) for i in range(size)])
        if code != list(range(code[0], code[0] + size)):
            raise LmlabError(f"{name} code tokens did not get contiguous ids")
        vm.modalities[name] = {"start": tok.convert_tokens_to_ids(start), "end": tok.convert_tokens_to_ids(end),
                               "offset": code[0], "size": size}
    if model is not None:
        _resize(model, len(tok), old_rows, text_vocab, init)
    return vm


def _input_embeddings(model: Any):
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is None or not hasattr(emb, "weight") or not hasattr(model, "resize_token_embeddings"):
        raise LmlabError(f"{type(model).__name__} cannot resize its vocabulary (no input embedding matrix / "
                         f"resize_token_embeddings)")
    return emb


def _resize(model: Any, n: int, old_rows: int, text_vocab: int, init: str) -> None:
    import torch

    try:
        if n > old_rows:
            model.resize_token_embeddings(n, mean_resizing=init == "mean")
    except (NotImplementedError, AttributeError, ValueError, TypeError) as e:
        raise LmlabError(f"{type(model).__name__} cannot resize its vocabulary: {str(e).splitlines()[0]}") from None
    # ids that fall inside rows the model already had (padded vocabularies) get the mean of the text rows
    lo, hi = text_vocab, min(n, old_rows)
    if hi > lo:
        with torch.no_grad():
            for m in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                m.weight[lo:hi] = m.weight[:text_vocab].mean(0)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", n) < n:
        cfg.vocab_size = n


# ----------------------------------------------------------------------------------------------------
# modality strings and templates


def mm_string(modality: str, codes: list[int] | np.ndarray) -> str:
    """AnyGPT's ``modality_tokens_to_string``: start marker, one token per code, end marker."""
    _, start, end = MODALITY_TOKENS[modality]
    return start + "".join(modality_token(modality, int(c)) for c in codes) + end


def stage1_prompt(direction: str, inp: str, instruction: str) -> str:
    """Stage-1 generation prompt, ending at ``[AnyGPT]:`` (no trailing space)."""
    src, _ = direction.split("->")
    if src == "text":
        return f"{HUMAN}: {instruction} This is input: {inp}{EOH} {BOT}:"
    return f"{HUMAN}: {instruction} {inp}{EOH} {BOT}:"


def stage1_text(direction: str, inp: str, out: str, instruction: str) -> str:
    """A full stage-1 training sample (prompt + " " + answer + <eoa>)."""
    return f"{stage1_prompt(direction, inp, instruction)} {out}{EOA}"


def chat_prompt(turns: list[tuple[str, str | None]], system: str = ANYGPT_SYSTEM) -> str:
    """AnyGPT conversation template; a last turn with reply None gives a generation prompt ending at ``[AnyGPT]:``."""
    parts = [system] if system else []
    for user, reply in turns:
        parts.append(f"{HUMAN}: {user}{EOH} {BOT}:" + (f" {reply}{EOA}" if reply is not None else ""))
    return " ".join(parts)


def encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def check_prompt_prefix(tok: Any, prompt: str, full: str) -> int:
    """Token count of ``prompt`` after asserting it tokenizes to a prefix of ``full`` (the boundary trap)."""
    p, f = encode(tok, prompt), encode(tok, full)
    if f[: len(p)] != p:
        raise LmlabError(f"prompt {prompt[-30:]!r} does not tokenize to a prefix of its training text: a "
                         f"generation prompt must end exactly where the answer's first token begins")
    return len(p)


def chat_masked(tok: Any, turns: list[tuple[str, str]], system: str = ANYGPT_SYSTEM) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside assistant replies) of a conversation (FastChat-style masking).

    Each assistant span starts with the space after ``[AnyGPT]:`` (it is part of the first answer token) and
    ends with ``<eoa>``. Boundaries come from tokenizing prefixes, which are checked to be token prefixes."""
    full = chat_prompt(turns, system)
    ids = encode(tok, full)
    labels = [-100] * len(ids)
    for k in range(len(turns)):
        prompt = chat_prompt(turns[:k] + [(turns[k][0], None)], system)
        a = check_prompt_prefix(tok, prompt, full)
        b = len(encode(tok, chat_prompt(turns[: k + 1], system)))
        labels[a:b] = ids[a:b]
    return ids, labels


# ----------------------------------------------------------------------------------------------------
# built-in text corpus (stage 0, replay, perplexity)


def text_corpus(seed: int = 0, n_val: int = 150) -> tuple[list[str], list[str]]:
    """Short English sentences about the digits (arithmetic, order, parity); a random held-out split."""
    w = DIGIT_WORDS
    sents = []
    for a in range(10):
        for b in range(10):
            if a + b < 10:
                sents.append(f"{w[a]} plus {w[b]} is {w[a + b]}.")
            if a - b >= 0:
                sents.append(f"{w[a]} minus {w[b]} is {w[a - b]}.")
            if a < b:
                sents.append(f"{w[a]} is smaller than {w[b]}.")
            elif a > b:
                sents.append(f"{w[a]} is larger than {w[b]}.")
        if a < 9:
            sents.append(f"the number after {w[a]} is {w[a + 1]}.")
        sents.append(f"{w[a]} is an {'even' if a % 2 == 0 else 'odd'} number.")
        sents.append(f"{caption(a)} looks like the number {w[a]}.")
    rng = np.random.default_rng(seed)
    rng.shuffle(sents)
    return sents[n_val:], sents[:n_val]


def text_eval_docs(seed: int = 0, n: int = 150) -> list[str]:
    """Held-out *documents*: new random 3-sentence combinations of training sentences (in-distribution text).

    The primary text-perplexity probe: the held-out *sentences* of :func:`text_corpus` state arithmetic facts
    the model never saw, and their perplexity rises with more text-only training (memorisation), so they
    cannot separate forgetting from overfitting."""
    train, _ = text_corpus(seed)
    rng = np.random.default_rng(seed + 424_242)
    return [" ".join(rng.choice(train, 3)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# tokenized sources and the stage-1 / stage-2 sets


@dataclass
class Sources:
    """Tokenized modality items: codes (N, L) or lists, labels (N,)."""

    image_train: np.ndarray
    image_train_y: np.ndarray
    image_test: np.ndarray
    image_test_y: np.ndarray
    speech_train: list[list[int]]
    speech_train_y: np.ndarray
    speech_test: list[list[int]]
    speech_test_y: np.ndarray


def _by_label(y: np.ndarray) -> dict[int, np.ndarray]:
    return {d: np.nonzero(y == d)[0] for d in range(10)}


def stage1_samples(src: Sources, n: int, seed: int = 0, directions: tuple[str, ...] = tuple(INSTRUCTIONS)
                   ) -> list[tuple[str, str, str, str, int]]:
    """``n`` stage-1 pairs: (direction, input string, output string, instruction, label), directions uniform."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = directions[i % len(directions)]
        if d in ("image->text", "text->image"):
            j = int(rng.integers(len(src.image_train)))
            y = int(src.image_train_y[j])
            mm = mm_string("image", src.image_train[j])
        else:
            j = int(rng.integers(len(src.speech_train)))
            y = int(src.speech_train_y[j])
            mm = mm_string("speech", src.speech_train[j])
        text = caption(y) if "image" in d else DIGIT_WORDS[y]
        instr = str(rng.choice(INSTRUCTIONS[d]))
        inp, outp = (mm, text) if d.startswith(("image", "speech")) else (text, mm)
        out.append((d, inp, outp, instr, y))
    return out


STAGE2_USER = {
    "speech->image": "Show me the number you hear. {x}",
    "image->speech": "Say the digit in this picture. {x}",
}
"""Stage-2 user messages of the cross-modal tasks ({x}: the input modality string)."""


def stage2_conversations(src: Sources, n: int, seed: int = 0, replay: float = 0.5
                         ) -> list[list[tuple[str, str]] | str]:
    """The any-to-any instruction set: speech->image, image->speech, and image -> caption -> "Now say it." ->
    speech (multi-turn); with ``replay`` > 0 that fraction is stage-1 pairs (verbatim, stage-1 template) and
    plain text sentences, the fix for forgetting. Replay items are returned as ``str`` (loss on every token)."""
    rng = np.random.default_rng(seed)
    sp_by, im_by = _by_label(src.speech_train_y), _by_label(src.image_train_y)
    stage1 = stage1_samples(src, n, seed + 1)
    text_train, _ = text_corpus(seed)
    convs: list[list[tuple[str, str]] | str] = []
    for i in range(n):
        if rng.random() < replay:
            if rng.random() < 0.25:
                convs.append(" ".join(rng.choice(text_train, 3)))
            else:  # a stage-1 pair verbatim (stage-1 template, loss on every token)
                d, inp, outp, instr, _ = stage1[i]
                convs.append(stage1_text(d, inp, outp, instr))
            continue
        y = int(rng.integers(10))
        img = mm_string("image", src.image_train[int(rng.choice(im_by[y]))])
        sp = mm_string("speech", src.speech_train[int(rng.choice(sp_by[y]))])
        kind = int(rng.integers(3))
        if kind == 0:
            convs.append([(STAGE2_USER["speech->image"].format(x=sp), img)])
        elif kind == 1:
            convs.append([(STAGE2_USER["image->speech"].format(x=img), sp)])
        else:
            convs.append([(f"{img} What is in this picture?", caption(y)), ("Now say it.", sp)])
    return convs


def bpe_texts(seed: int = 0) -> list[str]:
    """Text the tiny BPE is trained on: the corpus, captions, instructions, template words, system prompt."""
    train, _ = text_corpus(seed)
    extra = [caption(d) for d in range(10)] + [w for v in INSTRUCTIONS.values() for w in v]
    extra += [ANYGPT_SYSTEM, "This is input:", "Now say it.", *STAGE2_USER.values(), "Human AnyGPT"]
    return train + extra * 20


__all__ = ["ANYGPT_SYSTEM", "BOT", "EOA", "EOH", "HUMAN", "INSTRUCTIONS", "MODALITY_TOKENS", "Sources", "VocabMap",
           "caption", "chat_masked", "chat_prompt", "check_prompt_prefix", "expand_vocab", "mm_string",
           "read_digit", "stage1_prompt", "stage1_samples", "stage1_text", "stage2_conversations", "text_corpus",
           "text_eval_docs"]
