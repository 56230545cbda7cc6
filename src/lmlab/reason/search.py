"""Test-time search (o1 roadmap, component 3) over one policy interface, with exact compute accounting.

Roadmap (Zeng et al., arXiv 2412.14135), section "Search": guidance is *internal* (the model's own uncertainty,
self-consistency, self-evaluation) or *external* (verifier, ORM/PRM); strategies are tree search (best-of-N,
beam, MCTS) and sequential revision. All methods here run batched over many problems at once and use only::

    policy.expand(prefixes, n, stop=task.step_sep)     # reason/policy.py
    scorer.score(problems, step_lists)                 # reason/reward.py, per-step scores in [0, 1]

Methods (``ALGOS``; N = budget, M = beam width):

* ``greedy``: temperature 0, one solution.
* ``majority`` (self-consistency, Wang et al. 2203.11171): N samples, most frequent answer.
* ``bon``: N samples, argmax of the aggregated PRM score (``agg`` = last | min | prod | mean).
* ``weighted_bon``: N samples, answer maximizing sum_i score_i 1[answer_i = a] (search-and-learn "weighted").
* ``beam`` (step-level, search-and-learn): N active beams; each step every beam proposes one step, keep the
  top N/M by PRM, expand each M times; finished beams are collected; final pick argmax or weighted.
* ``dvts`` (diverse verifier tree search): N/M independent subtrees, each expands M candidates per step and keeps
  its own best; final pick over the N/M leaves.
* ``mcts``: PUCT (AlphaZero) or UCT; expansion samples ``width`` steps (prior = sample frequency), leaf value =
  PRM score of the new state (``value=prm``) or of a policy rollout (``value=rollout``); backup of each child
  value; budget N*D generated steps; final pick best terminal | most visited | weighted::

      PUCT(s, a) = Q(s, a) + c * P(s, a) * sqrt(N(s)) / (1 + N(s, a))      UCT = Q + c * sqrt(ln N(s) / N(s, a))

* ``revise`` (sequential revision): up to k rounds of critique + rewrite. The critic is external
  (``critic=prm``: first step with PRM score < threshold) or internal (``critic=confidence``: first step whose
  mean token log-prob < log threshold). The solution is rewritten from the flagged step; stopping is internal/
  external: no flagged step.

Every method returns, per problem, a :class:`SearchResult` with the candidate completions, their scores, the
chosen solution and answer, generated tokens / steps, RM calls and ``hit_max_depth`` (no finished solution:
the best partial is returned).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.config import ConfigError, RunArgs
from lmlab.errors import LmlabError
from lmlab.reason.reward import aggregate
from lmlab.reason.tasks import split_steps

log = logging.getLogger(__name__)


@dataclass
class SearchParams:
    """Knobs shared by the search methods."""

    n: int = 16
    """Budget N: samples (BoN family), beams (beam/DVTS), or N*D generated steps (MCTS)."""
    m: int = 4
    """Beam width M: beam keeps N/M and expands each M times; DVTS runs N/M subtrees of M."""
    temperature: float = 1.0
    """Sampling temperature of the policy."""
    agg: str = "min"
    """Step-score aggregation for solution scores: last | min | prod | mean."""
    final: str = "weighted"
    """Final pick for beam/DVTS/MCTS: argmax | weighted (| most_visited for MCTS)."""
    c: float = 1.5
    """MCTS exploration constant."""
    rule: str = "puct"
    """MCTS selection: puct | uct."""
    width: int = 4
    """MCTS children sampled per expansion."""
    widen: float = 0.0
    """MCTS progressive widening: a node may be expanded again while expansions < 1 + widen*sqrt(visits)
    (0: off, one expansion per node as in AlphaZero)."""
    value: str = "prm"
    """MCTS leaf value: prm (score of the new state) | rollout (PRM score of one policy completion)."""
    max_depth: int = 0
    """Step cap (0: the task's max_steps)."""
    rounds: int = 4
    """Revision rounds."""
    critic: str = "prm"
    """Revision critic: prm (external) | confidence (internal, mean token log-prob)."""
    threshold: float = 0.5
    """Revision: flag a step whose PRM score (or token probability) is below this."""

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"search budget n must be >= 1, got {self.n}")
        if self.m < 1 or self.width < 1 or self.rounds < 0:
            raise ConfigError("m and width must be >= 1 and rounds >= 0")
        if self.agg not in ("last", "min", "prod", "mean"):
            raise ConfigError(f"agg must be last|min|prod|mean, got {self.agg!r}")
        if self.final not in ("argmax", "weighted", "most_visited"):
            raise ConfigError(f"final must be argmax|weighted|most_visited, got {self.final!r}")
        if self.rule not in ("puct", "uct") or self.value not in ("prm", "rollout"):
            raise ConfigError("rule must be puct|uct and value prm|rollout")
        if self.critic not in ("prm", "confidence"):
            raise ConfigError(f"critic must be prm|confidence, got {self.critic!r}")


@dataclass
class SearchResult:
    """What every search method returns for one problem."""

    completions: list[list[str]]
    scores: list[float]
    answer: str | None
    chosen: list[str]
    tokens: int = 0
    steps: int = 0
    rm_calls: int = 0
    hit_max_depth: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# selection rules (pure)


def majority_pick(answers: list[str | None]) -> int:
    """Index of the first solution carrying the most frequent non-None answer (0 if none parse)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    best = max(counts.values())
    top = next(a for a in answers if a is not None and counts[a] == best)
    return answers.index(top)


def weighted_pick(answers: list[str | None], scores: list[float]) -> int:
    """Index of the best-scored solution of the answer with the largest summed score."""
    tot: dict[str, float] = {}
    for a, s in zip(answers, scores):
        if a is not None:
            tot[a] = tot.get(a, 0.0) + s
    if not tot:
        return int(np.argmax(scores)) if scores else 0
    best = max(tot, key=lambda a: (tot[a], -answers.index(a)))
    return max((i for i, a in enumerate(answers) if a == best), key=lambda i: scores[i])


def pick(rule: str, answers: list[str | None], scores: list[float]) -> int:
    if rule == "majority":
        return majority_pick(answers)
    if rule == "weighted":
        return weighted_pick(answers, scores)
    # argmax among parseable solutions first
    order = sorted(range(len(scores)), key=lambda i: (answers[i] is not None, scores[i]), reverse=True)
    return order[0] if order else 0


def _result(task: Any, p: Any, sols: list[list[str]], scores: list[float], rule: str, tokens: int, steps: int,
            rm_calls: int, max_depth: int, **extra: Any) -> SearchResult:
    answers = [task.extract_answer(p, s) for s in sols]
    i = pick(rule, answers, scores) if sols else 0
    chosen = sols[i] if sols else []
    hit = bool(sols) and answers[i] is None and len(chosen) >= max_depth
    return SearchResult(sols, scores, answers[i] if sols else None, chosen, tokens, steps, rm_calls, hit, extra)


def _max_depth(task: Any, p: Any, sp: SearchParams) -> int:
    return sp.max_depth or task.max_steps(p)


def _done(task: Any, p: Any, steps: list[str], finished: bool, sp: SearchParams) -> bool:
    return task.is_terminal(p, steps) or len(steps) >= _max_depth(task, p, sp) or not finished


def _expand_steps(policy: Any, task: Any, problems: list, prefixes: list[list[str]], n: int, temperature: float):
    """One step from each prefix, n times: list of n Expansion per prefix."""
    prompts = [p.prompt + "".join(s) for p, s in zip(problems, prefixes)]
    return policy.expand(prompts, n, task.step_sep, task.step_chars, temperature)


# --------------------------------------------------------------------------------------------------------------
# solution-level methods


def sample_pool(problems: list, policy: Any, task: Any, n: int, temperature: float = 1.0, sp: SearchParams | None = None
                ) -> list[list[tuple[list[str], int]]]:
    """n complete solutions per problem with their generated-token counts."""
    sp = sp or SearchParams()
    prompts = [p.prompt for p in problems]
    until = [(lambda text, p=p: _done(task, p, split_steps(text, task.step_sep), True, sp)) for p in problems]
    max_new = max(_max_depth(task, p, sp) for p in problems) * task.step_chars
    exps = policy.expand(prompts, n, task.step_sep, max_new, temperature, until=until)
    return [[(split_steps(e.text, task.step_sep), e.n_tokens) for e in row] for row in exps]


def select_from_pool(problems: list, task: Any, pool: list[list[tuple[list[str], int]]], scorer: Any,
                     rules: list[str], ns: list[int], sp: SearchParams,
                     scores: list[list[list[float]]] | None = None) -> dict[str, dict[int, list[SearchResult]]]:
    """Apply selection ``rules`` (majority | argmax | weighted) to the first n of each pool, for each n in ns
    (the search-and-learn protocol: sample once at N_max, subsample). Scores are computed once."""
    if scores is None and scorer is not None and any(r != "majority" for r in rules):
        flat_p = [p for p, row in zip(problems, pool) for _ in row]
        flat = scorer.score(flat_p, [s for row in pool for s, _ in row])
        it = iter(flat)
        scores = [[next(it) for _ in row] for row in pool]
    out: dict[str, dict[int, list[SearchResult]]] = {}
    for rule in rules:
        out[rule] = {}
        for n in ns:
            res = []
            for i, (p, row) in enumerate(zip(problems, pool)):
                sols = [s for s, _ in row[:n]]
                sc = [aggregate(x, sp.agg) for x in scores[i][:n]] if (scores and rule != "majority") else [
                    0.0] * len(sols)
                res.append(_result(task, p, sols, sc, rule, sum(t for _, t in row[:n]),
                                   sum(len(s) for s in sols), n if rule != "majority" else 0,
                                   _max_depth(task, p, sp)))
            out[rule][n] = res
    return out


def greedy(problems, policy, task, scorer=None, sp: SearchParams | None = None) -> list[SearchResult]:
    pool = sample_pool(problems, policy, task, 1, 0.0, sp)
    return select_from_pool(problems, task, pool, None, ["majority"], [1], sp or SearchParams())["majority"][1]


def majority(problems, policy, task, scorer=None, sp: SearchParams | None = None) -> list[SearchResult]:
    sp = sp or SearchParams()
    pool = sample_pool(problems, policy, task, sp.n, sp.temperature, sp)
    return select_from_pool(problems, task, pool, None, ["majority"], [sp.n], sp)["majority"][sp.n]


def best_of_n(problems, policy, task, scorer, sp: SearchParams | None = None) -> list[SearchResult]:
    sp = sp or SearchParams()
    pool = sample_pool(problems, policy, task, sp.n, sp.temperature, sp)
    return select_from_pool(problems, task, pool, scorer, ["argmax"], [sp.n], sp)["argmax"][sp.n]


def weighted_best_of_n(problems, policy, task, scorer, sp: SearchParams | None = None) -> list[SearchResult]:
    sp = sp or SearchParams()
    pool = sample_pool(problems, policy, task, sp.n, sp.temperature, sp)
    return select_from_pool(problems, task, pool, scorer, ["weighted"], [sp.n], sp)["weighted"][sp.n]


# --------------------------------------------------------------------------------------------------------------
# step-level tree search


def beam(problems, policy, task, scorer, sp: SearchParams | None = None) -> list[SearchResult]:
    """Step-level beam search (N beams, keep N/M by the last-step PRM score, expand each M times)."""
    sp = sp or SearchParams()
    keep = max(sp.n // sp.m, 1)
    P = len(problems)
    active: list[list[list[str]]] = [[[]] for _ in range(P)]  # per problem: prefixes to expand
    fan = [sp.n] * P  # children per prefix at this depth
    done: list[list[tuple[list[str], float]]] = [[] for _ in range(P)]
    toks, stp, calls = [0] * P, [0] * P, [0] * P
    while any(active):
        idx = [(i, j) for i in range(P) for j in range(len(active[i]))]
        by_fan: dict[int, list[tuple[int, int]]] = {}
        for i, j in idx:
            by_fan.setdefault(fan[i], []).append((i, j))
        cands: list[list[tuple[list[str], bool]]] = [[] for _ in range(P)]
        for f, rows in by_fan.items():
            exps = _expand_steps(policy, task, [problems[i] for i, _ in rows], [active[i][j] for i, j in rows], f,
                                 sp.temperature)
            for (i, j), es in zip(rows, exps):
                for e in es:
                    cands[i].append((active[i][j] + [e.text], e.finished))
                    toks[i] += e.n_tokens
                    stp[i] += 1
        flat = [(i, c) for i in range(P) for c in cands[i]]
        sc = scorer.score([problems[i] for i, _ in flat], [c[0] for _, c in flat])
        per: list[list[tuple[list[str], bool, float, list[float]]]] = [[] for _ in range(P)]
        for (i, (s, fin)), x in zip(flat, sc):
            per[i].append((s, fin, x[-1] if x else 0.0, x))
            calls[i] += 1
        for i in range(P):
            if not per[i]:
                continue
            ranked = sorted(per[i], key=lambda t: -t[2])
            nxt = []
            for s, fin, _v, x in ranked:
                if _done(task, problems[i], s, fin, sp):
                    done[i].append((s, aggregate(x, sp.agg)))
                elif len(nxt) < keep:
                    nxt.append(s)
            if len(done[i]) >= sp.n:
                nxt = []
            active[i] = nxt
            fan[i] = sp.m
    out = []
    for i, p in enumerate(problems):
        sols = [s for s, _ in done[i]]
        out.append(_result(task, p, sols, [v for _, v in done[i]], "weighted" if sp.final == "weighted" else "argmax",
                           toks[i], stp[i], calls[i], _max_depth(task, p, sp)))
    return out


def dvts(problems, policy, task, scorer, sp: SearchParams | None = None) -> list[SearchResult]:
    """Diverse verifier tree search: N/M independent greedy-by-PRM subtrees, M candidates per step each."""
    sp = sp or SearchParams()
    trees = max(sp.n // sp.m, 1)
    P = len(problems)
    live = [(i, t) for i in range(P) for t in range(trees)]
    state = {(i, t): [] for i, t in live}
    leaves: list[list[tuple[list[str], float]]] = [[] for _ in range(P)]
    toks, stp, calls = [0] * P, [0] * P, [0] * P
    while live:
        exps = _expand_steps(policy, task, [problems[i] for i, _ in live], [state[k] for k in live], sp.m,
                             sp.temperature)
        flat = [(k, e) for k, es in zip(live, exps) for e in es]
        sc = scorer.score([problems[k[0]] for k, _ in flat], [state[k] + [e.text] for k, e in flat])
        best: dict[tuple[int, int], tuple[float, list[str], bool, list[float]]] = {}
        for (k, e), x in zip(flat, sc):
            toks[k[0]] += e.n_tokens
            stp[k[0]] += 1
            calls[k[0]] += 1
            v = x[-1] if x else 0.0
            if k not in best or v > best[k][0]:
                best[k] = (v, state[k] + [e.text], e.finished, x)
        nxt = []
        for k in live:
            v, s, fin, x = best[k]
            state[k] = s
            if _done(task, problems[k[0]], s, fin, sp):
                leaves[k[0]].append((s, aggregate(x, sp.agg)))
            else:
                nxt.append(k)
        live = nxt
    return [_result(task, p, [s for s, _ in leaves[i]], [v for _, v in leaves[i]],
                    "weighted" if sp.final == "weighted" else "argmax", toks[i], stp[i], calls[i],
                    _max_depth(task, p, sp)) for i, p in enumerate(problems)]


@dataclass
class Node:
    steps: list[str]
    parent: Node | None = None
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    value: float = 0.0
    """Evaluation of this state (PRM score of its last step, or of a rollout)."""
    terminal: bool = False
    children: list[Node] = field(default_factory=list)
    expansions: int = 0
    counts: dict[tuple[str, bool], int] = field(default_factory=dict)

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


def select_child(node: Node, c: float, rule: str = "puct") -> Node:
    """argmax_a Q(s,a) + c P(s,a) sqrt(N(s)) / (1 + N(s,a))   (PUCT)   or   Q + c sqrt(ln N(s) / N(s,a)) (UCT)."""
    n_parent = max(node.visits, 1)

    def u(ch: Node) -> float:
        if rule == "uct":
            return math.inf if ch.visits == 0 else ch.q + c * math.sqrt(math.log(n_parent) / ch.visits)
        return ch.q + c * ch.prior * math.sqrt(n_parent) / (1 + ch.visits)

    return max(node.children, key=u)


def backup(node: Node | None, value: float, count: int = 1) -> None:
    while node is not None:
        node.visits += count
        node.value_sum += value
        node = node.parent


def mcts(problems, policy, task, scorer, sp: SearchParams | None = None) -> list[SearchResult]:
    """MCTS over steps, one tree per problem, leaves of all trees expanded in one batched policy call."""
    sp = sp or SearchParams()
    P = len(problems)
    roots = [Node([]) for _ in range(P)]
    # budget = N * D generated steps (D = solution length; column_add's max_steps = 2D leaves room for corrections)
    budget = [sp.n * (getattr(task, "digits", 0) or _max_depth(task, p, sp)) for p in problems]
    toks, stp, calls = [0] * P, [0] * P, [0] * P
    stall = [0] * P
    while True:
        live = [i for i in range(P) if stp[i] < budget[i] and stall[i] < 50 and not (roots[i].terminal)]
        if not live:
            break
        leaves: list[tuple[int, Node]] = []
        for i in live:
            node = roots[i]
            while node.children and not node.terminal and not (
                    sp.widen > 0 and node.expansions < 1 + int(sp.widen * math.sqrt(node.visits))):
                node = select_child(node, sp.c, sp.rule)
            if node.terminal:  # re-visit a finished solution: no generation
                backup(node, node.value)
                stall[i] += 1
                if all(ch.terminal for ch in roots[i].children) and roots[i].children and stall[i] > 10:
                    stall[i] = 50
                continue
            stall[i] = 0
            leaves.append((i, node))
        if not leaves:
            continue
        exps = _expand_steps(policy, task, [problems[i] for i, _ in leaves], [n.steps for _, n in leaves], sp.width,
                             sp.temperature)
        kids: list[tuple[int, Node, Node, bool]] = []
        for (i, node), es in zip(leaves, exps):
            node.expansions += 1
            for e in es:
                toks[i] += e.n_tokens
                stp[i] += 1
                node.counts[(e.text, e.finished)] = node.counts.get((e.text, e.finished), 0) + 1
            known = {ch.steps[-1] for ch in node.children}
            for (text, fin) in node.counts:
                if text in known:
                    continue
                known.add(text)
                ch = Node(node.steps + [text], node)
                ch.terminal = _done(task, problems[i], ch.steps, fin, sp)
                node.children.append(ch)
                kids.append((i, node, ch, fin))
            total = sum(node.counts.values())
            for ch in node.children:  # prior = sampling frequency of the step among all draws at this node
                ch.prior = sum(c for (t, _), c in node.counts.items() if t == ch.steps[-1]) / total
        if sp.value == "rollout":
            from lmlab.reason.policy import rollout

            open_k = [k for k in kids if not k[2].terminal]
            comps = rollout(policy, task, [problems[i] for i, *_ in open_k], [ch.steps for _, _, ch, _ in open_k], 1,
                            sp.temperature) if open_k else []
            full = {id(k[2]): k[2].steps + c[0] for k, c in zip(open_k, comps)}
            for k, c in zip(open_k, comps):
                toks[k[0]] += len(policy.tok.encode("".join(c[0]))) if hasattr(policy, "tok") else 0
            seqs = [full.get(id(ch), ch.steps) for _, _, ch, _ in kids]
            sc = scorer.score([problems[i] for i, *_ in kids], seqs)
            vals = [aggregate(x, sp.agg) for x in sc]
        else:
            sc = scorer.score([problems[i] for i, *_ in kids], [ch.steps for _, _, ch, _ in kids])
            vals = [x[-1] if x else 0.0 for x in sc]
        for (i, _node, ch, _), v in zip(kids, vals):
            calls[i] += 1
            ch.value = v
            backup(ch, v)
    out = []
    for i, p in enumerate(problems):
        terms: list[Node] = []
        stack = [roots[i]]
        deepest = roots[i]
        while stack:
            nd = stack.pop()
            if nd.terminal:
                terms.append(nd)
            if len(nd.steps) > len(deepest.steps) or (len(nd.steps) == len(deepest.steps) and nd.value > deepest.value):
                deepest = nd
            stack.extend(nd.children)
        if sp.final == "most_visited":
            nd = roots[i]
            while nd.children:
                nd = max(nd.children, key=lambda ch: ch.visits)
            sols, scores, rule = [nd.steps], [nd.value], "argmax"
        else:
            cands = terms or [deepest]
            sols, scores = [n.steps for n in cands], [n.value for n in cands]
            rule = "weighted" if sp.final == "weighted" else "argmax"
        r = _result(task, p, sols, scores, rule, toks[i], stp[i], calls[i], _max_depth(task, p, sp),
                    terminals=len(terms), root_visits=roots[i].visits)
        r.hit_max_depth = r.hit_max_depth or not terms
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------------------------
# sequential revision


def revise(problems, policy, task, scorer, sp: SearchParams | None = None) -> list[SearchResult]:
    """k rounds of critique (external PRM or internal confidence) + rewrite from the first flagged step."""
    sp = sp or SearchParams()
    P = len(problems)
    sols: list[list[str]] = [[] for _ in range(P)]
    lps: list[list[float]] = [[] for _ in range(P)]
    toks, stp, calls, rounds = [0] * P, [0] * P, [0] * P, [0] * P

    def generate(idx: list[int]) -> None:  # step by step so that each step keeps its mean token log-prob
        live = [i for i in idx if not task.is_terminal(problems[i], sols[i])]
        while live:
            exps = _expand_steps(policy, task, [problems[i] for i in live], [sols[i] for i in live], 1, sp.temperature)
            nxt = []
            for i, es in zip(live, exps):
                e = es[0]
                sols[i].append(e.text)
                lps[i].append(e.logprob / max(e.n_tokens, 1))
                toks[i] += e.n_tokens
                stp[i] += 1
                if not _done(task, problems[i], sols[i], e.finished, sp):
                    nxt.append(i)
            live = nxt

    generate(list(range(P)))
    history: list[list[list[str]]] = [[list(s)] for s in sols]
    hist_scores: list[list[float]] = [[] for _ in range(P)]
    todo = list(range(P))
    for _ in range(sp.rounds + 1):
        if not todo:
            break
        if sp.critic == "prm":
            sc = scorer.score([problems[i] for i in todo], [sols[i] for i in todo])
        else:
            sc = [[math.exp(x) for x in lps[i]] for i in todo]
        flagged = []
        for i, x in zip(todo, sc):
            calls[i] += int(sp.critic == "prm")
            hist_scores[i].append(aggregate(x, sp.agg) if x else 0.0)
            bad = next((k for k, v in enumerate(x) if v < sp.threshold), None)
            if bad is None or rounds[i] >= sp.rounds:
                continue
            rounds[i] += 1
            sols[i], lps[i] = sols[i][:bad], lps[i][:bad]
            flagged.append(i)
        generate(flagged)
        for i in flagged:
            history[i].append(list(sols[i]))
        todo = flagged
    out = []
    for i, p in enumerate(problems):
        r = _result(task, p, [sols[i]], [hist_scores[i][-1] if hist_scores[i] else 0.0], "argmax", toks[i], stp[i],
                    calls[i], _max_depth(task, p, sp), rounds=rounds[i])
        r.completions = history[i]
        out.append(r)
    return out


ALGOS: dict[str, Callable[..., list[SearchResult]]] = {
    "greedy": greedy, "majority": majority, "bon": best_of_n, "weighted_bon": weighted_best_of_n,
    "beam": beam, "dvts": dvts, "mcts": mcts, "revise": revise,
}
"""Search methods (CLI choices)."""

NEEDS_SCORER = {"bon", "weighted_bon", "beam", "dvts", "mcts"}


def run_search(algo: str, problems: list, policy: Any, task: Any, scorer: Any, sp: SearchParams
               ) -> list[SearchResult]:
    if algo not in ALGOS:
        raise LmlabError(f"unknown search algo {algo!r}; choose from {sorted(ALGOS)}")
    sp.validate()
    if scorer is None and (algo in NEEDS_SCORER or (algo == "revise" and sp.critic == "prm")):
        raise LmlabError(f"search algo {algo!r} needs a scorer (PRM/ORM/verifier)")
    return ALGOS[algo](problems, policy, task, scorer, sp)


def summarize(task: Any, problems: list, results: list[SearchResult]) -> dict[str, Any]:
    """Accuracy (+ bootstrap CI), pass@ (any candidate correct), search gap, mean tokens / steps / RM calls."""
    from lmlab.core.metrics import bootstrap_ci

    ok = np.array([r.answer is not None and r.answer == p.answer for p, r in zip(problems, results)], float)
    cover = np.array([any(task.check(p, s) for s in r.completions) for p, r in zip(problems, results)], float)
    acc, lo, hi = bootstrap_ci(ok, n=1000)
    return {"accuracy": acc, "ci": [lo, hi], "pass": float(cover.mean()), "search_gap": float(cover.mean() - acc),
            "tokens": float(np.mean([r.tokens for r in results])), "steps": float(np.mean([r.steps for r in results])),
            "rm_calls": float(np.mean([r.rm_calls for r in results])),
            "hit_max_depth": float(np.mean([r.hit_max_depth for r in results]))}


def by_difficulty(task: Any, problems: list, results: list[SearchResult]) -> dict[str, float]:
    bins: dict[int, list[float]] = {}
    for p, r in zip(problems, results):
        bins.setdefault(task.difficulty(p), []).append(float(r.answer == p.answer))
    return {str(k): float(np.mean(v)) for k, v in sorted(bins.items())}


# --------------------------------------------------------------------------------------------------------------
# lmlab reason search / lmlab reason scaling


@dataclass
class SearchConfig(RunArgs):
    """Run one test-time search method on held-out problems."""

    policy: str = ""
    """Policy folder from 'lmlab reason sft', any HF causal LM, or openai:URL[#model] (OpenAI-compatible server)."""
    scorer: str = "gold"
    """gold (oracle first-error labels) | outcome (the verifier) | an RM folder from 'lmlab reason rm'."""
    algo: str = "weighted_bon"
    """greedy | majority | bon | weighted_bon | beam | dvts | mcts | revise."""
    task: str = "column_add"
    """Task: column_add | countdown | jsonl."""
    difficulty: int = 6
    """Digits (column_add) or numbers (countdown)."""
    problems: str = ""
    """JSONL problems (task=jsonl)."""
    n_test: int = 300
    """Held-out test problems."""
    search: SearchParams = field(default_factory=SearchParams)
    """Search knobs (search.n, search.m, search.agg, search.final, search.c, search.widen, ...)."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algo not in ALGOS:
            raise ConfigError(f"algo must be one of {sorted(ALGOS)}, got {self.algo!r}")
        if self.n_test < 1:
            raise ConfigError(f"n_test must be >= 1, got {self.n_test}")
        self.search.validate()


def load_policy(spec: str, device: Any = "cpu", trust_remote_code: bool = False) -> Any:
    from lmlab.reason.policy import LMPolicy, OpenAIPolicy, load_lm

    if spec.startswith("openai:"):
        url, _, name = spec[len("openai:"):].partition("#")
        return OpenAIPolicy(url, name or "default")
    model, tok = load_lm(spec, device, trust_remote_code)
    return LMPolicy(model, tok)


def _setup(cfg: Any):
    from lmlab.core.runtime import setup
    from lmlab.reason.policy import build_task, split_problems
    from lmlab.reason.reward import load_scorer

    if not cfg.policy:
        raise ConfigError("give a policy: a folder from 'lmlab reason sft', a model spec, or openai:URL[#model]")
    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    task = build_task(cfg.task, cfg.difficulty, cfg.problems)
    policy = load_policy(cfg.policy, dev, cfg.trust_remote_code)
    scorer = load_scorer(cfg.scorer, task, dev) if cfg.scorer else None
    _, test = split_problems(task, 0, cfg.n_test, cfg.seed)
    return dev, dtype, threads, task, policy, scorer, test


def main(cfg: SearchConfig) -> Path:
    from lmlab.core.runs import start_run

    dev, dtype, threads, task, policy, scorer, test = _setup(cfg)
    with start_run(cfg, "reason-search", device=dev, dtype=dtype, threads=threads) as run:
        res = run_search(cfg.algo, test, policy, task, scorer, cfg.search)
        summ = summarize(task, test, res)
        summ["by_difficulty"] = by_difficulty(task, test, res)
        log.info("%s@%d: accuracy %.3f (pass %.3f), %.0f tokens/problem", cfg.algo, cfg.search.n, summ["accuracy"],
                 summ["pass"], summ["tokens"])
        run.write_samples([{"prompt": p.prompt, "answer": p.answer, "pred": r.answer, "chosen": "".join(r.chosen),
                            "n_candidates": len(r.completions), "tokens": r.tokens, "rm_calls": r.rm_calls,
                            "hit_max_depth": r.hit_max_depth} for p, r in zip(test, res)])
        run.finish({"algo": cfg.algo, "n": cfg.search.n, **summ})
    return run.path


@dataclass
class ScalingConfig(RunArgs):
    """Accuracy vs generated tokens for several search methods at budgets 1, 2, 4, ..., N."""

    policy: str = ""
    """Policy folder from 'lmlab reason sft' (or any HF causal LM / openai:URL)."""
    scorer: str = "gold"
    """gold | outcome | RM folder from 'lmlab reason rm'."""
    methods: list[str] = field(default_factory=lambda: ["majority", "bon", "weighted_bon", "beam", "dvts", "mcts"])
    """Methods to sweep (keys of ALGOS)."""
    budgets: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    """Budgets N (BoN family: sampled once at max N and subsampled)."""
    task: str = "column_add"
    """Task: column_add | countdown | jsonl."""
    difficulty: int = 6
    """Digits (column_add) or numbers (countdown)."""
    problems: str = ""
    """JSONL problems with answers (task=jsonl)."""
    n_test: int = 300
    """Held-out test problems."""
    search: SearchParams = field(default_factory=SearchParams)
    """Search knobs (search.n, search.m, search.agg, search.final, search.c, search.widen, ...)."""
    trust_remote_code: bool = False
    """Allow custom modelling code (only for a source you trust)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [m for m in self.methods if m not in ALGOS]
        if bad or not self.methods:
            raise ConfigError(f"unknown methods {bad}; choose from {sorted(ALGOS)}")
        if not self.budgets or min(self.budgets) < 1:
            raise ConfigError(f"budgets must be >= 1, got {self.budgets}")
        self.search.validate()


def scaling_curves(problems: list, policy: Any, task: Any, scorer: Any, methods: list[str], budgets: list[int],
                   sp: SearchParams, progress: bool = True) -> dict[str, dict[str, Any]]:
    """{method: {str(N): summary}} with BoN-family methods subsampled from one pool at max N."""
    from tqdm.auto import tqdm

    budgets = sorted(set(budgets))
    out: dict[str, dict[str, Any]] = {}
    pool_rules = {"majority": "majority", "bon": "argmax", "weighted_bon": "weighted"}
    pooled = [m for m in methods if m in pool_rules]
    if pooled:
        pool = sample_pool(problems, policy, task, max(budgets), sp.temperature, sp)
        sel = select_from_pool(problems, task, pool, scorer, [pool_rules[m] for m in pooled], budgets, sp)
        for m in pooled:
            out[m] = {}
            for n in budgets:
                s = summarize(task, problems, sel[pool_rules[m]][n])
                s["by_difficulty"] = by_difficulty(task, problems, sel[pool_rules[m]][n])
                out[m][str(n)] = s
    rest = [(m, n) for m in methods if m not in pool_rules for n in budgets]
    for m, n in tqdm(rest, desc="search sweep", disable=not progress, leave=False):
        if m == "greedy" and n != budgets[0]:
            continue
        spn = dataclasses.replace(sp, n=n)
        if m in ("beam", "dvts") and n < spn.m:
            spn.m = n
        res = run_search(m, problems, policy, task, scorer, spn)
        s = summarize(task, problems, res)
        s["by_difficulty"] = by_difficulty(task, problems, res)
        out.setdefault(m, {})[str(n)] = s
    return out


def scaling_plot(path: Path, curves: dict[str, dict[str, Any]], title: str = "") -> Path:
    from lmlab.core.plotting import line_plot

    xs = {m: [c[k]["tokens"] for k in sorted(c, key=int)] for m, c in curves.items()}
    ys = {m: [c[k]["accuracy"] for k in sorted(c, key=int)] for m, c in curves.items()}
    return line_plot(path, xs, ys, title=title or "accuracy vs generated tokens", xlabel="generated tokens / problem",
                     ylabel="accuracy", logx=True)


def scaling_main(cfg: ScalingConfig) -> Path:
    from lmlab.core.runs import start_run

    dev, dtype, threads, task, policy, scorer, test = _setup(cfg)
    with start_run(cfg, "reason-scaling", device=dev, dtype=dtype, threads=threads) as run:
        curves = scaling_curves(test, policy, task, scorer, cfg.methods, cfg.budgets, cfg.search)
        for m, c in curves.items():
            for n, s in c.items():
                run.log({"method": m, "n": int(n), **{k: v for k, v in s.items() if k != "by_difficulty"}})
        scaling_plot(run.plots / "scaling.png", curves, f"{cfg.task} (scorer {Path(cfg.scorer).name})")
        run.finish({"budgets": cfg.budgets, "curves": curves, "n_test": len(test)})
    return run.path


# --------------------------------------------------------------------------------------------------------------
# lmlab tour section


def tour_section(cfg: Any, out: Path) -> tuple[Path, str]:
    """Reasoning: SFT a tiny policy on a majority-wrong teacher, then accuracy vs test-time compute per method.

    Quick: 4-digit addition, 250 SFT steps, oracle (gold) PRM, 100 problems, N in 1, 4, 16. Full: 6 digits,
    1500 SFT steps, a PRM trained on 10k gold-labelled policy solutions, 300 problems, N up to 64."""
    from lmlab.core.runs import start_run
    from lmlab.core.runtime import setup
    from lmlab.reason.policy import LMPolicy, build_task, demonstrations, load_lm, rollout, sft, split_problems
    from lmlab.reason.reward import GoldScorer, RewardModel, RMScorer, train_rm

    dev, dtype, threads = setup(cfg.seed, cfg.device, cfg.dtype, cfg.threads)
    full = bool(getattr(cfg, "full", False))
    digits, steps, n_test, budgets = (6, 1500, 300, [1, 4, 16, 64]) if full else (4, 250, 100, [1, 4, 16])
    sub = RunArgs(out=str(out), device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    task = build_task("column_add", digits, q_sys=0.6, q_rand=0.03)
    with start_run(sub, "tour-reason", device=dev, dtype=dtype, threads=threads) as run:
        train, test = split_problems(task, 60_000 if full else 20_000, n_test, cfg.seed)
        prompts, comps = demonstrations(task, train, cfg.seed)
        model, tok = load_lm("tiny", dev)
        losses = sft(model, tok, prompts, comps, steps, 128 if full else 64, 3e-3, 100 if full else 30, seed=cfg.seed)
        policy = LMPolicy(model, tok)
        scorer: Any = GoldScorer(task)
        if full:
            rm_probs = train[:10_000]
            sols = [r[0] for r in rollout(policy, task, rm_probs, [[] for _ in rm_probs], 1)]
            rm = RewardModel.from_policy(model)
            train_rm(rm, tok, rm_probs, sols, [[float(x) for x in task.step_labels(p, s)] for p, s in
                                               zip(rm_probs, sols)], steps=300)
            scorer = RMScorer(rm, tok)
        methods = ["majority", "weighted_bon", "beam", "dvts", "mcts"]
        curves = scaling_curves(test, policy, task, scorer, methods, budgets, SearchParams(widen=0.5))
        scaling_plot(run.plots / "scaling.png", curves,
                     f"{digits}-digit addition, noisy-teacher policy, {'trained' if full else 'oracle'} PRM")
        run.finish({"digits": digits, "sft_steps": steps, "final_sft_loss": losses[-1], "curves": curves,
                    "scorer": "gold-10k PRM" if full else "gold oracle"})
    top = str(max(budgets))
    lines = [f"{digits}-digit column addition; policy SFT'd ({steps} steps) on a teacher that forgets carries 60% "
             f"of the time; {len(test)} test problems.",
             "accuracy at N=1 -> N=" + top + ": " + ", ".join(
                 f"{m} {curves[m]['1']['accuracy']:.2f} -> {curves[m][top]['accuracy']:.2f}" for m in methods)]
    return run.path, "\n".join(lines)
