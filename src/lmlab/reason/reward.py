"""Reward design (o1 roadmap, component 2): outcome vs process rewards, Math-Shepherd MC labels, ORM/PRM,
Bradley-Terry preference RMs and potential-based shaping, all behind one scorer interface.

Roadmap (Zeng et al., arXiv 2412.14135), section "Reward Design":

* **Outcome reward** r(x, y) = 1[answer(y) = answer*] from an exact verifier (:class:`OutcomeScorer`).
* **Process reward** per step. A PRM reads a scalar at every step separator (Lightman et al. 2023,
  arXiv 2305.20050); here the RM is the policy backbone (initialized from the policy) + a linear head,
  sigmoid, trained with BCE on per-step targets::

      L = - sum_k m_k [ y_k log sigma(h_k) + (1 - y_k) log(1 - sigma(h_k)) ] / sum_k m_k

  An **ORM** is the same model trained on the outcome label at the last step only (m_k = 1[k = last]).
* **Math-Shepherd labels** (Wang et al., arXiv 2312.08935): from each step prefix s_{1:k} sample K completions
  with the policy; soft label y_k = (1/K) sum_j 1[completion j correct], hard label y_k = 1[any correct].
  With K -> infinity the soft label is the policy's success probability from that prefix (its value V(s_k)).
* **Preference RM** (Bradley-Terry): L = -log sigma(r(y+) - r(y-)) on the last-step score of solution pairs.
* **Potential-based shaping** (Ng, Harada, Russell 1999): r'_t = r_t + gamma Phi(s_{t+1}) - Phi(s_t), with
  Phi = PRM/value and Phi(terminal) = 0. The discounted shaped return is R - Phi(s_0), so it leaves the optimal
  policy (argmax over trajectories) unchanged.
* **Step-score aggregation** for solution-level selection: ``AGGREGATORS`` = last | min | prod | mean.

The scorer interface (used by search.py and the learning issue)::

    scorer.score(problems, step_lists) -> list (per solution) of list (per step) of float in [0, 1]
    scorer.calls                        # sequences scored so far (RM calls)

Defaults (spec section 3): 2k policy solutions, K = 8, 300 steps, batch 256, AdamW lr 2e-3. A PRM re-tokenizes
the text with its own tokenizer, so a PRM whose tokenizer differs from the policy's just works.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

AGGREGATORS: dict[str, Callable[[list[float]], float]] = {
    "last": lambda s: float(s[-1]) if s else 0.0,
    "min": lambda s: float(min(s)) if s else 0.0,
    "prod": lambda s: float(np.prod(s)) if s else 0.0,
    "mean": lambda s: float(np.mean(s)) if s else 0.0,
}
"""Step-score -> solution-score aggregation (search-and-learn ``agg_strategy``)."""


def aggregate(scores: list[float], how: str = "last") -> float:
    if how not in AGGREGATORS:
        raise LmlabError(f"unknown aggregation {how!r}; choose from {sorted(AGGREGATORS)}")
    return AGGREGATORS[how](scores)


# --------------------------------------------------------------------------------------------------------------
# shaping (pure functions)


def potential_shaping(rewards: torch.Tensor, potentials: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """r'_t = r_t + gamma * Phi(s_{t+1}) - Phi(s_t).  rewards (..., T); potentials (..., T + 1) for s_0..s_T.

    Pass Phi(s_T) = 0 for terminal states (the invariance needs it)."""
    if potentials.shape[-1] != rewards.shape[-1] + 1:
        raise LmlabError("potentials need one more entry than rewards (states s_0..s_T)")
    return rewards + gamma * potentials[..., 1:] - potentials[..., :-1]


def discounted_return(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """sum_t gamma^t r_t over the last dim. rewards (..., T) -> (...)."""
    T = rewards.shape[-1]
    return (rewards * gamma ** torch.arange(T, dtype=rewards.dtype)).sum(-1)


def prm_shaped_rewards(outcome: float, step_scores: list[float], gamma: float = 1.0) -> list[float]:
    """Dense step rewards for RL: sparse outcome at the last step + potential shaping with Phi = PRM score
    (Phi(s_0) = 0.5 uninformed prior, Phi(terminal) = 0)."""
    T = len(step_scores)
    r = torch.zeros(T)
    r[-1] = outcome
    phi = torch.tensor([0.5] + list(step_scores[:-1]) + [0.0])
    return potential_shaping(r, phi, gamma).tolist()


# --------------------------------------------------------------------------------------------------------------
# scorers


class OutcomeScorer:
    """The verifier as a scorer: every step of a terminal solution gets its outcome (0/1); unfinished -> 0."""

    def __init__(self, task: Any):
        self.task, self.calls = task, 0

    def score(self, problems: list, step_lists: list[list[str]]) -> list[list[float]]:
        self.calls += len(step_lists)
        return [[float(self.task.check(p, s))] * len(s) for p, s in zip(problems, step_lists)]


class GoldScorer:
    """Oracle PRM from the task's exact first-error step labels (column_add, countdown)."""

    def __init__(self, task: Any):
        if not hasattr(task, "step_labels") or task.step_labels(task.sample(1, random.Random(0))[0], []) is None:
            raise LmlabError(f"task {getattr(task, 'name', task)!r} has no gold step labels")
        self.task, self.calls = task, 0

    def score(self, problems: list, step_lists: list[list[str]]) -> list[list[float]]:
        self.calls += len(step_lists)
        out = []
        for p, s in zip(problems, step_lists):
            lab = [float(x) for x in self.task.step_labels(p, s)]
            if s and self.task.is_terminal(p, s):  # a complete solution is judged by its outcome too
                lab[-1] = float(lab[-1] and self.task.check(p, s))
            out.append(lab)
        return out


class RewardModel(torch.nn.Module):
    """Causal-LM backbone + scalar head read at every step separator (the PRM/ORM/BT model)."""

    def __init__(self, backbone: torch.nn.Module, d_model: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(d_model, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, lm: torch.nn.Module) -> RewardModel:
        """Initialize from a policy: copy of its base model (the LM without its LM head)."""
        base = copy.deepcopy(lm.base_model)
        d = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        return cls(base, d).to(next(lm.parameters()).device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> logits of the step reward at every position (B, T)."""
        h = self.backbone(input_ids=ids).last_hidden_state  # (B, T, d)
        return self.head(h.float())[..., 0]


def encode_steps(tok: Any, prompt: str, steps: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + steps (each piece tokenized on its own) and the index of each step's last token."""
    ids = tok.encode(prompt)
    ends = []
    for s in steps:
        ids = ids + tok.encode(s)
        ends.append(len(ids) - 1)
    return ids, ends


def _batch(tok: Any, rows: list[tuple[list[int], list[int]]], device: Any) -> tuple[torch.Tensor, list[list[int]]]:
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    for i, (x, _) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
    return ids.to(device), [r[1] for r in rows]


class RMScorer:
    """A trained RM as a scorer: sigmoid of the head at each step's last token (text is re-tokenized)."""

    def __init__(self, rm: RewardModel, tok: Any, batch_size: int = 512):
        self.rm, self.tok, self.batch_size, self.calls = rm.eval(), tok, batch_size, 0
        self.device = next(rm.parameters()).device

    @torch.no_grad()
    def score(self, problems: list, step_lists: list[list[str]]) -> list[list[float]]:
        self.calls += len(step_lists)
        out: list[list[float]] = [[] for _ in step_lists]
        order = sorted(range(len(step_lists)), key=lambda i: len(step_lists[i]))
        for c in range(0, len(order), self.batch_size):
            idx = order[c: c + self.batch_size]
            rows = [encode_steps(self.tok, problems[i].prompt, step_lists[i]) for i in idx]
            rows_ne = [r if r[1] else (r[0], []) for r in rows]
            ids, ends = _batch(self.tok, rows_ne, self.device)
            prob = torch.sigmoid(self.rm(ids))  # (B, T)
            for j, i in enumerate(idx):
                out[i] = prob[j, ends[j]].tolist() if ends[j] else []
        return out


def save_rm(rm: RewardModel, tok: Any, folder: str | Path, meta: dict[str, Any]) -> Path:
    from lmlab.core.runs import save_tensors, write_json

    folder = Path(folder)
    rm.backbone.save_pretrained(folder / "backbone", safe_serialization=True)
    tok.save(folder / "backbone")
    save_tensors(folder / "head.safetensors", {k: v.detach().cpu() for k, v in rm.head.state_dict().items()})
    write_json(folder / "rm.json", {"d_model": rm.head.in_features, **meta})
    return folder


def load_rm(folder: str | Path, device: Any = "cpu") -> tuple[RewardModel, Any]:
    from transformers import AutoModel

    from lmlab.core.runs import load_tensors
    from lmlab.reason.policy import TOKENIZER_FILE, CharTokenizer, HFTokenizer

    folder = Path(folder)
    if not (folder / "rm.json").is_file():
        raise LmlabError(f"{folder} is not a reward model saved by 'lmlab reason rm' (no rm.json)")
    meta = json.loads((folder / "rm.json").read_text())
    backbone = AutoModel.from_pretrained(folder / "backbone")
    rm = RewardModel(backbone, meta["d_model"])
    rm.head.load_state_dict(load_tensors(folder / "head.safetensors"))
    if (folder / "backbone" / TOKENIZER_FILE).is_file():
        tok = CharTokenizer(json.loads((folder / "backbone" / TOKENIZER_FILE).read_text())["chars"])
    else:
        from transformers import AutoTokenizer

        tok = HFTokenizer(AutoTokenizer.from_pretrained(folder / "backbone"))
    return rm.to(device).eval(), tok


SCORERS = {"outcome": OutcomeScorer, "gold": GoldScorer}
"""Built-in scorers; anything else is a folder written by ``lmlab reason rm``."""


def load_scorer(spec: str, task: Any, device: Any = "cpu") -> Any:
    if spec in SCORERS:
        return SCORERS[spec](task)
    rm, tok = load_rm(spec, device)
    return RMScorer(rm, tok)


# --------------------------------------------------------------------------------------------------------------
# Math-Shepherd Monte-Carlo labels


def mc_labels(policy: Any, task: Any, problems: list, step_lists: list[list[str]], k: int = 8,
              temperature: float = 1.0) -> list[list[float]]:
    """Soft Math-Shepherd labels: for every step prefix s_{1:j}, the fraction of ``k`` policy completions that
    reach the correct answer (the last step of a terminal solution is labelled by its own outcome).
    Hard labels are ``[float(x > 0) for x in soft]``."""
    from lmlab.reason.policy import rollout

    if k < 1:
        raise LmlabError(f"MC labelling needs k >= 1 rollouts, got {k}")
    jobs = [(i, j) for i, st in enumerate(step_lists) for j in range(1, len(st) + 1)
            if not task.is_terminal(problems[i], st[:j])]
    soft = [[float(task.check(problems[i], st))] * len(st) for i, st in enumerate(step_lists)]
    if jobs:
        comps = rollout(policy, task, [problems[i] for i, _ in jobs], [step_lists[i][:j] for i, j in jobs], k,
                        temperature)
        for (i, j), row in zip(jobs, comps):
            pre = step_lists[i][:j]
            soft[i][j - 1] = sum(task.check(problems[i], pre + c) for c in row) / k
    return soft


# --------------------------------------------------------------------------------------------------------------
# training


def train_rm(rm: RewardModel, tok: Any, problems: list, step_lists: list[list[str]], targets: list[list[float]],
             masks: list[list[float]] | None = None, steps: int = 300, batch_size: int = 256, lr: float = 2e-3,
             seed: int = 0, log_fn: Callable[[dict], None] | None = None, progress: bool = True) -> list[float]:
    """Per-step BCE on (soft) targets at each step's separator token, weighted by ``masks`` (ORM: last step)."""
    from tqdm.auto import tqdm

    rows = [encode_steps(tok, p.prompt, s) for p, s in zip(problems, step_lists)]
    keep = [i for i, r in enumerate(rows) if r[1]]
    if not keep:
        raise LmlabError("no labelled steps to train the reward model on")
    dev = next(rm.parameters()).device
    ids, ends = _batch(tok, [rows[i] for i in keep], dev)
    tgt = torch.zeros(ids.shape)
    msk = torch.zeros(ids.shape)
    for r, i in enumerate(keep):
        m = masks[i] if masks else [1.0] * len(ends[r])
        for e, y, w in zip(ends[r], targets[i], m):
            tgt[r, e], msk[r, e] = y, w
    tgt, msk = tgt.to(dev), msk.to(dev)
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    rm.train()
    losses = []
    for step in tqdm(range(steps), desc="rm", disable=not progress, leave=False):
        b = torch.randint(0, ids.shape[0], (min(batch_size, ids.shape[0]),), generator=g).to(dev)
        logit = rm(ids[b])
        loss = (F.binary_cross_entropy_with_logits(logit, tgt[b], reduction="none") * msk[b]).sum() / msk[b].sum(
        ).clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_fn and (step % 50 == 0 or step == steps - 1):
            log_fn({"step": step, "rm_loss": losses[-1]})
    rm.eval()
    return losses


def train_pairwise(rm: RewardModel, tok: Any, problems: list, chosen: list[list[str]], rejected: list[list[str]],
                   steps: int = 300, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                   progress: bool = True) -> list[float]:
    """Bradley-Terry: L = -log sigma(r(x, y+) - r(x, y-)), r = head logit at the last step's separator."""
    from tqdm.auto import tqdm

    if not chosen or len(chosen) != len(rejected):
        raise LmlabError("pairwise RM needs the same (non-zero) number of chosen and rejected solutions")
    dev = next(rm.parameters()).device
    rc = [encode_steps(tok, p.prompt, s) for p, s in zip(problems, chosen)]
    rr = [encode_steps(tok, p.prompt, s) for p, s in zip(problems, rejected)]
    ids_c, ends_c = _batch(tok, rc, dev)
    ids_r, ends_r = _batch(tok, rr, dev)
    last_c = torch.tensor([e[-1] for e in ends_c], device=dev)
    last_r = torch.tensor([e[-1] for e in ends_r], device=dev)
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    rm.train()
    losses = []
    for _ in tqdm(range(steps), desc="bt-rm", disable=not progress, leave=False):
        b = torch.randint(0, ids_c.shape[0], (min(batch_size, ids_c.shape[0]),), generator=g).to(dev)
        sc = rm(ids_c[b]).gather(1, last_c[b][:, None])[:, 0]  # (B,)
        sr = rm(ids_r[b]).gather(1, last_r[b][:, None])[:, 0]
        loss = -F.logsigmoid(sc - sr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    rm.eval()
    return losses


# --------------------------------------------------------------------------------------------------------------
# evaluation against gold labels


def auc(scores: list[float], labels: list[int]) -> float:
    """ROC AUC (Mann-Whitney U / (n+ n-)), ties counted half."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, float), np.asarray(labels, int)
    npos, nneg = int(y.sum()), int((1 - y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y == 1].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def prm_quality(scorer: Any, task: Any, problems: list, step_lists: list[list[str]], threshold: float = 0.5
                ) -> dict[str, Any]:
    """Step accuracy at ``threshold`` and AUC against gold first-error labels, overall and per step index."""
    scores = scorer.score(problems, step_lists)
    s_all, y_all = [], []
    per: dict[int, tuple[list, list]] = {}
    for p, st, sc in zip(problems, step_lists, scores):
        lab = task.step_labels(p, st)
        for j, (x, y) in enumerate(zip(sc, lab)):
            s_all.append(x)
            y_all.append(y)
            per.setdefault(j, ([], []))[0].append(x)
            per[j][1].append(y)
    acc = float(np.mean([(x >= threshold) == bool(y) for x, y in zip(s_all, y_all)]))
    return {"step_accuracy": acc, "auc": auc(s_all, y_all),
            "auc_per_step": [auc(*per[j]) for j in sorted(per)], "n_steps": len(s_all)}


# --------------------------------------------------------------------------------------------------------------
# lmlab reason rm

LABELS = ("gold", "mc_hard", "mc_soft", "orm", "pairwise")


@dataclass
class RMConfig(RunArgs):
    """Train a reward model (PRM / ORM / Bradley-Terry) on policy rollouts labelled by the verifier."""

    policy: str = ""
    """Policy folder from 'lmlab reason sft' (or any HF causal LM); the RM backbone is initialized from it."""
    label: str = "mc_hard"
    """Labels: gold (first-error, oracle) | mc_hard | mc_soft (Math-Shepherd, K rollouts) | orm | pairwise."""
    task: str = "column_add"
    """Task: column_add | countdown | jsonl."""
    difficulty: int = 6
    """Digits (column_add) or numbers (countdown)."""
    problems: str = ""
    """JSONL problems (task=jsonl)."""
    n_solutions: int = 2000
    """Policy solutions to label (one per training problem)."""
    k: int = 8
    """Math-Shepherd rollouts per step prefix."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 256
    """Solutions per optimizer step."""
    lr: float = 2e-3
    """AdamW learning rate (cosine decay)."""
    n_test: int = 300
    """Held-out problems for step accuracy / AUC against gold labels."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label not in LABELS:
            raise ConfigError(f"label must be one of {LABELS}, got {self.label!r}")
        if self.n_solutions < 2 or self.k < 1 or self.steps < 1 or self.n_test < 1:
            raise ConfigError("need n_solutions >= 2, k >= 1, steps >= 1, n_test >= 1")


def label_solutions(label: str, policy: Any, task: Any, problems: list, sols: list[list[str]], k: int
                    ) -> tuple[list[list[float]], list[list[float]] | None]:
    """Targets and masks for ``label`` (gold, mc_hard, mc_soft, orm)."""
    if label == "gold":
        return [[float(x) for x in task.step_labels(p, s)] for p, s in zip(problems, sols)], None
    if label == "orm":
        out = [[float(task.check(p, s))] * len(s) for p, s in zip(problems, sols)]
        return out, [[0.0] * (len(s) - 1) + [1.0] for s in sols]
    soft = mc_labels(policy, task, problems, sols, k)
    return (soft if label == "mc_soft" else [[float(x > 0) for x in r] for r in soft]), None


def main(cfg: RMConfig) -> Path:
    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.reason.policy import LMPolicy, build_task, load_lm, rollout, split_problems

    if not cfg.policy:
        raise ConfigError("give a policy: a folder from 'lmlab reason sft' or a model spec")
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    task = build_task(cfg.task, cfg.difficulty, cfg.problems)
    if cfg.label == "gold" and task.step_labels(task.sample(1, random.Random(0))[0], []) is None:
        raise ConfigError(f"label=gold needs a task with gold step labels; {cfg.task} has none")
    model, tok = load_lm(cfg.policy, dev, cfg.trust_remote_code)
    train, test = split_problems(task, cfg.n_solutions, cfg.n_test, cfg.seed)
    with start_run(cfg, "reason-rm", device=dev, dtype=dtype, threads=threads) as run:
        policy = LMPolicy(model, tok)
        sols = [r[0] for r in rollout(policy, task, train, [[] for _ in train], 1)]
        rm = RewardModel.from_policy(model)
        if cfg.label == "pairwise":
            two = rollout(policy, task, train, [[] for _ in train], 2)
            pairs = [(p, a, b) for p, (a, b) in zip(train, two) if task.check(p, a) != task.check(p, b)]
            if not pairs:
                raise LmlabError("no (correct, incorrect) solution pairs to train a preference RM on")
            ch = [a if task.check(p, a) else b for p, a, b in pairs]
            rj = [b if task.check(p, a) else a for p, a, b in pairs]
            losses = train_pairwise(rm, tok, [p for p, _, _ in pairs], ch, rj, cfg.steps, cfg.batch_size, cfg.lr,
                                    cfg.seed)
        else:
            targets, masks = label_solutions(cfg.label, policy, task, train, sols, cfg.k)
            losses = train_rm(rm, tok, train, sols, targets, masks, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed,
                              log_fn=run.log)
        save_rm(rm, tok, run.path / "rm", {"label": cfg.label, "task": cfg.task, "step_sep": task.step_sep})
        res: dict[str, Any] = {"rm": str(run.path / "rm"), "label": cfg.label, "final_loss": losses[-1],
                               "policy_tokens": policy.tokens_generated}
        if task.step_labels(test[0], []) is not None:
            test_sols = [r[0] for r in rollout(policy, task, test, [[] for _ in test], 1)]
            res["quality"] = prm_quality(RMScorer(rm, tok), task, test, test_sols)
            log.info("step accuracy %.3f, AUC %.3f", res["quality"]["step_accuracy"], res["quality"]["auc"])
        line_plot(run.plots / "rm_loss.png", list(range(len(losses))), {"loss": losses}, title="reward model loss",
                  xlabel="step", ylabel="loss")
        run.finish(res)
    return run.path
