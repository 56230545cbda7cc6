"""Tasks: exact checkers, gold first-error labels, malformed answers, JSONL loader."""

from __future__ import annotations

import json
import random

import pytest

from lmlab.errors import LmlabError
from lmlab.reason.tasks import (
    ColumnAdd,
    Countdown,
    JsonlTask,
    effective_steps,
    extract_final,
    load_jsonl_problems,
    make_task,
    normalize_answer,
    split_steps,
)


def test_column_add_solution_is_correct_and_fixed_length():
    task = ColumnAdd(6)
    for p in task.sample(200, random.Random(0)):
        sol = task.solution(p)
        assert len(sol) == 6 and all(len(s) == 4 for s in sol)
        assert task.check(p, sol) and task.extract_answer(p, sol) == str(p.meta["a"] + p.meta["b"])
        assert task.step_labels(p, sol) == [1] * 6
        assert task.difficulty(p) == sum(s[0] == "1" for s in sol)
    p = ColumnAdd(6).sample(1, random.Random(1))[0]
    assert p.prompt == f"Q{p.meta['a']}+{p.meta['b']}:"


def test_known_example():
    task = ColumnAdd(6)
    p = [q for q in task.sample(1, random.Random(0))][0]
    p.meta.update(a=648595, b=508878)
    p.answer = str(648595 + 508878)
    assert "".join(task.solution(p)) == "013|117|114|117|105|011|"


def test_gold_labels_are_first_error():
    task = ColumnAdd(4)
    p = task.sample(1, random.Random(3))[0]
    sol = task.solution(p)
    bad = sol[:1] + ["999|"] + sol[2:]
    assert task.step_labels(p, bad) == [1, 0, 0, 0]
    assert not task.check(p, bad)
    # a correction step replaces the wrong step and restores the labels after it
    fixed = sol[:1] + ["000|", "!" + sol[1]] + sol[2:]
    assert effective_steps(fixed) == sol
    assert task.check(p, fixed)
    assert task.step_labels(p, fixed)[0] == 1


@pytest.mark.parametrize("steps", [[], ["01"], ["abc|"] * 6, ["013|"] * 5, ["0134|"] * 6, ["!"], ["2x9|"] * 6])
def test_malformed_answers_are_wrong_not_errors(steps):
    task = ColumnAdd(6)
    p = task.sample(1, random.Random(0))[0]
    assert task.extract_answer(p, steps) is None
    assert task.check(p, steps) is False


def test_noisy_teacher_rates():
    task = ColumnAdd(6, q_sys=0.6, q_rand=0.0)
    rng = random.Random(0)
    probs = task.sample(2000, rng)
    forgot = total = 0
    for p in probs:
        demo, gold = task.demonstration(p, rng), task.solution(p)
        # the first carry-in column: the teacher forgets with probability q_sys
        k = next((j for j, g in enumerate(gold) if g[0] == "1"), None)
        if k is not None and demo[:k] == gold[:k]:
            total += 1
            forgot += demo[k][0] == "0"
    assert abs(forgot / total - 0.6) < 0.04


def test_behaviours_injected():
    task = ColumnAdd(6, q_sys=0.6, behaviours=1.0)
    rng = random.Random(0)
    for p in task.sample(50, rng):
        demo = task.demonstration(p, rng)
        assert len(demo) == 12 and all(s[0] in "!?" for s in demo[1::2])
        assert task.check(p, demo)  # every injected behaviour ends in the correct step


def test_countdown():
    task = Countdown(4)
    for p in task.sample(30, random.Random(0)):
        sol = task.solution(p)
        assert task.check(p, sol) and task.step_labels(p, sol) == [1] * len(sol)
        assert task.is_terminal(p, sol)
    p = task.sample(1, random.Random(1))[0]
    assert task.step_labels(p, ["1*1=5|"]) == [0]
    assert task.extract_answer(p, ["garbage"]) is None


def test_jsonl_loader(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"question": "2+3?", "answer": "We add.\n#### 5"},
        {"problem": "x?", "solution": "so $\\boxed{\\frac{1}{2}}$"},
        {"question": "big", "answer": "1,000"},
    ]))
    probs = load_jsonl_problems(f)
    assert [p.answer for p in probs] == ["5", "\\frac{1}{2}", "1000"]
    task = JsonlTask(str(f))
    assert task.check(probs[0], ["First step\n\n", "The answer is 5.0"])
    assert not task.check(probs[0], ["The answer is 6"])
    assert not task.check(probs[0], [])
    assert split_steps("a\n\nb\n\nc", "\n\n") == ["a\n\n", "b\n\n", "c"]
    assert extract_final("x #### 1,234") == "1234" and normalize_answer(" 3.50 ") == "3.5"


def test_jsonl_without_answers_is_one_clear_error(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"question": "2+3?"}) + "\n")
    with pytest.raises(LmlabError, match="p.jsonl:1: .*answer"):
        load_jsonl_problems(f)
    with pytest.raises(LmlabError, match="unknown task"):
        make_task("sudoku")
