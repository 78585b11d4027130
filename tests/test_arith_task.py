"""The synthetic arithmetic task: problems, the two solution styles, step checking (winner precision), splits."""

from __future__ import annotations

import random

import ml_collections
import pytest

from rpo.data import get_task
from rpo.data.synthetic import (Problem, check_steps, completion_steps, make_problem, question_steps)


def _cfg(**kw):
    fields = dict(name="arith", seed=0, num_train=300, num_test=200, min_steps=3, max_steps=3, max_value=99,
                  ops="+-*", style="prose", strict=True)
    return ml_collections.ConfigDict({**fields, **kw})


def test_problems_stay_in_range_and_read_back_from_their_text():
    rng = random.Random(1)
    seen_ops = set()
    for _ in range(2000):
        p = make_problem(rng, min_steps=1, max_steps=4, max_value=50, ops="+-*")
        assert 1 <= len(p.steps) <= 4
        for a, op, b, c in p.steps:
            assert 1 <= a <= 50 and 1 <= c <= 50
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
            seen_ops.add(op)
        assert [s[0] for s in p.steps[1:]] == [s[3] for s in p.steps[:-1]]  # a chain
        assert question_steps(p.question) == p.steps
    assert seen_ops == {"+", "-", "*"}


def test_both_styles_write_the_same_steps_and_answer():
    p = Problem(((23, "+", 15, 38), (38, "-", 9, 29), (29, "*", 2, 58)))
    assert p.question == "23 +15 -9 *2"
    assert p.solution("equations") == "23+15=38. 38-9=29. 29*2=58. Final answer: 58"
    assert p.solution("prose") == "23 + 15 = 38, 38 - 9 = 29, 29 x 2 = 58. Final answer: 58"
    for style in ("equations", "prose"):
        assert completion_steps(p.solution(style)) == p.steps
        assert check_steps(p.solution(style), p.question)
    with pytest.raises(ValueError, match="task.style"):
        p.solution("latex")


@pytest.mark.parametrize("completion, ok", [
    ("23+15=38. 38-9=29. 29*2=58. Final answer: 58", True),
    ("23+15=38. 38-9=29. 29*2=58. Final answer: 57", True),  # the steps are right; the answer line is scored apart
    ("23+15=39. 39-9=30. 30*2=60. Final answer: 60", False),  # a wrong sum, carried on consistently
    ("23+15=38. 38-8=30. 30*2=60. Final answer: 60", False),  # an operand miscopied
    ("23+15=38. 38-9=29. Final answer: 29", False),  # a step missing
    ("23+15=38. 38-9=29. 29*2=58. 58+1=59. Final answer: 59", False),  # a step too many
    ("23+15=39. 39-9=29. 29*2=58. Final answer: 58", False),  # right answer by luck: two errors that cancel
    ("Final answer: 58", False),
])
def test_check_steps_accepts_only_the_exact_chain(completion, ok):
    assert check_steps(completion, "23 +15 -9 *2") is ok


def test_a_lucky_answer_is_correct_for_the_reward_but_not_for_the_steps():
    task = get_task(_cfg())
    ex = task.load("train")[0]
    steps = question_steps(ex.question)
    a, op, b, c = steps[0]
    # First step off by one, then a second error that lands back on the true chain.
    lucky = f"{a}{op}{b}={c + 1}. " + " ".join(f"{x}{o}{y}={z}." for x, o, y, z in steps[1:]) + f" Final answer: {ex.answer}"
    _, correct = task.score([lucky], [ex])
    assert correct == [True] and task.steps_correct([lucky], [ex]) == [False]
    assert task.steps_correct([task.target(ex)], [ex]) == [True]


def test_splits_are_seeded_disjoint_and_in_the_gold_style():
    task = get_task(_cfg())
    train, test = task.load("train"), task.load("test")
    assert len(train) == 300 and len(test) == 200
    assert not {e.question for e in train} & {e.question for e in test}
    assert [e.question for e in get_task(_cfg()).load("test")] == [e.question for e in test]
    assert [e.question for e in get_task(_cfg(seed=1)).load("test")] != [e.question for e in test]
    assert all(", " in e.solution and e.solution.endswith(f"Final answer: {e.answer}") for e in train)
    eq = get_task(_cfg(style="equations")).load("train")
    assert [e.question for e in eq] == [e.question for e in train] and all(" " not in e.solution.split(" Final")[0]
                                                                         .replace(". ", ".") for e in eq)


@pytest.mark.parametrize("field, value, message", [
    ("style", "latex", "task.style"), ("ops", "+", "task.ops"), ("min_steps", 4, "task.min_steps"),
    ("num_test", 0, "task.num_test"), ("max_value", 5, "task.max_value"),
])
def test_bad_task_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        get_task(_cfg(**{field: value}))


def test_question_text_that_is_not_a_problem_is_named():
    with pytest.raises(ValueError, match="not an arith problem"):
        question_steps("Mia has 3 pens")
