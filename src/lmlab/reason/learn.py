"""Learning from search (o1 roadmap, component 4): expert iteration, GRPO / RLOO / PPO, DPO / step-DPO, the loop.

Roadmap (Zeng et al., arXiv 2412.14135), section "Learning": the data produced by search is turned into policy
gains either by **behaviour cloning** on the selected solutions (expert iteration: STaR 2203.14465, ReST-EM
2312.06585, RFT 2308.01825 -- "BC = policy gradient with a filtered 0/1 reward") or by **policy gradient**
(PPO 1707.06347, GRPO 2402.03300, RLOO 2402.14740) or **DPO** (2305.18290) on preference pairs mined from search.

**Expert iteration** (round r)::

    D_r = { (x, y) : y ~ search(pi_{r-1}, x),  verify(x, y) = 1 }      (or the search pick, with no checker)
    pi_r = SFT(pi_{r-1}, D_r)                                          (completion-only CE, reason/policy.sft)

**GRPO** (DeepSeekMath 2402.03300, eq. 3; G completions o_1..o_G per prompt q, rewards r_i)::

    A_i = (r_i - mean(r)) / (std(r) + eps)                     (scale_rewards="group"; "none" = Dr.GRPO: r_i - mean)
    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | ...)
    L = - 1/G sum_i 1/|o_i| sum_t [ min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) - beta * KL_t ]     (loss_type="grpo")
    L_dapo = - 1/sum_i |o_i| sum_i sum_t [ ... ]                                               (token-level, DAPO)
    KL_t = exp(ref - logp) - (ref - logp) - 1                  (k3 estimator of KL(pi_theta || pi_ref) >= 0)

Defaults: G = 8, eps = 0.2, beta = 0 (TRL's current default; 0.04 in the paper), lr 1e-4 for the tiny GPT
(3e-4, the spec's value, collapsed in 2 of 3 measured seeds).

**RLOO** (Ahmadian et al. 2402.14740): A_i = r_i - 1/(G-1) sum_{j != i} r_j, same clipped loss.

**DPO** (Rafailov et al. 2305.18290, eq. 7), beta = 0.1::

    L = - log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

**PPO** (Schulman et al. 1707.06347; RLHF form of InstructGPT 2203.02155 and the roadmap's "PPO with a critic"),
per-token reward with the KL penalty inside it, a value model V (copy of the policy backbone + scalar head) and GAE
(1506.02438)::

    r_t = -kl_coef * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t)) + 1[t = T] * R(x, y) (+ process reward at step ends)
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),  A_t = sum_l (gamma lam)^l delta_{t+l},  R_t = A_t + V(s_t)
    L = -mean_t min(rho_t A_t, clip(rho_t, 1 +- eps) A_t) + vf_coef * 0.5 mean_t max((V - R)^2, (V_clip - R)^2)

Defaults (TRL PPOConfig): kl_coef 0.05, gamma 1, lam 0.95, eps 0.2, value clip 0.2, vf_coef 0.1, 4 PPO epochs per
rollout batch, whitened advantages; lr 1e-4 for the tiny GPT.

**Process rewards inside RL** (Ng et al. 1999 potential shaping, Phi = the PRM): GRPO gets step-level advantages
``A_{i,t} = A_i + alpha * (Phi(s_k) - Phi(s_{k-1}))`` on the tokens of step k (``grpo.process_alpha``); PPO gets a
dense reward ``alpha * (gamma Phi(s_{k+1}) - Phi(s_k))`` at each step's last token (``ppo.process_alpha``).
``process_mode=raw`` uses ``alpha * Phi(s_k)`` instead (not potential-based: it changes the optimum, so it can be
hacked; the testbed's gold labels measure that).

**Step-level DPO** (Step-DPO, Lai et al. 2406.18629): the same DPO loss on pairs of *next steps* at a shared prefix
of the sample / search tree (chosen = the higher-Q step, Q = mean outcome below it or its PRM score), the prefix
appended to the prompt.

**PRM self-evolution** (ReST-MCTS* 2406.03816, rStar-Math 2501.04519): with ``--retrain-prm`` each round also
continues training the PRM on the round's solutions with Monte-Carlo soft labels from the current policy and logs
its step accuracy / AUC against gold labels.

**Data formats** written per round (the TRL dataset formats, JSONL):

* stepwise supervision ``{"prompt", "completions": [step, ...], "labels": [bool, ...]}`` (labels: gold first-error
  labels when the task has them, else the outcome on every step);
* preference ``{"prompt", "chosen", "rejected"}`` (chosen = a verified-correct sample, rejected = an incorrect one
  for the same prompt).

**The loop** (``lmlab reason rl --algo expert-iter|grpo|rloo|ppo|dpo|step-dpo --rounds R``): round r samples /
searches with the current policy, writes ``rounds/rNN/{stepwise,preference}.jsonl``, updates the policy, saves
``rounds/rNN/policy`` (and ``rounds/rNN/prm`` with --retrain-prm) and evaluates greedy and sampled accuracy on
held-out problems; ``rounds/rNN/done.json`` is written last, so an interrupted round is redone from the previous
checkpoint (rerun with the same ``--out``) without duplicated data.

TRL is not used: it is not installed in the project environment, and rollouts here go through lmlab's batched
KV-cached ``policy.expand`` (the same sampler search uses); the trainers are ~150 lines of torch.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# the maths (pure functions)


def grpo_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages. rewards (P, G) -> (P, G). scale: group (divide by the group std) | none."""
    mean = rewards.mean(-1, keepdim=True)  # (P, 1)
    if scale == "none":
        return rewards - mean
    if scale != "group":
        raise LmlabError(f"scale must be group|none, got {scale!r}")
    return (rewards - mean) / (rewards.std(-1, keepdim=True) + eps)  # unbiased std, as in TRL


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline. rewards (P, G), G >= 2 -> (P, G): r_i - mean_{j != i} r_j."""
    G = rewards.shape[-1]
    if G < 2:
        raise LmlabError("RLOO needs a group of at least 2 samples")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (G - 1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) (Schulman): exp(d) - d - 1 with d = ref - logp. Shapes (B, T)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_pg_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
                    loss_type: str = "grpo") -> torch.Tensor:
    """GRPO / PPO-clip surrogate. logp, old_logp, mask (B, T) per completion token; adv (B,) per sequence
    (or (B, T) per token, e.g. process rewards). loss_type: grpo (mean over each sequence, then over the batch)
    | dapo (mean over all tokens of the batch)."""
    a = adv[:, None] if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    per_tok = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # (B, T)
    if beta:
        if ref_logp is None:
            raise LmlabError("beta > 0 needs reference log-probs")
        per_tok = per_tok + beta * kl_k3(logp, ref_logp)
    mask = mask.to(per_tok.dtype)
    if loss_type == "grpo":
        return ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return (per_tok * mask).sum() / mask.sum().clamp(min=1)
    raise LmlabError(f"loss_type must be grpo|dapo, got {loss_type!r}")


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO loss on summed sequence log-probs, all (B,) -> scalar."""
    logits = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (B,)
    return -F.logsigmoid(logits).mean()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 1506.02438) over completion tokens.

    rewards, values, mask (B, T); mask marks the completion tokens (prompt on the left and padding on the right
    are 0). V after the last completion token is 0 (the episode ends)::

        delta_t = r_t + gamma V_{t+1} - V_t ;   A_t = delta_t + gamma lam A_{t+1} ;   R_t = A_t + V_t

    Returns (advantages, returns), both (B, T) and 0 off the mask."""
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)  # (B, T)
    last = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    next_v = torch.zeros_like(rewards[:, 0])  # (B,) V_{t+1}
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
        next_v = values[:, t] * m[:, t]
    return adv, (adv + values) * m


def ppo_token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float = 0.05, dense: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token reward of RLHF-PPO (InstructGPT 2203.02155 eq. 2; TRL PPOTrainer)::

        r_t = - kl_coef * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t))  +  1[t = last] * score  (+ dense_t)

    score (B,) the sequence reward; logp, ref_logp, mask (B, T); dense (B, T) optional per-token (process)
    rewards, already placed at the step-end tokens. -> (B, T), 0 off the mask."""
    m = mask.to(logp.dtype)
    r = -kl_coef * (logp - ref_logp) * m  # (B, T)
    idx = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = (idx * m).argmax(-1)  # (B,) index of the last completion token
    r[torch.arange(m.shape[0]), last] += score.to(r.dtype)
    if dense is not None:
        r = r + dense * m
    return r


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO advantage normalisation). x, mask (B, T)."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """Clipped value loss (PPO2 / TRL): 0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2)."""
    vc = old_values + (values - old_values).clamp(-clip, clip)
    per = 0.5 * torch.max((values - returns) ** 2, (vc - returns) ** 2)  # (B, T)
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp(min=1)


def step_potential_terms(step_scores: list[float], mode: str = "potential", phi0: float = 0.5) -> list[float]:
    """Per-step process term from PRM scores Phi(s_1..s_K) of one solution.

    potential: Phi(s_k) - Phi(s_{k-1}) with Phi(s_0) = phi0 (sums to Phi(s_K) - phi0: the PRM only re-distributes
    credit between steps; the issue's "outcome advantage + alpha * potential difference");
    raw: Phi(s_k) itself (non-potential shaping: the sum depends on the path, so the policy can chase PRM scores,
    i.e. reward hacking)."""
    if mode == "raw":
        return [float(x) for x in step_scores]
    if mode != "potential":
        raise LmlabError(f"process mode must be potential|raw, got {mode!r}")
    phi = [phi0] + [float(x) for x in step_scores]
    return [phi[k + 1] - phi[k] for k in range(len(step_scores))]


def place_step_values(tok: Any, mask: torch.Tensor, sols: list[list[str]], per_step: list[list[float]],
                      spread: bool) -> torch.Tensor:
    """Put per-step values on the token grid of ``token_logprobs``. mask (B, T) completion tokens; each row's
    completion is ``"".join(steps)``. spread=True: every token of step k gets value k (advantage terms);
    spread=False: only the step's last token (rewards, as the PRM reads the step separator). -> (B, T)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    starts = mask.float().argmax(-1).tolist()  # first completion token of each row
    n_tok = mask.sum(-1).tolist()
    for i, (steps, vals) in enumerate(zip(sols, per_step)):
        lo, s0 = 0, starts[i]
        for k, v in enumerate(vals[: len(steps)]):
            hi = min(len(tok.encode("".join(steps[: k + 1]))), int(n_tok[i]))  # tokens up to the end of step k
            if hi <= lo:
                continue
            if spread:
                out[i, s0 + lo: s0 + hi] = v
            else:
                out[i, s0 + hi - 1] = v
            lo = hi
    return out.to(mask.device)


def token_logprobs(model: Any, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each labelled next token. ids, labels (B, T) (-100 = not scored) -> logp, mask (B, T-1)."""
    logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
    tgt = labels[:, 1:]  # (B, T-1)
    mask = tgt != -100
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    return lp * mask, mask


# --------------------------------------------------------------------------------------------------------------
# rewards, rollouts and datasets


def safe_rewards(reward_fn: Callable[[Any, list[str]], float], problems: list, sols: list[list[str]]) -> list[float]:
    """Call ``reward_fn(problem, steps)`` on every sample; an exception is re-raised with the offending sample."""
    out = []
    for p, s in zip(problems, sols):
        try:
            out.append(float(reward_fn(p, s)))
        except Exception as e:  # noqa: BLE001 -- reported with the sample, not swallowed
            raise LmlabError(f"reward function failed on prompt {p.prompt!r} completion {''.join(s)!r}: "
                             f"{type(e).__name__}: {e}") from e
    return out


def outcome_reward(task: Any) -> Callable[[Any, list[str]], float]:
    """The 0/1 verifier reward."""
    return lambda p, s: float(task.check(p, s))


def sample_groups(policy: Any, task: Any, problems: list, g: int, temperature: float = 1.0) -> list[list[list[str]]]:
    """g complete solutions (lists of steps) per problem, batched through ``policy.expand``."""
    from lmlab.reason.search import SearchParams, sample_pool

    pool = sample_pool(problems, policy, task, g, temperature, SearchParams(n=g, temperature=temperature))
    return [[s for s, _ in row] for row in pool]


def stepwise_rows(task: Any, problems: list, groups: list[list[list[str]]]) -> list[dict[str, Any]]:
    """TRL stepwise-supervision rows: gold first-error labels where the task defines them, else the outcome."""
    rows = []
    for p, row in zip(problems, groups):
        for s in row:
            lab = task.step_labels(p, s) if hasattr(task, "step_labels") else None
            if lab is None:
                lab = [task.check(p, s)] * len(s)
            rows.append({"prompt": p.prompt, "completions": list(s), "labels": [bool(x) for x in lab]})
    return rows


def preference_rows(task: Any, problems: list, groups: list[list[list[str]]], per_prompt: int = 1
                    ) -> list[dict[str, str]]:
    """TRL preference rows: chosen = a verified-correct sample, rejected = an incorrect one, same prompt."""
    rows = []
    for p, row in zip(problems, groups):
        good = list(dict.fromkeys("".join(s) for s in row if task.check(p, s)))
        bad = list(dict.fromkeys("".join(s) for s in row if not task.check(p, s)))
        for c, r in list(zip(good, bad))[:per_prompt]:
            rows.append({"prompt": p.prompt, "chosen": c, "rejected": r})
    return rows


def step_preference_rows(task: Any, problems: list, groups: list[list[list[str]]], scorer: Any = None,
                         min_gap: float = 0.5, per_prompt: int = 2) -> list[dict[str, str]]:
    """Step-level preference pairs (Step-DPO, Lai et al. 2406.18629) mined from the tree that one problem's
    solutions span (the search tree when ``groups`` come from beam / DVTS / MCTS, whose solutions share prefixes).

    Q(child) = mean outcome of the solutions through the child (checker), or with ``scorer`` (no checker) the
    mean PRM score of the child step. At every prefix with >= 2 distinct next steps: chosen = the highest-Q step,
    rejected = the lowest-Q step, kept when Q(chosen) - Q(rejected) >= ``min_gap`` (and > 0); shallowest prefixes first,
    ``per_prompt`` pairs at most. Rows are TRL preference rows with the shared prefix appended to the prompt:
    ``{"prompt": prompt + prefix, "chosen": step, "rejected": step}``."""
    flat_p = [p for p, row in zip(problems, groups) for _ in row]
    flat_s = [s for row in groups for s in row]
    sc = scorer.score(flat_p, flat_s) if scorer is not None else None
    rows, i = [], 0
    for p, row in zip(problems, groups):
        tree: dict[tuple[str, ...], dict[str, list[float]]] = {}
        for s in row:
            ok = None if sc is not None else float(task.check(p, s))
            for k in range(len(s)):
                q = ok if sc is None else (float(sc[i][k]) if k < len(sc[i]) else 0.0)
                tree.setdefault(tuple(s[:k]), {}).setdefault(s[k], []).append(q)
            i += 1
        cands = []
        for pre, ch in tree.items():
            if len(ch) < 2:
                continue
            q = {step: sum(v) / len(v) for step, v in ch.items()}
            best, worst = max(q, key=q.__getitem__), min(q, key=q.__getitem__)
            if q[best] > q[worst] and q[best] - q[worst] >= min_gap:
                cands.append((len(pre), -(q[best] - q[worst]), "".join(pre), best, worst))
        for _, _, pre, best, worst in sorted(cands)[:per_prompt]:
            rows.append({"prompt": p.prompt + pre, "chosen": best, "rejected": worst})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    from lmlab.core.runs import atomic_write

    return atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------------
# trainers


def expert_iteration_data(task: Any, problems: list, groups: list[list[list[str]]], filter: str = "outcome",
                          picks: list[list[str]] | None = None) -> tuple[list[str], list[str]]:
    """(prompts, completions) to clone: unique verified-correct samples (``filter=outcome``, RFT) or the search
    pick of every problem with no checker (``filter=none``; ``picks`` from a scored search)."""
    prompts, comps = [], []
    for i, (p, row) in enumerate(zip(problems, groups)):
        if filter == "none":
            cand = [picks[i]] if picks is not None else row[:1]
        elif filter == "outcome":
            cand = [s for s in row if task.check(p, s)]
        else:
            raise LmlabError(f"filter must be outcome|none, got {filter!r}")
        for c in dict.fromkeys("".join(s) for s in cand):
            prompts.append(p.prompt)
            comps.append(c)
    return prompts, comps


@dataclass
class GRPOParams:
    """GRPO / RLOO knobs (TRL GRPOConfig names where they exist)."""

    num_generations: int = 8
    """Group size G."""
    prompts_per_step: int = 32
    """Prompts per optimizer step (batch = prompts_per_step * G completions)."""
    lr: float = 1e-4
    """AdamW learning rate (constant). Measured on the 6-digit testbed: 1e-4 -> greedy 0.87 after 60 steps;
    3e-4 and above often collapse in the first steps (Adam's early sign-like updates on a noisy gradient)."""
    beta: float = 0.0
    """KL coefficient to the reference (initial) policy; 0 disables the reference model."""
    epsilon: float = 0.2
    """Ratio clip range."""
    loss_type: str = "grpo"
    """grpo (per-sequence mean) | dapo (token-level mean)."""
    scale_rewards: str = "group"
    """group (divide by the group std) | none (Dr.GRPO)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    advantage: str = "grpo"
    """grpo | rloo (leave-one-out baseline)."""
    process_alpha: float = 0.0
    """Process rewards inside GRPO: per-token advantage A_i + alpha * term(step k) with the PRM (--scorer) as
    Phi; 0 = outcome-only (the paper)."""
    process_mode: str = "potential"
    """potential: Phi(s_k) - Phi(s_{k-1}) (Phi(s_0) = 0.5) | raw: Phi(s_k) (non-potential; can be hacked)."""
    ref_reset: int = 0
    """With beta > 0: copy the current policy into the KL reference every this many steps (0: never)."""

    def validate(self) -> None:
        if self.num_generations < 2 or self.prompts_per_step < 1 or self.lr <= 0:
            raise ConfigError("num_generations must be >= 2, prompts_per_step >= 1, lr > 0")
        if self.loss_type not in ("grpo", "dapo") or self.scale_rewards not in ("group", "none"):
            raise ConfigError("loss_type must be grpo|dapo and scale_rewards group|none")
        if self.advantage not in ("grpo", "rloo"):
            raise ConfigError(f"advantage must be grpo|rloo, got {self.advantage!r}")
        if self.beta < 0 or not 0 < self.epsilon < 1:
            raise ConfigError("beta must be >= 0 and epsilon in (0, 1)")
        if self.process_alpha < 0 or self.process_mode not in ("potential", "raw") or self.ref_reset < 0:
            raise ConfigError("process_alpha and ref_reset must be >= 0 and process_mode potential|raw")


class GRPOTrainer:
    """Online GRPO / RLOO on a causal LM with a (problem, steps) -> float reward; one step = sample G per prompt,
    score, normalise, one clipped gradient step (num_iterations = 1, so pi_old = the sampling policy)."""

    def __init__(self, model: Any, tok: Any, task: Any, reward_fn: Callable[[Any, list[str]], float],
                 params: GRPOParams | None = None, seed: int = 0, scorer: Any = None):
        import copy

        from lmlab.reason.policy import LMPolicy

        self.p = params or GRPOParams()
        self.p.validate()
        if self.p.process_alpha and scorer is None:
            raise LmlabError("process_alpha > 0 needs a scorer (a PRM) for the step potentials")
        self.model, self.tok, self.task, self.reward_fn, self.scorer = model, tok, task, reward_fn, scorer
        self.n_steps = 0
        self.policy = LMPolicy(model, tok)
        self.ref = copy.deepcopy(model).eval().requires_grad_(False) if self.p.beta else None
        self.opt = torch.optim.AdamW(model.parameters(), lr=self.p.lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.rng = random.Random(seed)

    def step(self, problems: list) -> dict[str, Any]:
        from lmlab.reason.policy import encode_pairs

        G = self.p.num_generations
        batch = self.rng.sample(problems, min(self.p.prompts_per_step, len(problems)))
        self.model.eval()
        groups = sample_groups(self.policy, self.task, batch, G, self.p.temperature)
        flat_p = [p for p in batch for _ in range(G)]
        flat_s = [s for row in groups for s in row]
        r = torch.tensor(safe_rewards(self.reward_fn, flat_p, flat_s)).view(len(batch), G)  # (P, G)
        adv = (rloo_advantages(r) if self.p.advantage == "rloo"
               else grpo_advantages(r, self.p.scale_rewards)).reshape(-1)  # (P*G,)
        dev = next(self.model.parameters()).device
        ids, labels = encode_pairs(self.tok, [p.prompt for p in flat_p], ["".join(s) for s in flat_s], dev)
        self.model.train()
        logp, mask = token_logprobs(self.model, ids, labels)  # (B, T-1)
        adv = adv.to(dev)
        proc = 0.0
        if self.p.process_alpha:  # step-level advantages: A_i + alpha * (Phi(s_k) - Phi(s_{k-1})) on step k's tokens
            terms = [step_potential_terms(x, self.p.process_mode) for x in self.scorer.score(flat_p, flat_s)]
            extra = place_step_values(self.tok, mask, flat_s, terms, spread=True)  # (B, T-1)
            adv = adv[:, None] + self.p.process_alpha * extra
            proc = float(sum(sum(t) for t in terms) / len(terms))
        self.n_steps += 1
        if self.ref is not None and self.p.ref_reset and self.n_steps % self.p.ref_reset == 0:
            self.ref.load_state_dict(self.model.state_dict())  # reference-policy reset
        ref_lp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_lp, _ = token_logprobs(self.ref, ids, labels)
        loss = clipped_pg_loss(logp, logp.detach(), adv, mask, self.p.epsilon, self.p.beta, ref_lp,
                               self.p.loss_type)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.model.eval()
        return {"loss": float(loss.detach()), "reward": float(r.mean()), "groups": groups, "problems": batch,
                "frac_zero_std": float((r.std(-1) == 0).float().mean()), "process_return": proc}


@dataclass
class PPOParams:
    """PPO knobs (TRL PPOConfig names and defaults where they exist)."""

    prompts_per_step: int = 32
    """Prompts per rollout batch."""
    samples_per_prompt: int = 8
    """Completions per prompt (PPO needs no groups; 32 x 8 matches GRPO's rollout cost per step)."""
    lr: float = 1e-4
    """AdamW learning rate of the policy and the value model (one optimizer, as TRL's PolicyAndValueWrapper)."""
    kl_coef: float = 0.05
    """Per-token KL penalty in the reward, -kl_coef * (log pi - log pi_ref) (TRL 0.05; InstructGPT 0.02)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    epsilon: float = 0.2
    """Policy ratio clip range (cliprange)."""
    cliprange_value: float = 0.2
    """Value clip range."""
    vf_coef: float = 0.1
    """Value-loss weight."""
    ppo_epochs: int = 4
    """Optimisation epochs over each rollout batch (num_ppo_epochs)."""
    minibatches: int = 1
    """Minibatches per epoch (num_mini_batches)."""
    whiten_advantages: bool = True
    """Normalise GAE advantages over the batch."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    process_alpha: float = 0.0
    """Dense process reward alpha * term at each step's last token (needs a scorer): potential =
    Phi(s_{k+1}) - Phi(s_k) with Phi(s_0) = 0.5 and Phi(terminal) = 0 (Ng et al. 1999, policy-invariant)."""
    process_mode: str = "potential"
    """potential | raw (alpha * PRM score of each step: not policy-invariant)."""

    def validate(self) -> None:
        if min(self.prompts_per_step, self.samples_per_prompt, self.ppo_epochs, self.minibatches) < 1:
            raise ConfigError("prompts_per_step, samples_per_prompt, ppo_epochs and minibatches must be >= 1")
        if self.lr <= 0 or self.kl_coef < 0 or not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ConfigError("lr must be > 0, kl_coef >= 0, lam in [0, 1] and gamma in (0, 1]")
        if not 0 < self.epsilon < 1 or self.cliprange_value <= 0 or self.vf_coef < 0:
            raise ConfigError("epsilon must be in (0, 1), cliprange_value > 0 and vf_coef >= 0")
        if self.process_alpha < 0 or self.process_mode not in ("potential", "raw"):
            raise ConfigError("process_alpha must be >= 0 and process_mode potential|raw")


class PPOTrainer:
    """RLHF-style PPO (Schulman et al. 1707.06347; Ouyang et al. 2203.02155) with a value model and GAE.

    One step: sample ``prompts_per_step x samples_per_prompt`` completions with pi_old = the current policy; score
    them (outcome reward, plus optional dense PRM rewards at step ends); per-token rewards with the KL penalty to
    the frozen reference; GAE on the value model's V(s_t); then ``ppo_epochs`` passes of the clipped surrogate
    (token-level mean) + ``vf_coef`` x clipped value loss. The value model is a copy of the policy's backbone with a
    zero-initialised scalar head (``reward.RewardModel.from_policy``; TRL initialises it from the reward model)."""

    def __init__(self, model: Any, tok: Any, task: Any, reward_fn: Callable[[Any, list[str]], float],
                 params: PPOParams | None = None, seed: int = 0, scorer: Any = None, critic: Any = None):
        import copy

        from lmlab.reason.policy import LMPolicy
        from lmlab.reason.reward import RewardModel

        self.p = params or PPOParams()
        self.p.validate()
        if self.p.process_alpha and scorer is None:
            raise LmlabError("process_alpha > 0 needs a scorer (a PRM) for the step rewards")
        self.model, self.tok, self.task, self.reward_fn, self.scorer = model, tok, task, reward_fn, scorer
        self.policy = LMPolicy(model, tok)
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.critic = critic if critic is not None else RewardModel.from_policy(model)
        params_all = list(model.parameters()) + list(self.critic.parameters())
        self.opt = torch.optim.AdamW(params_all, lr=self.p.lr, weight_decay=0.0, eps=1e-5)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def _dense(self, flat_p: list, flat_s: list[list[str]], mask: torch.Tensor) -> torch.Tensor | None:
        if not self.p.process_alpha:
            return None
        per = []
        for x in self.scorer.score(flat_p, flat_s):
            if self.p.process_mode == "raw":
                per.append([float(v) for v in x])
            else:  # gamma Phi(s_{k+1}) - Phi(s_k), Phi(s_0) = 0.5, Phi(terminal) = 0
                phi = [0.5] + [float(v) for v in x[:-1]] + [0.0]
                per.append([self.p.gamma * phi[k + 1] - phi[k] for k in range(len(x))])
        return self.p.process_alpha * place_step_values(self.tok, mask, flat_s, per, spread=False)

    def step(self, problems: list) -> dict[str, Any]:
        from lmlab.reason.policy import encode_pairs

        P, S = min(self.p.prompts_per_step, len(problems)), self.p.samples_per_prompt
        batch = self.rng.sample(problems, P)
        self.model.eval()
        groups = sample_groups(self.policy, self.task, batch, S, self.p.temperature)
        flat_p = [p for p in batch for _ in range(S)]
        flat_s = [s for row in groups for s in row]
        score = torch.tensor(safe_rewards(self.reward_fn, flat_p, flat_s))  # (B,)
        dev = next(self.model.parameters()).device
        ids, labels = encode_pairs(self.tok, [p.prompt for p in flat_p], ["".join(s) for s in flat_s], dev)
        with torch.no_grad():
            old_lp, mask = token_logprobs(self.model, ids, labels)  # (B, T-1)
            ref_lp, _ = token_logprobs(self.ref, ids, labels)
            old_v = self.critic(ids)[:, :-1] * mask  # (B, T-1): V(s_t), s_t = tokens up to t
            dense = self._dense(flat_p, flat_s, mask)
            rew = ppo_token_rewards(score.to(dev), old_lp, ref_lp, mask, self.p.kl_coef, dense)  # (B, T-1)
            adv, ret = gae(rew, old_v, mask, self.p.gamma, self.p.lam)
            if self.p.whiten_advantages:
                adv = masked_whiten(adv, mask)
        B = ids.shape[0]
        self.model.train()
        self.critic.train()
        pg_l, v_l = [], []
        for _ in range(self.p.ppo_epochs):
            for mb in torch.randperm(B, generator=self.gen).to(dev).chunk(self.p.minibatches):
                lp, _ = token_logprobs(self.model, ids[mb], labels[mb])
                v = self.critic(ids[mb])[:, :-1]
                pg = clipped_pg_loss(lp, old_lp[mb], adv[mb], mask[mb], self.p.epsilon, loss_type="dapo")
                vl = value_loss(v, old_v[mb], ret[mb], mask[mb], self.p.cliprange_value)
                loss = pg + self.p.vf_coef * vl
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.critic.parameters()), 1.0)
                self.opt.step()
                pg_l.append(float(pg.detach()))
                v_l.append(float(vl.detach()))
        self.model.eval()
        self.critic.eval()
        m = mask.float()
        kl = float(((old_lp - ref_lp) * m).sum() / m.sum())
        return {"loss": pg_l[-1], "value_loss": v_l[-1], "reward": float(score.mean()), "kl": kl,
                "groups": groups, "problems": batch}


def dpo_train(model: Any, tok: Any, rows: list[dict[str, str]], steps: int = 100, batch_size: int = 32,
              lr: float = 1e-3, beta: float = 0.1, seed: int = 0, progress: bool = True,
              nll_weight: float = 0.0) -> list[float]:
    """Offline DPO on preference rows; the reference is a frozen copy of ``model`` at the start.

    ``nll_weight`` > 0 adds the per-token NLL of the chosen completion (RPO, Pang et al. 2404.19733): not in the DPO
    paper; on the tiny testbed policy plain (step-)DPO pushes probability off the rejected tokens onto garbage
    characters and breaks the output format."""
    import copy

    from tqdm.auto import tqdm

    from lmlab.reason.policy import encode_pairs

    if not rows:
        raise LmlabError("DPO needs at least one preference pair (no prompt had both a correct and a wrong sample)")
    dev = next(model.parameters()).device
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    prompts = [r["prompt"] for r in rows]
    cw, lw = encode_pairs(tok, prompts, [r["chosen"] for r in rows], dev)
    cl, ll = encode_pairs(tok, prompts, [r["rejected"] for r in rows], dev)
    with torch.no_grad():
        ref_c = token_logprobs(ref, cw, lw)[0].sum(-1)  # (N,)
        ref_r = token_logprobs(ref, cl, ll)[0].sum(-1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="dpo", disable=not progress, leave=False):
        b = torch.randint(0, len(rows), (min(batch_size, len(rows)),), generator=g).to(dev)
        lp_c, m_c = token_logprobs(model, cw[b], lw[b])  # (b, T-1)
        pc = lp_c.sum(-1)
        pr = token_logprobs(model, cl[b], ll[b])[0].sum(-1)
        loss = dpo_loss(pc, pr, ref_c[b], ref_r[b], beta)
        if nll_weight:
            loss = loss - nll_weight * pc.sum() / m_c.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------------------
# lmlab reason rl: the search -> learn loop

ALGOS = {"expert-iter": "behaviour cloning on verified (or search-picked) samples, then SFT",
         "grpo": "GRPO, group-normalised advantages, clipped ratio",
         "rloo": "GRPO loss with the RLOO leave-one-out baseline",
         "ppo": "PPO with a value model, GAE and a per-token KL penalty in the reward",
         "dpo": "DPO on (correct, incorrect) pairs sampled from the policy",
         "step-dpo": "DPO on (better, worse) next steps at the same prefix of the sample / search tree"}


@dataclass
class RLConfig(RunArgs):
    """The search -> learn loop: sample/search with the policy, write datasets, update, evaluate; R rounds."""

    policy: str = ""
    """Starting policy: a folder from 'lmlab reason sft' (or any HF causal LM)."""
    algo: str = "expert-iter"
    """expert-iter | grpo | rloo | ppo | dpo | step-dpo."""
    rounds: int = 2
    """Search -> learn rounds (rerun with the same --out to resume after the last finished round)."""
    task: str = "column_add"
    """Task: column_add | countdown | jsonl."""
    difficulty: int = 6
    """Digits (column_add) or numbers (countdown)."""
    problems: str = ""
    """JSONL problems (task=jsonl)."""
    n_train: int = 1500
    """Training problems per round (expert-iter / dpo: searched; grpo: the prompt pool)."""
    k: int = 8
    """Samples per problem (expert-iter / dpo) or the search budget N when search != sample."""
    search: str = "sample"
    """Train-time data: sample (k temperature samples) or a search algo (weighted_bon, beam, dvts, mcts ...)."""
    scorer: str = "gold"
    """Scorer (PRM) for a search algo, process rewards (grpo.process_alpha, ppo.process_alpha) and checker-free
    step-dpo: gold | outcome | RM folder."""
    filter: str = "outcome"
    """expert-iter: outcome (keep verified-correct, RFT) | none (clone the search pick, no checker)."""
    sft_steps: int = 300
    """expert-iter: SFT steps per round."""
    sft_lr: float = 3e-3
    """expert-iter: SFT learning rate (cosine, 30 warm-up steps)."""
    batch_size: int = 128
    """expert-iter / dpo: batch size."""
    grpo_steps: int = 50
    """grpo / rloo: optimizer steps per round."""
    grpo: GRPOParams = field(default_factory=GRPOParams)
    """GRPO knobs (grpo.num_generations, grpo.prompts_per_step, grpo.beta, grpo.loss_type, ...)."""
    ppo: PPOParams = field(default_factory=PPOParams)
    """PPO knobs (ppo.kl_coef, ppo.lam, ppo.vf_coef, ppo.ppo_epochs, ppo.process_alpha, ...); steps = grpo_steps."""
    step_filter: str = "outcome"
    """step-dpo: Q of a step = outcome (mean verified outcome below it) | scorer (PRM score; no checker)."""
    step_min_gap: float = 0.5
    """step-dpo: minimum Q(chosen) - Q(rejected)."""
    retrain_prm: bool = False
    """After each round, continue training the PRM (--scorer must be an RM folder) on the round's samples with
    Monte-Carlo soft labels from the current policy (ReST-MCTS* / rStar-Math self-evolution); PRM step accuracy
    and AUC against gold labels are logged per round."""
    prm_k: int = 4
    """retrain_prm: MC rollouts per step prefix."""
    prm_steps: int = 150
    """retrain_prm: RM optimizer steps per round."""
    prm_max_solutions: int = 2000
    """retrain_prm: at most this many of the round's solutions are labelled."""
    dpo_steps: int = 100
    """dpo: optimizer steps per round."""
    dpo_beta: float = 0.1
    """dpo: beta."""
    dpo_lr: float = 1e-3
    """dpo: learning rate."""
    dpo_nll: float = 0.0
    """dpo / step-dpo: weight of an NLL term on the chosen completion (RPO); 0 = plain DPO (the paper)."""
    n_test: int = 300
    """Held-out problems for greedy / sampled accuracy after each round."""
    eval_k: int = 4
    """Samples per test problem for sampled accuracy and pass@k."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algo not in ALGOS:
            raise ConfigError(f"algo must be one of {sorted(ALGOS)}, got {self.algo!r}")
        if min(self.rounds, self.n_train, self.k, self.n_test, self.eval_k, self.sft_steps, self.grpo_steps,
               self.dpo_steps, self.batch_size) < 1:
            raise ConfigError("rounds, n_train, k, n_test, eval_k and the step counts must be >= 1")
        if self.filter not in ("outcome", "none"):
            raise ConfigError(f"filter must be outcome|none, got {self.filter!r}")
        if self.step_filter not in ("outcome", "scorer"):
            raise ConfigError(f"step_filter must be outcome|scorer, got {self.step_filter!r}")
        if self.retrain_prm and self.scorer in ("gold", "outcome"):
            raise ConfigError("retrain_prm needs --scorer to be a reward-model folder (from 'lmlab reason rm')")
        if min(self.prm_k, self.prm_steps, self.prm_max_solutions) < 1:
            raise ConfigError("prm_k, prm_steps and prm_max_solutions must be >= 1")
        self.grpo.validate()
        self.ppo.validate()


def _round_data(cfg: RLConfig, policy: Any, task: Any, scorer: Any, probs: list
                ) -> tuple[list[list[list[str]]], list[list[str]] | None]:
    """Samples per problem (and the search pick when a search algo is used)."""
    if cfg.search == "sample":
        return sample_groups(policy, task, probs, cfg.k), None
    from lmlab.reason.search import SearchParams, run_search

    res = run_search(cfg.search, probs, policy, task, scorer, SearchParams(n=cfg.k, m=min(4, cfg.k)))
    return [r.completions for r in res], [r.chosen for r in res]


def _retrain_prm(cfg: RLConfig, scorer: Any, policy: Any, task: Any, probs: list, groups: list[list[list[str]]],
                 test: list, out: Path) -> dict[str, Any]:
    """ReST-MCTS* / rStar-Math style PRM self-evolution: MC soft labels from the current policy on this round's
    solutions -> continue training the PRM in place -> save ``rounds/rNN/prm``; gold step accuracy / AUC."""
    from lmlab.reason.policy import rollout
    from lmlab.reason.reward import mc_labels, prm_quality, save_rm, train_rm

    flat_p = [p for p, row in zip(probs, groups) for _ in row][: cfg.prm_max_solutions]
    flat_s = [s for row in groups for s in row][: cfg.prm_max_solutions]
    targets = mc_labels(policy, task, flat_p, flat_s, cfg.prm_k)
    scorer.rm.train()
    train_rm(scorer.rm, scorer.tok, flat_p, flat_s, targets, steps=cfg.prm_steps, seed=cfg.seed, progress=False)
    scorer.rm.eval()
    save_rm(scorer.rm, scorer.tok, out / "prm", {"label": "mc_soft", "k": cfg.prm_k, "round_solutions": len(flat_s)})
    st: dict[str, Any] = {"prm_trained_on": len(flat_s)}
    if task.step_labels(test[0], []) is not None:
        sols = [row[0] for row in rollout(policy, task, test, [[] for _ in test], 1)]
        q = prm_quality(scorer, task, test, sols)
        st.update(prm_step_accuracy=q["step_accuracy"], prm_auc=q["auc"])
    return st


def main(cfg: RLConfig) -> Path:
    from tqdm.auto import tqdm

    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.reason.policy import LMPolicy, build_task, evaluate_policy, load_lm, save_lm, sft, split_problems
    from lmlab.reason.reward import load_scorer
    from lmlab.reason.search import ALGOS as SEARCH_ALGOS

    if not cfg.policy:
        raise ConfigError("give a policy: a folder from 'lmlab reason sft' (or an HF causal LM)")
    if cfg.search != "sample" and cfg.search not in SEARCH_ALGOS:
        raise ConfigError(f"search must be sample or one of {sorted(SEARCH_ALGOS)}, got {cfg.search!r}")
    if cfg.filter == "none" and cfg.search == "sample" and cfg.algo == "expert-iter":
        raise ConfigError("filter=none needs a scored search (e.g. search=beam) to pick the solution to clone")
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    task = build_task(cfg.task, cfg.difficulty, cfg.problems)
    need_scorer = (cfg.search != "sample" or cfg.retrain_prm or (cfg.algo == "step-dpo" and cfg.step_filter == "scorer")
                   or (cfg.algo in ("grpo", "rloo") and cfg.grpo.process_alpha > 0)
                   or (cfg.algo == "ppo" and cfg.ppo.process_alpha > 0))
    scorer = load_scorer(cfg.scorer, task, dev) if need_scorer else None
    train, test = split_problems(task, cfg.n_train * cfg.rounds, cfg.n_test, cfg.seed)
    with start_run(cfg, "reason-rl", device=dev, dtype=dtype, threads=threads) as run:
        rdir = run.path / "rounds"
        done = sorted(p for p in rdir.glob("r*/done.json")) if rdir.is_dir() else []
        start = len(done)
        spec = str(done[-1].parent / "policy") if done else cfg.policy
        model, tok = load_lm(spec, dev, cfg.trust_remote_code)
        policy = LMPolicy(model, tok)
        history = [json.loads(p.read_text()) for p in done]
        if not done:
            ev = evaluate_policy(policy, task, test, cfg.eval_k)
            history.append({"round": 0, "greedy": ev["greedy"], "sample": ev["sample"]})
            (rdir / "r00").mkdir(parents=True, exist_ok=True)
            write_jsonl(rdir / "r00" / "eval.jsonl", [history[0]])
        else:
            history = [read_jsonl(rdir / "r00" / "eval.jsonl")[0]] + history
            log.info("resuming after round %d from %s", start, spec)
        if cfg.retrain_prm:
            from lmlab.reason.reward import RMScorer, load_rm

            prm_spec = done[-1].parent / "prm" if done else Path(cfg.scorer)
            rm, rm_tok = load_rm(prm_spec, dev)
            scorer = RMScorer(rm, rm_tok)
        reward_fn = outcome_reward(task)
        trainer = None
        for r in range(start + 1, cfg.rounds + 1):
            out = rdir / f"r{r:02d}"
            out.mkdir(parents=True, exist_ok=True)
            probs = train[(r - 1) * cfg.n_train: r * cfg.n_train] or train
            stats: dict[str, Any] = {"round": r}
            if cfg.algo in ("grpo", "rloo", "ppo"):
                if cfg.algo == "ppo":
                    trainer = PPOTrainer(model, tok, task, reward_fn, cfg.ppo, seed=cfg.seed + r, scorer=scorer)
                else:
                    cfg.grpo.advantage = "rloo" if cfg.algo == "rloo" else "grpo"
                    trainer = GRPOTrainer(model, tok, task, reward_fn, cfg.grpo, seed=cfg.seed + r, scorer=scorer)
                all_p, all_g, rew = [], [], []
                for s in tqdm(range(cfg.grpo_steps), desc=f"{cfg.algo} round {r}", leave=False):
                    o = trainer.step(probs)
                    all_p += o["problems"]
                    all_g += o["groups"]
                    rew.append(o["reward"])
                    run.log({"round": r, "step": s, **{k: v for k, v in o.items() if isinstance(v, float)}})
                stats["train_reward"] = rew
                groups, probs_used = all_g, all_p
            else:
                groups, picks = _round_data(cfg, policy, task, scorer, probs)
                probs_used = probs
                if cfg.algo == "expert-iter":
                    prompts, comps = expert_iteration_data(task, probs, groups, cfg.filter, picks)
                    stats["n_clone"] = len(comps)
                    if picks is not None:  # how often the checker-free pick is actually right
                        stats["clone_correct"] = sum(task.check(p, s) for p, s in zip(probs, picks)) / len(probs)
                    if not comps:
                        raise LmlabError(f"round {r}: no solution passed the filter; raise k or use a search")
                    losses = sft(model, tok, prompts, comps, cfg.sft_steps, cfg.batch_size, cfg.sft_lr, 30,
                                 seed=cfg.seed + r)
                    stats["sft_final_loss"] = losses[-1]
                else:
                    if cfg.algo == "step-dpo":
                        pairs = step_preference_rows(task, probs, groups,
                                                     scorer if cfg.step_filter == "scorer" else None,
                                                     cfg.step_min_gap)
                        write_jsonl(out / "step_preference.jsonl", pairs)
                    else:
                        pairs = preference_rows(task, probs, groups)
                    stats["n_pairs"] = len(pairs)
                    losses = dpo_train(model, tok, pairs, cfg.dpo_steps, min(cfg.batch_size, 64), cfg.dpo_lr,
                                       cfg.dpo_beta, cfg.seed + r, nll_weight=cfg.dpo_nll)
                    stats["dpo_final_loss"] = losses[-1]
            flat_ok = [task.check(p, s) for p, row in zip(probs_used, groups) for s in row]
            stats["frac_verified"] = sum(flat_ok) / max(len(flat_ok), 1)
            write_jsonl(out / "stepwise.jsonl", stepwise_rows(task, probs_used, groups))
            write_jsonl(out / "preference.jsonl", preference_rows(task, probs_used, groups))
            if cfg.retrain_prm:
                stats.update(_retrain_prm(cfg, scorer, policy, task, probs_used, groups, test, out))
            save_lm(model, tok, out / "policy")
            ev = evaluate_policy(policy, task, test, cfg.eval_k)
            stats.update(greedy=ev["greedy"], sample=ev["sample"])
            log.info("round %d: greedy %.3f sample %.3f (data %.3f verified)", r, ev["greedy"], ev["sample"],
                     stats["frac_verified"])
            run.log({k: v for k, v in stats.items() if not isinstance(v, list)})
            history.append(stats)
            write_jsonl(out / "done.json", [stats])  # the round marker, written last
        xs = [h["round"] for h in history]
        line_plot(run.plots / "accuracy_per_round.png", xs, {"greedy": [h["greedy"] for h in history],
                                                             "sample": [h["sample"] for h in history]},
                  title=f"{cfg.algo}: held-out accuracy per round", xlabel="round", ylabel="accuracy")
        run.finish({"algo": cfg.algo, "rounds": cfg.rounds, "history": history,
                    "policy": str(rdir / f"r{cfg.rounds:02d}" / "policy")})
    return run.path


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """Learning from search: expert iteration (RFT) rounds on a noisy-teacher policy; greedy accuracy per round.

    Quick: 3-digit addition, SFT 200 steps on a teacher that forgets carries 60% of the time, 2 RFT rounds of
    300 problems x 8 samples + 150 SFT steps, 200 test problems. Full: 6 digits, 600 SFT steps, 3 rounds of
    1,500 x 8 + 300 SFT steps, 300 test problems."""
    from lmlab.core.plotting import line_plot
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.reason.policy import LMPolicy, build_task, demonstrations, load_lm, sft, split_problems

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    full = bool(getattr(cfg, "full", False))
    digits, steps, bs, lr, rounds, n_round, ei_steps, n_test = ((6, 600, 128, 3e-3, 3, 1500, 300, 300) if full
                                                                else (3, 200, 64, 1e-2, 2, 300, 150, 200))
    sub = RunArgs(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    teacher = build_task("column_add", digits, q_sys=0.6, q_rand=0.03)
    task = build_task("column_add", digits)
    with start_run(sub, "tour-reason-learn", device=dev, dtype=dtype, threads=threads) as run:
        demos, test = split_problems(teacher, 60_000 if full else 3000, n_test, cfg.seed)
        prompts, comps = demonstrations(teacher, demos, cfg.seed)
        model, tok = load_lm("tiny", dev)
        sft(model, tok, prompts, comps, steps, bs, lr, 100 if full else 20, seed=cfg.seed, progress=False)
        policy = LMPolicy(model, tok)
        train, _ = split_problems(task, rounds * n_round, n_test, cfg.seed + 1)

        def greedy() -> float:
            g = sample_groups(policy, task, test, 1, 0.0)
            return sum(task.check(p, r[0]) for p, r in zip(test, g)) / len(test)

        hist = [{"round": 0, "greedy": greedy(), "frac_verified": float("nan"), "n_clone": 0}]
        for r in range(1, rounds + 1):
            probs = train[(r - 1) * n_round: r * n_round]
            groups = sample_groups(policy, task, probs, 8)
            p_, c_ = expert_iteration_data(task, probs, groups)
            frac = sum(task.check(p, s) for p, row in zip(probs, groups) for s in row) / (8 * len(probs))
            if c_:
                sft(model, tok, p_, c_, ei_steps, bs, 3e-3, 10, seed=cfg.seed + r, progress=False)
            hist.append({"round": r, "greedy": greedy(), "frac_verified": frac, "n_clone": len(c_)})
            run.log(hist[-1])
        line_plot(run.plots / "greedy_per_round.png", [h["round"] for h in hist], {"greedy": [h["greedy"]
                                                                                            for h in hist]},
                  title="expert iteration (RFT): greedy accuracy per round", xlabel="round", ylabel="accuracy")
        run.finish({"digits": digits, "rounds": hist})
    lines = [f"{digits}-digit addition; policy SFT'd on a teacher that forgets carries 60% of the time; "
             f"expert iteration = sample 8, keep verified, SFT ({len(test)} test problems).",
             "greedy accuracy per round: " + " -> ".join(f"{h['greedy']:.2f}" for h in hist) +
             "  (verified fraction of samples: " + ", ".join(f"{h['frac_verified']:.2f}" for h in hist[1:]) + ")"]
    return run.path, "\n".join(lines)
