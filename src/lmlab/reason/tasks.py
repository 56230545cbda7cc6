"""Verifiable step-by-step tasks for reasoning search and RL (the "environment" of the o1 roadmap).

Scaling of Search and Learning: A Roadmap to Reproduce o1 from Reinforcement Learning Perspective
(Zeng et al., arXiv 2412.14135) treats an LLM as a policy pi(a|s) whose state s is the question plus the steps so
far and whose action is the next step. Search and RL then need an environment with an **exact verifier**. This
module provides three:

* ``column_add`` (the measured CPU testbed, spec section 3): two D-digit numbers, one step per column,
  least-significant first. A step is ``i o s|``: i = carry-in as written, (o, s) = divmod(a_k + b_k + i, 10)::

      Q648595+508878:013|117|114|117|105|011|        (answer = 1157473)

  Fixed length, so every prefix at depth k has the same length. Gold *first-error* step labels come from a step
  checker. The demonstration synthesizer is a **systematic, majority-wrong teacher**: with probability ``q_sys``
  it forgets an incoming carry (writes i = 0 and computes consistently from there), and with ``q_rand`` it
  replaces a step by a random one. ``behaviours`` injects the roadmap's human-like reasoning behaviours (P3):
  *self-correction* (an erroneous step, then ``!`` + the corrected step) and *alternative proposal*
  (a correct step, then ``?`` + an alternative that is also correct). A step starting with ``!``/``?`` replaces
  the previous step (:func:`effective_steps`).
* ``countdown`` (search over choices): reach a target from numbers with + - * (each used at most once); a step is
  ``a*b=c|``; gold step label = the state is still solvable (exact, by brute force).
* ``jsonl``: user problems ``{"question": ..., "answer": ...}`` (GSM8K ``#### 42`` or MATH ``\\boxed{..}``);
  steps are separated by a blank line; the checker compares normalized final answers.

Every task implements the same small interface (used by policy.py, reward.py, search.py and the RL issue):
``sample(n, rng) -> list[Problem]``, ``solution(problem) -> list[str]``, ``step_sep``, ``max_steps(problem)``,
``is_terminal(problem, steps)``, ``extract_answer(problem, steps) -> str | None`` (None on malformed text),
``check(problem, steps) -> bool``, ``step_labels(problem, steps) -> list[int] | None`` (gold first-error labels).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

CORRECT, ALTERNATIVE = "!", "?"
"""Markers of the injected behaviours: ``!`` reflection + correction, ``?`` alternative proposal."""


@dataclass
class Problem:
    """One problem: the prompt the policy continues, the reference answer and task-specific data."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def effective_steps(steps: list[str]) -> list[str]:
    """Apply retractions: a step starting with ``!`` or ``?`` replaces the step before it."""
    out: list[str] = []
    for s in steps:
        if s[:1] in (CORRECT, ALTERNATIVE):
            if out:
                out.pop()
            s = s[1:]
        out.append(s)
    return out


def split_steps(text: str, sep: str) -> list[str]:
    """Split generated text into steps, each keeping its separator (an unterminated tail is a step too)."""
    parts = text.split(sep)
    steps = [p + sep for p in parts[:-1]]
    if parts[-1]:
        steps.append(parts[-1])
    return steps


# --------------------------------------------------------------------------------------------------------------
# column addition with a visible carry


def _add_steps(a: int, b: int, digits: int, forget: list[bool] | None = None) -> list[str]:
    """Steps ``i o s|`` for a + b; ``forget[k]`` writes i = 0 at column k (the systematic error)."""
    steps, carry = [], 0
    for k in range(digits):
        ak, bk = a // 10**k % 10, b // 10**k % 10
        i = 0 if (forget and forget[k]) else carry
        o, s = divmod(ak + bk + i, 10)
        steps.append(f"{i}{o}{s}|")
        carry = o
    return steps


@dataclass
class ColumnAdd:
    """Column addition of two ``digits``-digit numbers with a visible carry (``i o s|`` per column)."""

    digits: int = 6
    q_sys: float = 0.0
    """Demonstrations forget an incoming carry with this probability (systematic teacher error)."""
    q_rand: float = 0.0
    """Each demonstration step is replaced by a random step with this probability."""
    behaviours: float = 0.0
    """Probability per step of injecting a behaviour (self-correction or alternative proposal) into a demo."""
    name: str = "column_add"
    step_sep: str = "|"
    step_chars: int = 5
    """Upper bound on the characters in one step (``!013|``)."""

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 30:
            raise LmlabError(f"column_add: digits must be in 1..30, got {self.digits}")
        for k in ("q_sys", "q_rand", "behaviours"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise LmlabError(f"column_add: {k} must be in [0, 1], got {getattr(self, k)}")

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        out = []
        for _ in range(n):
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            out.append(Problem(f"Q{a}+{b}:", str(a + b), {"a": a, "b": b, "carries": self.carries(a, b)}))
        return out

    def carries(self, a: int, b: int) -> int:
        """Difficulty of a problem: the number of columns with an incoming carry."""
        steps = _add_steps(a, b, self.digits)
        return sum(s[0] == "1" for s in steps)

    def difficulty(self, p: Problem) -> int:
        return int(p.meta["carries"])

    def solution(self, p: Problem) -> list[str]:
        return _add_steps(p.meta["a"], p.meta["b"], self.digits)

    def demonstration(self, p: Problem, rng: random.Random) -> list[str]:
        """A noisy teacher's demonstration (q_sys, q_rand) with optional injected behaviours."""
        a, b = p.meta["a"], p.meta["b"]
        steps, carry = [], 0
        for k in range(self.digits):
            ak, bk = a // 10**k % 10, b // 10**k % 10
            i = 0 if (carry == 1 and rng.random() < self.q_sys) else carry
            o, s = divmod(ak + bk + i, 10)
            step = f"{i}{o}{s}|"
            if rng.random() < self.q_rand:
                step = f"{rng.randint(0, 1)}{rng.randint(0, 1)}{rng.randint(0, 9)}|"
                o = int(step[1])
            if self.behaviours and rng.random() < self.behaviours:
                good_o, good_s = divmod(ak + bk + carry, 10)
                good = f"{carry}{good_o}{good_s}|"
                if step != good:  # self-correction: the error, then reflection + the corrected step
                    steps += [step, CORRECT + good]
                else:  # the erroneous alternative first, then "?" + the correct one
                    wrong_s = (good_s + 1 + rng.randint(0, 8)) % 10
                    steps += [f"{carry}{good_o}{wrong_s}|", ALTERNATIVE + good]
                o = good_o
            else:
                steps.append(step)
            carry = o
        return steps

    def max_steps(self, p: Problem) -> int:
        return 2 * self.digits  # room for retractions

    def is_terminal(self, p: Problem, steps: list[str]) -> bool:
        return len(effective_steps(steps)) >= self.digits or len(steps) >= self.max_steps(p)

    def parse_step(self, step: str) -> tuple[int, int, int] | None:
        m = re.fullmatch(r"([01])([01])(\d)\|", step)
        return (int(m[1]), int(m[2]), int(m[3])) if m else None

    def extract_answer(self, p: Problem, steps: list[str]) -> str | None:
        eff = effective_steps(steps)
        if len(eff) != self.digits:
            return None
        parsed = [self.parse_step(s) for s in eff]
        if any(x is None for x in parsed):
            return None
        digits = "".join(str(x[2]) for x in reversed(parsed))  # type: ignore[index]
        return str(int(str(parsed[-1][1]) + digits))  # type: ignore[index]

    def check(self, p: Problem, steps: list[str]) -> bool:
        return self.extract_answer(p, steps) == p.answer

    def step_labels(self, p: Problem, steps: list[str]) -> list[int]:
        """Gold first-error labels on the *written* steps: 1 until the first wrong (effective) step, then 0.

        A step is right when its (i, o, s) equals the true column values; a ``!``/``?`` step is judged as the step
        it replaces."""
        gold = self.solution(p)
        labels, ok, depth = [], True, 0
        for s in steps:
            if s[:1] in (CORRECT, ALTERNATIVE):
                depth = max(depth - 1, 0)
                s = s[1:]
            ok = ok and depth < len(gold) and s == gold[depth]
            labels.append(int(ok))
            depth += 1
        return labels


# --------------------------------------------------------------------------------------------------------------
# countdown: reach a target with + - * over given numbers (search over choices)

_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


@lru_cache(maxsize=200_000)
def _solve(nums: tuple[int, ...], target: int) -> tuple[str, ...] | None:
    """A shortest list of steps reaching ``target`` from the multiset ``nums`` (None if unreachable)."""
    if target in nums:
        return ()
    best = None
    for i, j in itertools.permutations(range(len(nums)), 2):
        for op, f in _OPS.items():
            if op in "+*" and i > j:
                continue
            c = f(nums[i], nums[j])
            if c < 0:
                continue
            rest = tuple(sorted([n for k, n in enumerate(nums) if k not in (i, j)] + [c]))
            sub = _solve(rest, target)
            if sub is not None and (best is None or len(sub) + 1 < len(best)):
                best = (f"{nums[i]}{op}{nums[j]}={c}|", *sub)
    return best


@dataclass
class Countdown:
    """Countdown: combine ``n_numbers`` numbers (1..``max_number``) with + - * to reach the target."""

    n_numbers: int = 4
    max_number: int = 9
    name: str = "countdown"
    step_sep: str = "|"
    step_chars: int = 12

    def __post_init__(self) -> None:
        if not 2 <= self.n_numbers <= 5:
            raise LmlabError(f"countdown: n_numbers must be in 2..5, got {self.n_numbers}")

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        out = []
        while len(out) < n:
            nums = tuple(sorted(rng.randint(1, self.max_number) for _ in range(self.n_numbers)))
            target = rng.randint(10, 10 * self.max_number)
            sol = _solve(nums, target)
            if sol:
                out.append(Problem(f"C{','.join(map(str, nums))}>{target}:", str(target),
                                   {"nums": list(nums), "target": target, "min_steps": len(sol)}))
        return out

    def difficulty(self, p: Problem) -> int:
        return int(p.meta["min_steps"])

    def solution(self, p: Problem) -> list[str]:
        return list(_solve(tuple(p.meta["nums"]), p.meta["target"]) or ())

    def max_steps(self, p: Problem) -> int:
        return self.n_numbers - 1

    def _run(self, p: Problem, steps: list[str]) -> list[tuple[int, ...] | None]:
        """Multiset of numbers after each step (None from the first illegal step on)."""
        pool, out = list(p.meta["nums"]), []
        for s in steps:
            m = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)\|", s)
            if pool is None or m is None:
                pool = None
                out.append(None)
                continue
            x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
            rest = list(pool)
            try:
                rest.remove(x)
                rest.remove(y)
            except ValueError:
                pool = None
                out.append(None)
                continue
            if _OPS[op](x, y) != z:
                pool = None
                out.append(None)
                continue
            pool = sorted(rest + [z])
            out.append(tuple(pool))
        return out

    def is_terminal(self, p: Problem, steps: list[str]) -> bool:
        states = self._run(p, steps)
        return len(steps) >= self.max_steps(p) or (bool(states) and (states[-1] is None
                                                                      or p.meta["target"] in states[-1]))

    def extract_answer(self, p: Problem, steps: list[str]) -> str | None:
        states = self._run(p, steps)
        if not states or states[-1] is None:
            return None
        m = re.fullmatch(r".*=(\d+)\|", steps[-1])
        return m[1] if m else None

    def check(self, p: Problem, steps: list[str]) -> bool:
        return self.extract_answer(p, steps) == p.answer

    def step_labels(self, p: Problem, steps: list[str]) -> list[int]:
        """1 while the state is legal and the target is still reachable (exact), else 0 from there on."""
        labels, ok = [], True
        for st in self._run(p, steps):
            ok = ok and st is not None and _solve(st, p.meta["target"]) is not None
            labels.append(int(ok))
        return labels


# --------------------------------------------------------------------------------------------------------------
# user JSONL problems (GSM8K / MATH style)

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def normalize_answer(text: str | None) -> str | None:
    """Final-answer normalization: strip $, commas, spaces, trailing '.', units-free numbers as canonical floats."""
    if text is None:
        return None
    t = text.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    t = t.replace("\\!", "").replace("\\left", "").replace("\\right", "")
    if not t:
        return None
    try:
        x = float(t)
        return str(int(x)) if x.is_integer() else repr(x)
    except ValueError:
        return t.lower()


def extract_final(text: str) -> str | None:
    """Final answer in free text: ``\\boxed{..}``, ``#### x``, ``answer is x``, else the last number."""
    boxed = _BOXED.findall(text)
    if boxed:
        return normalize_answer(boxed[-1])
    m = re.search(r"####\s*([^\n]+)", text)
    if m:
        return normalize_answer(m[1])
    m = re.search(r"answer is[:\s]*\$?([^\s$]+)", text, flags=re.I)
    if m:
        return normalize_answer(m[1])
    nums = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return normalize_answer(nums[-1]) if nums else None


@dataclass
class JsonlTask:
    """User problems from a JSONL file with ``question`` and ``answer`` (or ``problem``/``solution``) fields."""

    path: str = ""
    step_sep: str = "\n\n"
    max_steps_: int = 16
    name: str = "jsonl"
    step_chars: int = 400
    problems: list[Problem] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.path and not self.problems:
            self.problems = load_jsonl_problems(self.path)

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        if not self.problems:
            raise LmlabError("jsonl task has no problems")
        return rng.sample(self.problems, min(n, len(self.problems)))

    def difficulty(self, p: Problem) -> int:
        return int(p.meta.get("level", 0))

    def solution(self, p: Problem) -> list[str]:
        sol = p.meta.get("solution")
        return split_steps(sol, self.step_sep) if sol else []

    def max_steps(self, p: Problem) -> int:
        return self.max_steps_

    def is_terminal(self, p: Problem, steps: list[str]) -> bool:
        if len(steps) >= self.max_steps_:
            return True
        return bool(steps) and (not steps[-1].endswith(self.step_sep) or extract_final(steps[-1]) is not None
                                and ("\\boxed" in steps[-1] or "####" in steps[-1]))

    def extract_answer(self, p: Problem, steps: list[str]) -> str | None:
        return extract_final("".join(steps)) if steps else None

    def check(self, p: Problem, steps: list[str]) -> bool:
        got = self.extract_answer(p, steps)
        return got is not None and got == normalize_answer(p.answer)

    def step_labels(self, p: Problem, steps: list[str]) -> None:
        return None


def load_jsonl_problems(path: str | Path, prompt_template: str = "Question: {q}\nAnswer: ") -> list[Problem]:
    """Read ``{"question", "answer"}`` (GSM8K: the answer's ``#### x`` is the final answer) or
    ``{"problem", "solution"|"answer"}`` (MATH) rows. A row without an answer is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"problem file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path}:{n}: not JSON ({e.msg})") from None
        q = row.get("question", row.get("problem"))
        raw = row.get("answer", row.get("solution"))
        if not q or raw is None or str(raw).strip() == "":
            raise LmlabError(f"{path}:{n}: a problem needs 'question' (or 'problem') and a non-empty 'answer'")
        final = extract_final(str(raw)) if ("####" in str(raw) or "\\boxed" in str(raw)) else normalize_answer(
            str(raw))
        if final is None:
            raise LmlabError(f"{path}:{n}: cannot read a final answer from {str(raw)[:40]!r}")
        sol = str(raw).split("####")[0].strip() if "####" in str(raw) else row.get("solution")
        out.append(Problem(prompt_template.format(q=q), final, {"solution": sol, "level": row.get("level", 0)}))
    if not out:
        raise LmlabError(f"{path} holds no problems")
    return out


TASKS = {"column_add": ColumnAdd, "countdown": Countdown, "jsonl": JsonlTask}
"""Task registry (CLI choices)."""


def make_task(name: str, difficulty: int | None = None, **kw: Any):
    """Build a task by name; ``difficulty`` = digits (column_add) or n_numbers (countdown)."""
    if name not in TASKS:
        raise LmlabError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if difficulty is not None:
        kw[{"column_add": "digits", "countdown": "n_numbers", "jsonl": "max_steps_"}[name]] = difficulty
    return TASKS[name](**kw)
