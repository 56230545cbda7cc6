"""Policy initialization (o1 roadmap, component 1) and the policy interface every search method uses.

Roadmap (Zeng et al., arXiv 2412.14135), section "Policy Initialization": pre-training, then instruction tuning
(SFT), then *human-like reasoning behaviours* (problem analysis, task decomposition, alternative proposal,
self-evaluation, self-correction) that decide the space search and RL can explore. Its claim we measure: a policy
distilled from a teacher is capped by that teacher, while pass@N (the exploration space) can stay high.

**SFT** (``lmlab reason sft``): completion-only next-token loss on demonstrations (prompt x, completion y)::

    L(theta) = - 1/|y| sum_t log pi_theta(y_t | x, y_<t)        (prompt tokens and padding are masked out)

Defaults (spec section 3, measured on 2 CPU cores): a from-scratch GPT (2 layers, d = 64, 4 heads, learned
positions, ~110k params, character tokenizer), 60k demonstrations, AdamW lr 3e-3, 100 warm-up steps, cosine,
batch 128, **1500 steps**. The spec's 600 steps are too few for this HF GPT-2 build: greedy is right (0.91-0.99 on
clean demos, seed-dependent) but the *sampling* distribution is still far too flat on the sum digit (sampled
accuracy 0.09-0.17 on clean demos against the teacher's 0.97^6 = 0.83), which also starves search of correct
samples and the PRM of a trunk that can add. At 1500 steps the clean policy samples like its teacher (0.83).
Any HF causal LM works instead (``model=ref:dense`` or a path / hub name).

**The policy interface** (shared with search.py and the learning issue)::

    policy.expand(prefixes, n, stop="|", max_new_tokens=8, temperature=1.0, until=None)
        -> list (per prefix) of n Expansion(text, n_tokens, finished, logprob)

Generation is batched with a KV cache: prefixes are grouped by token length (so no padding is needed and any
architecture works), repeated ``n`` times, and sampled token by token; a row stops at ``stop`` (or when
``until[i](text)`` is true at a stop), or after ``max_new_tokens``. ``policy.tokens_generated`` counts exactly the
tokens returned in expansions (``tokens_computed`` adds the rows kept alive after they stopped).
Backends: :class:`LMPolicy` (any HF causal LM or the tiny GPT), :class:`OpenAIPolicy` (an OpenAI-compatible or
vLLM ``/v1/completions`` server).
"""

from __future__ import annotations

import json
import logging
import math
import random
import string
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "reason_tokenizer.json"


# --------------------------------------------------------------------------------------------------------------
# tokenizers


class CharTokenizer:
    """One token per printable ASCII character (+ newline); id 0 is padding."""

    def __init__(self, chars: str | None = None):
        self.chars = chars or (string.printable[:95] + "\n")
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}
        self.pad_id = 0

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise LmlabError(f"character {e.args[0]!r} is not in the reason tokenizer") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if i > 0)

    def save(self, folder: str | Path) -> None:
        from lmlab.core.runs import write_json

        write_json(Path(folder) / TOKENIZER_FILE, {"type": "char", "chars": self.chars})


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the same ``encode``/``decode`` as :class:`CharTokenizer`."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save(self, folder: str | Path) -> None:
        self.tok.save_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------
# models


def tiny_gpt(vocab_size: int, n_layer: int = 2, d_model: int = 64, n_head: int = 4, n_positions: int = 256):
    """The testbed policy: a from-scratch GPT-2-architecture model (HF ``GPT2LMHeadModel``, ~110k params)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=d_model, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def load_lm(spec: str, device: Any = "cpu", trust_remote_code: bool = False, vocab_hint: int | None = None):
    """``(model, tokenizer)``: ``tiny`` (fresh tiny GPT + char tokenizer), a folder saved by ``reason sft``,
    or any HF causal LM spec (``ref:dense``, path, hub name)."""
    if spec == "tiny":
        tok = CharTokenizer()
        return tiny_gpt(len(tok)).to(device), tok
    p = Path(spec).expanduser()
    if p.is_dir() and (p / TOKENIZER_FILE).is_file():
        from transformers import AutoModelForCausalLM

        meta = json.loads((p / TOKENIZER_FILE).read_text())
        return AutoModelForCausalLM.from_pretrained(p).to(device).eval(), CharTokenizer(meta["chars"])
    from lmlab.core.models import load

    model, tok = load(spec, device, None, trust_remote_code)
    return model, HFTokenizer(tok)


def save_lm(model: Any, tok: Any, folder: str | Path) -> Path:
    """Save model (safetensors) + tokenizer into ``folder`` (an HF ``save_pretrained`` folder)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# the policy interface


@dataclass
class Expansion:
    """One sampled continuation of a prefix."""

    text: str
    n_tokens: int
    finished: bool
    """True when generation ended at the stop condition (not at max_new_tokens)."""
    logprob: float = 0.0


class LMPolicy:
    """KV-cached, batched step sampler over any HF causal LM (or the tiny GPT)."""

    def __init__(self, model: Any, tok: Any, max_batch: int = 4096, device: Any = None):
        self.model = model.eval()
        self.tok = tok
        self.max_batch = max_batch
        self.device = device or next(model.parameters()).device
        self.tokens_generated = 0
        self.tokens_computed = 0
        self.calls = 0
        mt = getattr(getattr(model, "config", None), "model_type", "")
        self.use_cache = mt not in ("mamba", "mamba2", "falcon_mamba")  # recurrent caches need cache_position
        import inspect

        cfg = getattr(model, "config", None)
        self.max_positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def reset_counters(self) -> None:
        self.tokens_generated = self.tokens_computed = self.calls = 0

    @torch.no_grad()
    def _sample_group(self, ids: torch.Tensor, stop: str | None, max_new: int, temperature: float,
                      until: list[Callable[[str], bool] | None]) -> list[Expansion]:
        """Sample continuations for rows of equal length. ids: (R, T)."""
        R = ids.shape[0]
        out = torch.zeros(R, max_new, dtype=torch.long, device=ids.device)  # (R, max_new)
        lp = torch.zeros(R, device=ids.device)
        done = torch.zeros(R, dtype=torch.bool, device=ids.device)
        length = torch.full((R,), max_new, dtype=torch.long)
        past, x, seq = None, ids, ids
        stop_last = stop[-1] if stop else None
        for t in range(max_new):
            if self.use_cache:
                mask = torch.ones(R, seq.shape[1], dtype=torch.long, device=ids.device)
                o = self.model(input_ids=x, attention_mask=mask, use_cache=True, **{self._cache_kw: past})
                past = o.cache if "cache" in o else o.past_key_values
            else:
                o = self.model(input_ids=seq, attention_mask=torch.ones_like(seq))
            logits = o.logits[:, -1].float()  # (R, V)
            if temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1)[:, 0]
            lp += torch.where(done, 0.0, F.log_softmax(logits, -1).gather(1, nxt[:, None])[:, 0])
            out[:, t] = nxt
            self.tokens_computed += R
            if stop_last is not None:
                for r in (~done).nonzero()[:, 0].tolist():
                    piece = self.tok.decode([int(nxt[r])])
                    if stop_last not in piece:
                        continue
                    text = self.tok.decode(out[r, : t + 1].tolist())
                    if stop in text and (until[r] is None or until[r](text)):
                        done[r] = True
                        length[r] = t + 1
            if bool(done.all()):
                break
            x = nxt[:, None]
            seq = torch.cat([seq, x], 1)
        res = []
        for r in range(R):
            n = int(length[r])
            text = self.tok.decode(out[r, :n].tolist())
            if stop and bool(done[r]) and until[r] is None:  # cut a multi-char token after the stop string
                text = text[: text.index(stop) + len(stop)]
            res.append(Expansion(text, n, bool(done[r]), float(lp[r])))
        return res

    def expand(self, prefixes: list[str], n: int = 1, stop: str | None = "|", max_new_tokens: int = 8,
               temperature: float = 1.0, until: list[Callable[[str], bool] | None] | None = None
               ) -> list[list[Expansion]]:
        """``n`` continuations of every prefix, each ending at ``stop`` (or when ``until[i]`` accepts it)."""
        if n < 1:
            raise LmlabError(f"expand: n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise LmlabError(f"expand: max_new_tokens must be >= 1, got {max_new_tokens}")
        until = until or [None] * len(prefixes)
        enc = [self.tok.encode(p) for p in prefixes]
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(enc):
            groups.setdefault(len(e), []).append(i)
        results: list[list[Expansion]] = [[] for _ in prefixes]
        per_chunk = max(1, self.max_batch // n)
        for _, idx in sorted(groups.items()):
            for c in range(0, len(idx), per_chunk):
                chunk = idx[c: c + per_chunk]
                ids = torch.tensor([enc[i] for i in chunk for _ in range(n)], device=self.device)  # (len*n, T)
                room = max_new_tokens if not self.max_positions else min(max_new_tokens,
                                                                         self.max_positions - ids.shape[1])
                if room < 1:  # the context window is full: nothing can be generated
                    for i in chunk:
                        results[i] = [Expansion("", 0, False) for _ in range(n)]
                    continue
                exps = self._sample_group(ids, stop, room, temperature,
                                          [until[i] for i in chunk for _ in range(n)])
                self.calls += 1
                for j, i in enumerate(chunk):
                    results[i] = exps[j * n: (j + 1) * n]
        self.tokens_generated += sum(e.n_tokens for r in results for e in r)
        return results

    @torch.no_grad()
    def next_token_prob(self, prefixes: list[str], token_text: str) -> list[float]:
        """p(next text starts with ``token_text`` | prefix): the internal self-evaluation signal."""
        tid = self.tok.encode(token_text)[0]
        out = []
        for i in range(0, len(prefixes), 512):
            enc = [self.tok.encode(p) for p in prefixes[i: i + 512]]
            for e in enc:
                logits = self.model(input_ids=torch.tensor([e], device=self.device)).logits[0, -1].float()
                out.append(float(F.softmax(logits, -1)[tid]))
        return out


class OpenAIPolicy:
    """The same ``expand`` over an OpenAI-compatible ``/v1/completions`` server (vLLM, TGI, llama.cpp ...)."""

    def __init__(self, base_url: str, model: str = "default", timeout: float = 120.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.timeout = timeout
        self.api_key = api_key
        self.tokens_generated = self.tokens_computed = self.calls = 0

    def reset_counters(self) -> None:
        self.tokens_generated = self.tokens_computed = self.calls = 0

    def expand(self, prefixes: list[str], n: int = 1, stop: str | None = "|", max_new_tokens: int = 8,
               temperature: float = 1.0, until: list | None = None) -> list[list[Expansion]]:
        if until and any(u is not None for u in until):
            raise LmlabError("OpenAIPolicy supports stop strings only (no 'until' callbacks)")
        body = {"model": self.model_name, "prompt": prefixes, "n": n, "max_tokens": max_new_tokens,
                "temperature": temperature, "logprobs": 1}
        if stop:
            body["stop"] = [stop]
        req = urllib.request.Request(f"{self.base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = json.loads(r.read())
        except OSError as e:
            raise LmlabError(f"completion server {self.base_url} failed: {e}") from None
        res: list[list[Expansion]] = [[] for _ in prefixes]
        for i, ch in enumerate(sorted(data["choices"], key=lambda c: c.get("index", 0))):
            lps = (ch.get("logprobs") or {}).get("token_logprobs") or []
            text = ch["text"]
            finished = ch.get("finish_reason") == "stop"
            if finished and stop and not text.endswith(stop):  # servers strip the stop string
                text += stop
            res[i // n].append(Expansion(text, len(lps), finished, float(sum(x for x in lps if x is not None))))
        self.calls += 1
        self.tokens_generated += int(data.get("usage", {}).get("completion_tokens",
                                                               sum(e.n_tokens for r in res for e in r)))
        return res


def rollout(policy: Any, task: Any, problems: list, prefix_steps: list[list[str]], n: int = 1,
            temperature: float = 1.0) -> list[list[list[str]]]:
    """Complete each (problem, step prefix) ``n`` times to a terminal state; returns the *new* steps.

    Uses one ``expand`` call with ``until`` = the task's terminal test (so the accounting is exact)."""
    from lmlab.reason.tasks import split_steps

    prompts = [p.prompt + "".join(s) for p, s in zip(problems, prefix_steps)]
    max_new = [max(task.max_steps(p) - len(s), 1) * task.step_chars for p, s in zip(problems, prefix_steps)]

    def mk(p, s):
        return lambda text: task.is_terminal(p, s + split_steps(text, task.step_sep))

    if isinstance(policy, OpenAIPolicy):  # no callbacks: sample step by step
        out: list[list[list[str]]] = [[[] for _ in range(n)] for _ in problems]
        live = [(i, j) for i in range(len(problems)) for j in range(n)
                if not task.is_terminal(problems[i], prefix_steps[i])]
        while live:
            exps = policy.expand([prompts[i] + "".join(out[i][j]) for i, j in live], 1, task.step_sep,
                                 task.step_chars, temperature)
            nxt = []
            for (i, j), e in zip(live, exps):
                out[i][j].append(e[0].text)
                if not (task.is_terminal(problems[i], prefix_steps[i] + out[i][j]) or not e[0].finished):
                    nxt.append((i, j))
            live = nxt
        return out
    exps = policy.expand(prompts, n, task.step_sep, max(max_new), temperature,
                         until=[mk(p, s) for p, s in zip(problems, prefix_steps)])
    return [[split_steps(e.text, task.step_sep) for e in row] for row in exps]


# --------------------------------------------------------------------------------------------------------------
# SFT (completion-only loss)


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over completion tokens. logits (B, T, V); labels (B, T) with -100 = masked."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def encode_pairs(tok: Any, prompts: list[str], completions: list[str], device: Any = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and labels (B, T) with the prompt and padding masked (-100)."""
    rows = [(tok.encode(p), tok.encode(c)) for p, c in zip(prompts, completions)]
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
    return ids.to(device), labels.to(device)


def sft(model: Any, tok: Any, prompts: list[str], completions: list[str], steps: int = 1500, batch_size: int = 128,
        lr: float = 3e-3, warmup: int = 100, weight_decay: float = 0.01, seed: int = 0,
        log_fn: Callable[[dict], None] | None = None, progress: bool = True) -> list[float]:
    """Completion-only SFT with AdamW + linear warm-up + cosine decay; returns the loss per step."""
    from tqdm.auto import tqdm

    if not prompts or len(prompts) != len(completions):
        raise LmlabError("sft needs the same (non-zero) number of prompts and completions")
    dev = next(model.parameters()).device
    ids, labels = encode_pairs(tok, prompts, completions, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="sft", disable=not progress, leave=False):
        b = torch.randint(0, ids.shape[0], (min(batch_size, ids.shape[0]),), generator=g).to(dev)
        loss = completion_loss(model(input_ids=ids[b]).logits, labels[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_fn and (step % 50 == 0 or step == steps - 1):
            log_fn({"step": step, "loss": losses[-1], "lr": sched.get_last_lr()[0]})
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------------------
# evaluation helpers and behaviour metrics


def behaviour_stats(task: Any, problems: list, step_lists: list[list[str]]) -> dict[str, float]:
    """Frequency of the roadmap's behaviours in generated solutions: self-correction (``!``), alternative
    proposal (``?``), and how often a correction actually replaced a wrong step by the right one (gold labels)."""
    from lmlab.reason.tasks import ALTERNATIVE, CORRECT

    n = max(len(step_lists), 1)
    corr = sum(s.startswith(CORRECT) for st in step_lists for s in st)
    alt = sum(s.startswith(ALTERNATIVE) for st in step_lists for s in st)
    fixed = tried = 0
    for p, st in zip(problems, step_lists):
        lab = task.step_labels(p, st)
        if lab is None:
            continue
        gold = task.solution(p)
        depth = 0
        for k, s in enumerate(st):
            if s[:1] in (CORRECT, ALTERNATIVE):
                depth -= 1
                if s[0] == CORRECT and k > 0:
                    tried += 1
                    fixed += int(0 <= depth < len(gold) and s[1:] == gold[depth] and st[k - 1][-4:] != gold[depth])
            depth += 1
    return {"self_correction_per_solution": corr / n, "alternative_per_solution": alt / n,
            "solutions_with_behaviour": sum(any(s[:1] in (CORRECT, ALTERNATIVE) for s in st) for st in step_lists) / n,
            "correction_success": fixed / tried if tried else float("nan")}


def evaluate_policy(policy: Any, task: Any, problems: list, k: int = 16, temperature: float = 1.0
                    ) -> dict[str, Any]:
    """Greedy accuracy, sampled accuracy, pass@k (unbiased estimator from k samples), per-step error rates of the
    greedy solution on carry-in vs other columns (column_add), and behaviour frequencies."""
    greedy = [r[0] for r in rollout(policy, task, problems, [[] for _ in problems], 1, 0.0)]
    samples = rollout(policy, task, problems, [[] for _ in problems], k, temperature)
    ok = [[task.check(p, s) for s in row] for p, row in zip(problems, samples)]
    out: dict[str, Any] = {
        "greedy": sum(task.check(p, s) for p, s in zip(problems, greedy)) / len(problems),
        "sample": sum(sum(r) for r in ok) / (len(problems) * k),
        f"pass@{k}": sum(any(r) for r in ok) / len(problems),
    }
    if hasattr(task, "digits"):
        from lmlab.reason.tasks import effective_steps

        err = {"carry": [0, 0], "other": [0, 0]}
        for p, st in zip(problems, greedy):
            gold, eff = task.solution(p), effective_steps(st)
            for g, s in zip(gold, eff):
                key = "carry" if g[0] == "1" else "other"
                err[key][0] += int(g != s)
                err[key][1] += 1
        out["greedy_step_error_carry_in"] = err["carry"][0] / max(err["carry"][1], 1)
        out["greedy_step_error_other"] = err["other"][0] / max(err["other"][1], 1)
    out["behaviours"] = behaviour_stats(task, problems, [s for row in samples for s in row])
    return out


# --------------------------------------------------------------------------------------------------------------
# lmlab reason sft


@dataclass
class SFTConfig(RunArgs):
    """Policy initialization: SFT of a causal LM on (noisy) step-by-step task demonstrations."""

    model: str = "tiny"
    """Policy to fine-tune: tiny (fresh ~110k-param GPT, char tokenizer), ref:dense, a path or HF name."""
    task: str = "column_add"
    """Task: column_add | countdown | jsonl."""
    difficulty: int = 6
    """Digits (column_add) or numbers (countdown)."""
    problems: str = ""
    """JSONL problems with answers/solutions (task=jsonl)."""
    n_demos: int = 60_000
    """Demonstrations to synthesize."""
    q_sys: float = 0.6
    """Teacher forgets an incoming carry with this probability (0.6 = systematic, majority-wrong teacher)."""
    q_rand: float = 0.03
    """Teacher replaces a step by a random one with this probability."""
    behaviours: float = 0.0
    """Per-step probability of injecting self-correction ('!') / alternative proposal ('?') into a demo."""
    steps: int = 1500
    """Optimizer steps (600, the spec's value, leaves the sampling distribution far too flat; see the module doc)."""
    batch_size: int = 128
    """Demonstrations per optimizer step."""
    lr: float = 3e-3
    """AdamW peak learning rate (cosine decay)."""
    warmup: int = 100
    """Linear warm-up steps."""
    n_test: int = 300
    """Held-out test problems for greedy / sampled accuracy and pass@k."""
    pass_k: int = 16
    """Samples per test problem for sampled accuracy and pass@k."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_demos < 1 or self.steps < 1 or self.batch_size < 1 or self.n_test < 1 or self.pass_k < 1:
            raise ConfigError("n_demos, steps, batch_size, n_test and pass_k must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for k in ("q_sys", "q_rand", "behaviours"):
            if not 0 <= getattr(self, k) <= 1:
                raise ConfigError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if self.task == "jsonl" and not self.problems:
            raise ConfigError("task=jsonl needs problems=FILE.jsonl")


def build_task(name: str, difficulty: int, problems: str = "", **noise: float):
    from lmlab.reason.tasks import make_task

    if name == "column_add":
        return make_task(name, difficulty, **noise)
    if name == "jsonl":
        return make_task(name, None, path=problems)
    return make_task(name, difficulty)


def split_problems(task: Any, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Train / test problems from disjoint RNG streams; the test set depends only on ``seed``."""
    if hasattr(task, "problems") and task.problems:
        rng = random.Random(seed)
        probs = list(task.problems)
        rng.shuffle(probs)
        n_test = min(n_test, max(len(probs) // 5, 1))
        return probs[n_test:] or probs, probs[:n_test]
    test = task.sample(n_test, random.Random(10_007 + seed))
    keys = {p.prompt for p in test}
    train = [p for p in task.sample(n_train, random.Random(seed)) if p.prompt not in keys]
    return train, test


def demonstrations(task: Any, problems: list, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed + 1)
    demo = getattr(task, "demonstration", None)
    comps = ["".join(demo(p, rng) if demo else task.solution(p)) for p in problems]
    keep = [i for i, c in enumerate(comps) if c]
    if not keep:
        raise LmlabError("no demonstrations: the problems have no solutions to imitate")
    return [problems[i].prompt for i in keep], [comps[i] for i in keep]


def main(cfg: SFTConfig) -> Path:
    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    task = build_task(cfg.task, cfg.difficulty, cfg.problems, q_sys=cfg.q_sys, q_rand=cfg.q_rand,
                      behaviours=cfg.behaviours)
    model, tok = load_lm(cfg.model, dev, cfg.trust_remote_code)
    train, test = split_problems(task, cfg.n_demos, cfg.n_test, cfg.seed)
    prompts, comps = demonstrations(task, train, cfg.seed)
    with start_run(cfg, "reason-sft", device=dev, dtype=dtype, threads=threads) as run:
        losses = sft(model, tok, prompts, comps, cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup, seed=cfg.seed,
                     log_fn=run.log)
        save_lm(model, tok, run.path / "policy")
        policy = LMPolicy(model, tok)
        ev = evaluate_policy(policy, task, test, cfg.pass_k)
        log.info("greedy %.3f  sample %.3f  pass@%d %.3f", ev["greedy"], ev["sample"], cfg.pass_k,
                 ev[f"pass@{cfg.pass_k}"])
        greedy = rollout(policy, task, test[:20], [[] for _ in test[:20]], 1, 0.0)
        run.write_samples([{"prompt": p.prompt, "completion": "".join(s[0]), "answer": p.answer,
                            "correct": task.check(p, s[0])} for p, s in zip(test[:20], greedy)])
        line_plot(run.plots / "sft_loss.png", list(range(len(losses))), {"loss": losses}, title="SFT loss",
                  xlabel="step", ylabel="completion CE")
        run.finish({"policy": str(run.path / "policy"), "n_demos": len(prompts), "final_loss": losses[-1],
                    "eval": ev, "n_test": len(test)})
    return run.path


class ScriptedPolicy:
    """The noisy column-addition teacher as an exact policy (no network): used by tests and as a closed-form
    reference. It continues a text ``Q{a}+{b}:<steps>`` step by step; at a column with written carry-in 1 it
    forgets the carry with probability ``q_sys``, and replaces a step by a uniform random one with ``q_rand``.
    One character = one token. Its success probability from a correct prefix at depth k is, exactly::

        V(s_k) = prod_{j >= k} [(1 - q_rand)(1 - q_sys c_j) + q_rand * 2/40]     (c_j = true carry-in of column j)
    """

    def __init__(self, digits: int, q_sys: float = 0.6, q_rand: float = 0.03, seed: int = 0):
        self.digits, self.q_sys, self.q_rand = digits, q_sys, q_rand
        self.rng = random.Random(seed)
        self.tokens_generated = self.tokens_computed = self.calls = 0

    def reset_counters(self) -> None:
        self.tokens_generated = self.tokens_computed = self.calls = 0

    def _step(self, a: int, b: int, k: int, carry: int, greedy: bool) -> str:
        ak, bk = a // 10**k % 10, b // 10**k % 10
        forget = carry == 1 and (self.q_sys > 0.5 if greedy else self.rng.random() < self.q_sys)
        i = 0 if forget else carry
        o, s = divmod(ak + bk + i, 10)
        if not greedy and self.rng.random() < self.q_rand:
            return f"{self.rng.randint(0, 1)}{self.rng.randint(0, 1)}{self.rng.randint(0, 9)}|"
        return f"{i}{o}{s}|"

    def expand(self, prefixes: list[str], n: int = 1, stop: str | None = "|", max_new_tokens: int = 8,
               temperature: float = 1.0, until: list[Callable[[str], bool] | None] | None = None
               ) -> list[list[Expansion]]:
        import re

        from lmlab.reason.tasks import effective_steps, split_steps

        until = until or [None] * len(prefixes)
        out = []
        for pre, u in zip(prefixes, until):
            m = re.fullmatch(r"Q(\d+)\+(\d+):(.*)", pre, flags=re.S)
            if not m:
                raise LmlabError(f"ScriptedPolicy cannot continue {pre[:30]!r}")
            a, b = int(m[1]), int(m[2])
            steps = effective_steps(split_steps(m[3], "|"))
            row = []
            for _ in range(n):
                text, k = "", len(steps)
                carry = int(steps[-1][1]) if steps else 0
                while k < self.digits and len(text) < max_new_tokens:
                    st = self._step(a, b, k, carry, temperature <= 0)
                    text += st
                    carry, k = int(st[1]), k + 1
                    if u is None or u(text):
                        break
                text = text[:max_new_tokens]
                fin = text.endswith("|") and (u is None or u(text))
                row.append(Expansion(text, len(text), fin, 0.0))
                self.tokens_generated += len(text)
                self.tokens_computed += len(text)
            out.append(row)
        self.calls += 1
        return out

    def value(self, a: int, b: int, depth: int) -> float:
        """Closed-form success probability from a correct prefix with ``depth`` steps (see class doc)."""
        carries = [s[0] == "1" for s in _true_steps(a, b, self.digits)]
        p = 1.0
        for j in range(depth, self.digits):
            p *= (1 - self.q_rand) * (1 - self.q_sys * carries[j]) + self.q_rand * 2 / 40
        return p


def _true_steps(a: int, b: int, digits: int) -> list[str]:
    from lmlab.reason.tasks import _add_steps

    return _add_steps(a, b, digits)
