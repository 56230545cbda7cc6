"""Byte-level BPE tokenizer: trained with ``tokenizers``, saved and loaded as a Hugging Face fast tokenizer.

The recipe is GPT-2's byte-level BPE (Radford et al. 2019) with the settings measured in
``specs/env.md`` section 5:

* normaliser ``NFC``; pre-tokeniser ``ByteLevel(add_prefix_space=False)`` (GPT-2 regex split, bytes mapped
  to 256 printable symbols); decoder ``ByteLevel``;
* the BPE trainer's initial alphabet is all 256 byte symbols, so every string is encodable without an
  ``<unk>`` and ``decode(encode(x)) == x`` for any NFC text (other text comes back NFC-normalised);
* special tokens (default ``<|endoftext|>`` and ``<|pad|>``) take the first ids; ``<|endoftext|>`` is the
  eos and bos token (GPT-2 convention), ``<|pad|>`` the pad token. No special token is added by ``encode``:
  packing inserts EOS between documents (:func:`lmlab.core.corpus.encode_docs`).

The result is a ``PreTrainedTokenizerFast``; :func:`save_tokenizer` writes an ordinary ``save_pretrained``
folder (``tokenizer.json`` + ``tokenizer_config.json``) that ``AutoTokenizer.from_pretrained`` reads offline.
Under transformers 5 the loaded class may be ``TokenizersBackend``; the interface is the same.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|pad|>")


def train_bpe(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2,
              special_tokens: Sequence[str] = SPECIAL_TOKENS, show_progress: bool = False) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts the special tokens and the 256 byte symbols, so it must be at least
    ``256 + len(special_tokens)``; the result may be smaller when the text has too few merges.
    The first special token is eos/bos, the second (if any) pad.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    if not special_tokens:
        raise LmlabError("train_bpe needs at least one special token (the end-of-text token)")
    if vocab_size < 256 + len(special_tokens):
        raise LmlabError(f"vocab_size must be >= {256 + len(special_tokens)} (256 bytes + special tokens), "
                         f"got {vocab_size}")
    if min_frequency < 1:
        raise LmlabError(f"min_frequency must be >= 1, got {min_frequency}")
    texts = list(texts)
    if not any(t for t in texts):
        raise LmlabError("train_bpe got no text")

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    log.info("trained byte-level BPE: vocab %d on %d texts in %.1f s", tok.get_vocab_size(), len(texts),
             time.perf_counter() - t0)
    eos = special_tokens[0]
    pad = special_tokens[1] if len(special_tokens) > 1 else eos
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=eos,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok: Any, path: str | Path) -> Path:
    """``save_pretrained`` into a temp folder next to ``path``, then swap it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old: Path | None = None
    try:
        tok.save_pretrained(str(tmp))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer folder (``save_pretrained`` layout) or a bare ``tokenizer.json``, offline."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path).expanduser()
    if not path.exists():
        raise LmlabError(f"tokenizer not found: {path}")
    if path.is_file():
        if path.suffix != ".json":
            raise LmlabError(f"{path} is not a tokenizer folder or tokenizer.json")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False)
        vocab = tok.get_vocab()
        for special in SPECIAL_TOKENS[:1]:
            if special in vocab:
                tok.eos_token = tok.bos_token = special
        if SPECIAL_TOKENS[1] in vocab:
            tok.pad_token = SPECIAL_TOKENS[1]
        return tok
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise LmlabError(f"no tokenizer in {path} (expected tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmlabError(f"could not load tokenizer from {path}: {first}") from None


def bytes_per_token(tok: Any, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over ``texts`` (no special tokens): higher is better compression."""
    n_bytes = n_tokens = 0
    backend = getattr(tok, "backend_tokenizer", None)
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        if backend is not None:
            n_tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
        else:
            n_tokens += sum(len(tok.encode(t, add_special_tokens=False)) for t in batch)
        batch.clear()

    for t in texts:
        n_bytes += len(t.encode("utf-8"))
        batch.append(t)
        if len(batch) >= 512:
            flush()
    if batch:
        flush()
    if n_tokens == 0:
        raise LmlabError("bytes_per_token: no tokens (empty texts)")
    return n_bytes / n_tokens
