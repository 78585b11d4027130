"""rpo.rewards: answer extraction and checking on real GSM8K / MATH500 rows (tests/fixtures) and the
sympy worker pool (timeouts, dead workers). One pool serves the whole file."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from rpo import rewards as R

FIXTURES = Path(__file__).parent / "fixtures"
CALCULATOR = re.compile(r"<<[^<>]*>>")


def _rows(name: str) -> list[dict]:
    with open(FIXTURES / name) as f:
        return [json.loads(line) for line in f]


GSM8K = _rows("gsm8k_rows.jsonl")
MATH = _rows("math_rows.jsonl")


def _gsm8k_parts(row: dict) -> tuple[str, str]:
    """(the worked solution without calculator annotations, the text after '####')."""
    solution, _, gold = row["answer"].rpartition("####")
    return CALCULATOR.sub("", solution).strip(), gold.strip()


def _math_parts(row: dict) -> tuple[str, str]:
    """(the worked solution with its \\boxed{}, the final answer after "The answer is:")."""
    solution, _, final = row["answer"].rpartition("The answer is:")
    return solution, final.strip()


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("row", GSM8K, ids=lambda r: _gsm8k_parts(r)[1])
def test_gsm8k_real_rows(row):
    solution, written = _gsm8k_parts(row)
    value = int(written.replace(",", ""))  # the dataset writes "1,450,000", "-10"
    gold = R.gsm8k_gold(row["answer"])
    assert gold == str(value) == R.gsm8k_gold(written) == R.gsm8k_gold(f"{value:,}")

    def completion(answer: str) -> str:
        return f"{solution}\nFinal answer: {answer}"

    variants = (str(value), f"{value:,}", f"${value}", f"{value}.0", f"{value}.00", f"**{value}**", f"{value} units.")
    for variant in variants:
        assert R.gsm8k_answer(completion(variant), strict=True) == gold, variant
        assert R.gsm8k_answer(completion(variant)) == gold, variant
    assert R.gsm8k_answer(completion(str(value + 1))) != gold
    assert R.gsm8k_answer(completion(f"{value}.5")) != gold
    # The solution alone ends on the answer but has no "Final answer:": only flexible mode reads it.
    assert R.gsm8k_answer(solution, strict=True) is None
    assert R.gsm8k_answer(solution) == gold
    assert R.gsm8k_answer(row["answer"]) == gold  # "#### N" is a flexible-mode marker
    # The public check, against the answer field itself and against the bare number.
    for gold_form in (row["answer"], written, f"{value:,}"):
        assert R.gsm8k_correct(completion(f"${value:,}"), gold_form, strict=True)
        assert not R.gsm8k_correct(completion(str(value + 1)), gold_form)
    assert not R.gsm8k_correct(solution, row["answer"], strict=True) and R.gsm8k_correct(solution, row["answer"])


def test_gsm8k_strict_vs_flexible():
    text = "Final answer: 12\nWait, I made a mistake: 3 * 5 = 15.\nFinal answer: 15 apples"
    assert R.gsm8k_answer(text, strict=True) == "15"  # the LAST marker counts
    assert R.gsm8k_answer("FINAL ANSWER:  -7", strict=True) == "-7"
    assert R.gsm8k_answer("Final answer:\n\n 42\n", strict=True) == "42"  # value on the next line
    assert R.gsm8k_answer("Final answer: 9 * 2 = $18", strict=True) == "18"
    assert R.gsm8k_answer("Final answer: \\boxed{1,000}", strict=True) == "1000"
    no_marker = "She has 5 - 2 = 3 left, so the answer is 3."
    assert R.gsm8k_answer(no_marker, strict=True) is None
    assert R.gsm8k_answer(no_marker) == "3"
    words = "Final answer: eighteen, since 9 + 9 = 18"
    assert R.gsm8k_answer(words, strict=True) == "18"
    assert R.gsm8k_answer("Final answer: eighteen", strict=True) is None
    assert R.gsm8k_answer("Final answer: eighteen, I had 9 + 9") == "9"  # flexible: last number
    assert R.gsm8k_answer("no numbers here") is None


def test_gsm8k_gold_errors_name_the_value():
    with pytest.raises(ValueError, match=r"after '####' in 'She has none #### none'"):
        R.gsm8k_gold("She has none #### none")
    with pytest.raises(ValueError, match="'eighteen'"):
        R.gsm8k_gold("eighteen")


@pytest.mark.parametrize(
    "text, canonical",
    [("1,000", "1000"), ("$18", "18"), ("18.0", "18"), ("18.00", "18"), ("-3", "-3"), (" -$5 ", "-5"),
     ("$-5", "-5"), ("3/4", "0.75"), ("1/3", "1/3"), ("0.50", "0.5"), (".5", "0.5"), ("-0", "0"), ("25%", "25"),
     ("1,234,567.80", "1234567.8"), ("18.", "18"), ("\u221212", "-12"),
     ("1,00", None), ("12a", None), ("", None), ("1/0", None), ("3 4", None), ("eighteen", None)],
)
def test_normalize_number(text, canonical):
    assert R.normalize_number(text) == canonical


@pytest.mark.parametrize(
    "text, last",
    [("5 - 3", "3"), ("5-3", "3"), ("it is -3.", "-3"), ("x = (-2)", "-2"), ("1,234.5 apples", "1,234.5"),
     ("a 3/4 cup", "3/4"), ("$1,000 total", "1,000"), ("numbers 1,2,3", "3"), ("v2", None), ("0.25.", "0.25")],
)
def test_extract_last_number(text, last):
    assert R.extract_last_number(text) == last


def test_extract_final_answer_and_boxed():
    assert R.extract_final_answer("a\nfinal answer: 3\nFinal Answer: **(B)** \nmore") == "(B)"
    assert R.extract_final_answer("The final answer is 3") is None
    two = r"so $\boxed{\frac{1}{2}}$ and then \boxed{\left\{ 1, 2 \right\}}."
    assert R.extract_boxed(two) == r"\left\{ 1, 2 \right\}"
    assert R.extract_boxed(r"\fbox{\sqrt{x^{2}}} ") == r"\sqrt{x^{2}}"
    assert R.extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces do not close it
    assert R.extract_boxed(r"\boxed{3} then \boxed{\frac{1}{") == "3"  # a cut-off box is skipped
    assert R.extract_boxed(r"is $\boxed 5$.") == "5"
    assert R.extract_boxed("no box") is None


# ----------------------------------------------------------------------------- MATH


def test_math_rows_gold_from_boxed():
    """The \\boxed{} of each real solution is the row's final answer; normal forms are idempotent."""
    for row in MATH:
        solution, final = _math_parts(row)
        assert R.extract_boxed(solution) == final
        assert R.math_answer(solution, strict=True) == R.normalize_math(final)
        assert R.normalize_math(R.normalize_math(final)) == R.normalize_math(final)


@pytest.mark.parametrize(
    "raw, normal",
    [(r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), (r"\text{Evelyn}", "evelyn"), (r"90^\circ", "90"),
     ("x=5", "5"), (r"11\sqrt2", r"11\sqrt{2}"), (r"\frac43", r"\frac{4}{3}"),
     (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"), (".0000672", r"\frac{21}{312500}"), (r"10,\!080", "10080"),
     (r"\text{(C)}", "C"), (r"1\frac{4}{5}", r"\frac{9}{5}"),
     (r"x \in [-2,7]", "[-2,7]"), ("y = 2x + 3", "2x+3"), (r"\cot x", r"\cot x"), (r"\$32,\!348", "32348"),
     (r"864 \mbox{ inches}^2", "864"), (r"\dfrac{2}{4}", r"\frac{1}{2}"), ("0.5", r"\frac{1}{2}"), (r"\boxed{5.}", "5"),
     (r"\begin{bmatrix} 1 \\ 2 \end{bmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"), ("4210_{5}", "4210_5")],
)
def test_normalize_math(raw, normal):
    assert R.normalize_math(raw) == normal


def test_math_rows_equal_themselves_and_differ_from_each_other():
    finals = [_math_parts(row)[1] for row in MATH]
    boxed = [R.extract_boxed(_math_parts(row)[0]) for row in MATH]
    shifted = finals[1:] + finals[:1]  # distinct values: every row's answer against the next row's
    verdicts = R.math_equiv_batch(list(zip(boxed, finals)) + list(zip(finals, shifted)))
    assert verdicts == [True] * len(finals) + [False] * len(finals)


EQUAL = [
    (r"\dfrac{1}{2}", r"\frac12"), ("0.5", r"\frac{1}{2}"), (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt3}"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
    ("x^2+2x+1", "(x+1)^2"), ("1,-2", "-2, 1"), (r"x \in [-2,7]", "[-2, 7]"),
    (r"3 \pm 2 \sqrt{2}", r"3-2\sqrt2, 3+2\sqrt2"), (r"\{1\pm\sqrt{5},-2\}", r"\{-2, 1-\sqrt5, 1+\sqrt5\}"),
    (r"\begin{pmatrix} -1/3 \\ 2/3 \end{pmatrix}", r"\begin{pmatrix} -\frac{1}{3} \\ \frac{4}{6} \end{pmatrix}"),
    ("6 - 5i", "-5i+6"), (r"(0,9) \cup (9,36)", r"(0, 9)\cup(9, 36)"), ("5x - 7y + 11z + 4 = 0", "-5x+7y-11z-4=0"),
    (r"\cot x", r"\frac{\cos x}{\sin x}"), ("(a+5)(b+2)", "ab+2a+5b+10"), (r"\sqrt[3]{8}", "2"), ("5!", "120"),
    (r"\binom{5}{2}", "10"), (r"-\frac{\pi}{6}", r"-\pi/6"), (r"|{-3}|", "3"), (r"\frac{\sqrt{2}}{2}", r"\sin(\pi/4)"),
    (r"137 \frac{1}{2}", "137.5"), (r"2^{10}", "1024"), (r"\sqrt{2}\cdot\sqrt{3}", r"\sqrt6"),
]
NOT_EQUAL = [
    ("(3,4]", "(3,4)"), (r"2\sqrt{2}", r"\sqrt{6}"), (r"\frac{1}{3}", "0.333"), ("(1,2)", "(2,1)"), ("1,-2", "1,2"),
    (r"\text{Evelyn}", r"\text{Evenly}"), ("x^2+1", "(x+1)^2"), ("52_8", "42"), (r"\frac{\pi}{2}", r"\frac{\pi}{3}"),
    ("1,2", "1,2,2"), (r"\infty", r"-\infty"), (r"\sqrt{x^2}", "x"), ("5x - 7y + 11z + 4 = 0", "5x-7y+11z=0"),
    (r"\frac{1}{3}", "0.3333333333333"), (r"\sqrt{2}", "1.4142135623731"),  # decimals are exact values
    # unparsable, empty, hostile or too big to compute: never an exception, never equal
    ("", ""), (r"\frac{", "1"), ("__import__('os').system('true')", "0"), ("}{", "{}"), (r"2^{2^{2^{2^{2^{2}}}}}", "3"),
    (r"(10^{10})!", "1"), ("1\n2", '"'),
]


def test_math_equiv_batch_rewrites():
    verdicts = R.math_equiv_batch(EQUAL + NOT_EQUAL)
    wrong = [pair for pair, v, want in zip(EQUAL + NOT_EQUAL, verdicts, [True] * len(EQUAL) + [False] * len(NOT_EQUAL))
             if v != want]
    assert not wrong


def test_math_answer_modes_and_score():
    text = r"We get $x = \frac{14}{3}$." + "\nFinal answer: $\\dfrac{14}{3}$"
    assert R.math_answer(text, strict=True) is None
    assert R.math_answer(text) == r"\frac{14}{3}"
    assert R.math_answer("so the answer is: $2\\sqrt{2}$.") == r"2\sqrt{2}"
    assert R.math_answer("which gives 7 and then 12") == "12"
    assert R.math_score([text], [r"\frac{14}{3}"]) == ([r"\frac{14}{3}"], [True])
    assert R.math_score([text], [r"\frac{14}{3}"], strict=True) == ([None], [False])
    completions = [_math_parts(row)[0] for row in MATH]
    finals = [_math_parts(row)[1] for row in MATH]
    answers, correct = R.math_score(completions, finals, strict=True)
    assert answers == [R.normalize_math(f) for f in finals] and all(correct)
    answers, correct = R.math_score(completions + ["no answer"], finals[1:] + finals[:1] + ["1"])
    assert answers[-1] is None and not any(correct)


# The two sides are equal ((a+b+c+d+e)(a-b+c-d+e) = (a+c+e)^2 - (b+d)^2), but sympy's simplify takes
# well over 20 s on it: a False here can only come from the timeout.
SLOW = (r"(a+b+c+d+e)^{12}(a-b+c-d+e)^{12}", r"((a+c+e)^2-(b+d)^2)^{12}")


def test_timeout_kills_and_replaces_the_worker():
    assert R.math_equiv_batch([(r"\sqrt{12}", r"2\sqrt{3}")]) == [True]  # the pool is up
    pids = {w.proc.pid for w in R._pool().workers}
    start = time.monotonic()
    verdicts = R.math_equiv_batch([SLOW, (r"\sqrt{18}", r"3\sqrt{2}"), (r"\sqrt{20}", r"2\sqrt{6}")], timeout=1.0)
    elapsed = time.monotonic() - start
    assert verdicts == [False, True, False]
    assert elapsed < 8.0
    killed = pids - {w.proc.pid for w in R._pool().workers}
    assert len(killed) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(killed.pop(), 0)
    after = R.math_equiv_batch([(r"\sqrt{27}", r"3\sqrt{3}"), (r"\sqrt{28}", r"3\sqrt{3}")], timeout=5.0)
    assert after == [True, False]


def test_a_dead_worker_is_replaced():
    assert R.math_equiv_batch([(r"\sqrt{32}", r"4\sqrt{2}")]) == [True]
    victim = R._pool().workers[0].proc
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert R.math_equiv_batch([(r"\sqrt{45}", r"3\sqrt{5}"), (r"\sqrt{50}", r"5\sqrt{2}")]) == [True, True]
    assert victim not in [w.proc for w in R._pool().workers]


# ----------------------------------------------------------------------------- ARC


@pytest.mark.parametrize(
    "completion, strict, letter",
    [("Reasoning...\nFinal answer: B", True, "B"), ("Final answer: (C) the sun", True, "C"),
     ("Final answer: D) ice", True, "D"), ("Final answer: **A**.", True, "A"), ("Final answer: Option E", True, "E"),
     ("Final answer: The answer is (B).", True, "B"),
     ("Final answer: a rock", True, None), ("Final answer: Because plants need light", True, None),
     ("So the answer is B.", True, None), ("So the answer is B.", False, "B"), ("(A) is wrong, so (C).", False, "C"),
     ("the answer is a plant", False, None), (r"Thus $\boxed{D}$", False, "D"), ("B", False, "B"),
     (" (D) ", False, "D"),
     ("Final answer: (A)\nActually the answer is (B)", False, "A"), ("I do not know", False, None),
     # a bare letter counts only before ')', '.', ':', ',' or the end: here "A" is an article
     ("Final answer: A cell wall, which is (C)", True, "C"), ("Final answer: B, the sun", True, "B"),
     ("Final answer: E", True, "E"), ("Final answer: C: wind", True, "C"), ("Final answer: [D]", True, "D"),
     ("Final answer: A cell wall", True, None), ("Final answer: Choice: B", True, "B")],
)
def test_arc_answer(completion, strict, letter):
    assert R.arc_answer(completion, strict) == letter


def test_arc_gold():
    assert R.arc_gold("B") == R.arc_gold("(b)") == R.arc_gold(" (B) ") == "B"
    for bad in ("F", "AB", "", "1"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            R.arc_gold(bad)
