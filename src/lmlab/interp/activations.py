"""Activation sources for SAE training: one LM forward feeds every hook point (Llama Scope's activation store).

Llama Scope (arXiv 2410.20526, ``activation/activation_source.py`` + ``activation_store.py``) generates
activations online: text costs ~2 B/token, an activation ~8 KB/token, so reading cached activations would be the
bottleneck. The pieces here:

* :class:`LMActivationSource` cuts a token stream into sequences of ``seq_len`` (BOS prepended), visits them in a
  seeded random order and runs **one** forward per batch of sequences with a capture hook on every requested
  point (``blocks.*.hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``, Mamba ``hook_mixer_out``, aliases
  ``L{i}R/A/M``). BOS/EOS/PAD positions are dropped (``mask``), since BOS activations have outlier norms.
* :class:`ShardCache` (optional): every LM batch is also written as a safetensors shard (``shard_00000.safetensors``:
  one tensor per hook + ``input_ids`` + ``mask``); a rerun reads the finished shards and continues the LM after
  the last one, so an interrupted generation resumes. A manifest fingerprint refuses a mismatched cache.
* :class:`ActivationStore`: a shuffling buffer of ``buffer_tokens`` rows (all hooks share the row order, so
  transcoder input/output rows stay aligned); filled once, reshuffled and half-refilled whenever half of it has
  been consumed, serving ``(x, y)`` batches per (in, out) hook pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)


class LMActivationSource:
    """Sequences of a token stream -> captured activations at ``names`` (one forward per LM batch)."""

    def __init__(self, model: torch.nn.Module, names: list[str], ids: np.ndarray | torch.Tensor, *, seq_len: int = 256,
                 lm_batch: int = 16, bos_id: int | None = None, special_ids: list[int] | tuple[int, ...] = (),
                 prepend_bos: bool = True, seed: int = 0, shuffle: bool = True, cache: ShardCache | None = None):
        ids = torch.from_numpy(np.array(ids, dtype=np.int64)).reshape(-1)
        body = seq_len - 1 if (prepend_bos and bos_id is not None) else seq_len
        if body < 1:
            raise LmlabError(f"seq_len={seq_len} is too short")
        n = ids.numel() // body
        if n < 1:
            raise LmlabError(f"token stream of {ids.numel()} tokens is shorter than one sequence ({seq_len})")
        seqs = ids[: n * body].reshape(n, body)  # (n_seq, body)
        if prepend_bos and bos_id is not None:
            seqs = torch.cat([torch.full((n, 1), int(bos_id)), seqs], 1)  # (n_seq, seq_len)
        self.model, self.names, self.seqs = model, list(names), seqs
        self.lm_batch, self.special = lm_batch, torch.tensor(sorted(set(int(s) for s in special_ids)),
                                                             dtype=torch.long)
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        self.pos = 0  # next index into ``order``
        self.forward_calls = 0
        self.epochs = 0
        self.cache = cache
        self._dims: dict[str, int] | None = None
        self.device = next(model.parameters()).device

    @property
    def n_sequences(self) -> int:
        return self.seqs.shape[0]

    def mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True at positions to train on (not BOS/EOS/PAD): (B, T) bool."""
        return ~torch.isin(ids, self.special) if self.special.numel() else torch.ones_like(ids, dtype=torch.bool)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One LM forward capturing every hook: ids (B, T) -> name -> (B, T, d) float32 on CPU."""
        from lmlab.core.hooks import capture

        with capture(self.model, self.names, to_cpu=True) as acts:
            self.model(input_ids=ids.to(self.device))
        self.forward_calls += 1
        missing = [n for n in self.names if n not in acts]
        if missing:
            raise LmlabError(f"hooks {missing} did not fire during the forward pass")
        return {n: acts[n].float() for n in self.names}

    def dims(self) -> dict[str, int]:
        """Width of each hook's activation (from a 2-token probe forward, not counted in forward_calls)."""
        if self._dims is None:
            acts = self.forward(self.seqs[:1, :2])
            self.forward_calls -= 1
            self._dims = {n: int(a.shape[-1]) for n, a in acts.items()}
        return self._dims

    def _next_ids(self) -> torch.Tensor:
        sel = self.order[self.pos: self.pos + self.lm_batch]
        self.pos += sel.numel()
        return self.seqs[sel]

    def lm_batches(self, n_tokens: int | None = None, restart: bool = True) -> Iterator[dict[str, Any]]:
        """Yield ``{"input_ids" (B,T), "mask" (B,T), "acts": name -> (B,T,d)}`` until ``n_tokens`` masked tokens
        (or one epoch). Uses the shard cache when one is attached."""
        if restart:
            self.pos = 0
        seen = 0
        per_epoch = -(-self.n_sequences // self.lm_batch)
        while n_tokens is None or seen < n_tokens:
            if n_tokens is None and self.pos >= self.n_sequences:
                return
            if self.pos >= self.n_sequences:
                self.pos, self.epochs = 0, self.epochs + 1
            batch_no = self.epochs * per_epoch + self.pos // self.lm_batch
            ids = self._next_ids()
            cached = self.cache.read(batch_no) if self.cache else None
            if cached is not None:
                ids, mask, acts = cached["input_ids"], cached["mask"].bool(), {n: cached[n] for n in self.names}
            else:
                acts = self.forward(ids)
                mask = self.mask(ids)
                if self.cache:
                    self.cache.write(batch_no, {"input_ids": ids, "mask": mask.to(torch.uint8), **acts})
            seen += int(mask.sum())
            yield {"input_ids": ids, "mask": mask, "acts": acts}

    def token_rows(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless stream of masked activation rows: name -> (n, d) per LM batch."""
        while True:
            for b in self.lm_batches(None, restart=False):
                yield {n: a[b["mask"]] for n, a in b["acts"].items()}
            self.pos = 0
            self.epochs += 1
            log.warning("activation source: all %d sequences used; starting epoch %d", self.n_sequences,
                        self.epochs + 1)

    def collect(self, n_tokens: int) -> dict[str, torch.Tensor]:
        """``n_tokens`` masked rows per hook (from the start of the order): name -> (n_tokens, d)."""
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        for b in self.lm_batches(n_tokens):
            for n, a in b["acts"].items():
                parts[n].append(a[b["mask"]])
        return {n: torch.cat(v)[:n_tokens] for n, v in parts.items()}


class ShardCache:
    """On-disk activation shards (one per LM batch), safetensors; resumable and fingerprinted."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any]):
        from lmlab.core.runs import write_json

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        fp = json.dumps(fingerprint, sort_keys=True, default=str)
        self.key = hashlib.sha256(fp.encode()).hexdigest()[:16]
        man = self.folder / "manifest.json"
        if man.is_file():
            old = json.loads(man.read_text())
            if old.get("key") != self.key:
                raise LmlabError(f"activation cache {self.folder} was made with other settings "
                                 f"({old.get('fingerprint')}); use another --cache folder")
        else:
            write_json(man, {"key": self.key, "fingerprint": fingerprint})

    def path(self, i: int) -> Path:
        return self.folder / f"shard_{i:05d}.safetensors"

    def read(self, i: int) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(i)
        return load_file(str(p)) if p.is_file() else None

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        from lmlab.core.runs import save_tensors

        save_tensors(self.path(i), tensors)  # atomic: a killed run never leaves half a shard

    def n_shards(self) -> int:
        return len(list(self.folder.glob("shard_*.safetensors")))


def special_token_ids(tok: Any) -> list[int]:
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            ids.add(int(v))
    return sorted(ids)


def open_source(model: torch.nn.Module, tok: Any, names: list[str], *, data: str = "code,prose,math",
                max_bytes: int = 8_000_000, seq_len: int = 256, lm_batch: int = 16, prepend_bos: bool = True,
                seed: int = 0, cache: str = "", split: str = "train") -> LMActivationSource:
    """An :class:`LMActivationSource` over the ``split`` token stream of a corpus spec, encoded with ``tok``."""
    from lmlab.core.zoo import token_streams

    train, val, meta = token_streams(tok, data, max_bytes, seed=0)
    ids = train if split == "train" else val
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    shard = None
    if cache:
        fp = {"model": getattr(model.config, "_name_or_path", ""), "names": sorted(names), "seq_len": seq_len,
              "lm_batch": lm_batch, "bos": prepend_bos, "seed": seed, "split": split,
              "corpus": meta["corpus_hash"], "tokenizer": meta["tokenizer_hash"],
              "weights": _weights_hash(model)}
        shard = ShardCache(Path(cache) / split, fp)
    return LMActivationSource(model, names, ids, seq_len=seq_len, lm_batch=lm_batch, bos_id=bos,
                              special_ids=special_token_ids(tok), prepend_bos=prepend_bos, seed=seed, cache=shard)


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in list(model.named_parameters())[:4]:
        h.update(name.encode())
        h.update(p.detach().float().reshape(-1)[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ActivationStore:
    """Shuffling buffer over an activation source serving ``{(in, out): (x (B, d_in), y (B, d_out))}``."""

    def __init__(self, source: LMActivationSource, pairs: list[tuple[str, str]], buffer_tokens: int = 500_000,
                 batch_size: int = 4096, seed: int = 0, rows: Iterator[dict[str, torch.Tensor]] | None = None):
        """``rows``: the stream of masked activation rows (default ``source.token_rows()``; under torchrun
        :func:`lmlab.interp.sae_dist.token_rows`, which splits the LM forwards over ranks)."""
        self.source, self.pairs, self.batch_size = source, list(pairs), batch_size
        self.capacity = max(2 * batch_size, buffer_tokens)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.buf: dict[str, torch.Tensor] | None = None
        self.read = 0
        self._rows = rows if rows is not None else source.token_rows()
        self._carry: dict[str, torch.Tensor] | None = None

    def skip_sequences(self, n: int) -> None:
        """Resume: continue the source after ``n`` consumed sequences (before the first batch)."""
        self.source.pos = n % self.source.n_sequences

    def sequences_consumed(self) -> int:
        return self.source.pos

    def _take(self, n: int) -> dict[str, torch.Tensor]:
        """The next ``n`` rows of the source (all hooks aligned)."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.source.names}
        have = 0
        while have < n:
            rows = self._carry or next(self._rows)
            self._carry = None
            m = next(iter(rows.values())).shape[0]
            use = min(m, n - have)
            for k, v in rows.items():
                parts[k].append(v[:use])
            if use < m:
                self._carry = {k: v[use:] for k, v in rows.items()}
            have += use
        return {k: torch.cat(v) for k, v in parts.items()}

    def _shuffle(self) -> None:
        assert self.buf is not None
        perm = torch.randperm(self.capacity, generator=self.gen)
        self.buf = {k: v[perm] for k, v in self.buf.items()}
        self.read = 0

    def _fill(self) -> None:
        if self.buf is None:
            self.buf = self._take(self.capacity)
            self._shuffle()
        elif self.read + self.batch_size > self.capacity // 2:  # half consumed: refill those rows, reshuffle
            new = self._take(self.read)
            for k in self.buf:
                self.buf[k][: self.read] = new[k]
            self._shuffle()

    def peek(self, n: int) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
        """Up to ``n`` buffered rows without consuming them (for the normalization estimate)."""
        self._fill()
        assert self.buf is not None
        return {p: (self.buf[p[0]][:n], self.buf[p[1]][:n]) for p in self.pairs}

    def next_batch(self) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
        self._fill()
        assert self.buf is not None
        sl = slice(self.read, self.read + self.batch_size)
        self.read += self.batch_size
        return {p: (self.buf[p[0]][sl], self.buf[p[1]][sl]) for p in self.pairs}
