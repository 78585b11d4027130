"""rpo.filters: templates, parsing of generated text (real MATH500 questions and answers from
tests/fixtures/math_rows.jsonl), the Answer-/Self-Consistency filters against a collections.Counter
reference of the rules, RIP, and ROUGE-L near-duplicate removal against the ROUGE paper's worked example
(Lin 2004) and a brute-force dynamic-programming LCS."""

from __future__ import annotations

import collections
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from rpo import filters as F
from rpo import rewards

FIXTURES = Path(__file__).parent / "fixtures"
MATH = [json.loads(line) for line in open(FIXTURES / "math_rows.jsonl")]
SEEDS = {"seed1": "What is $1+1$?", "seed2": "Find the largest prime factor of $91$."}
VALUES = {role: {f: f"<{f.upper()} TEXT>" for f in fields} for role, fields in F.TEMPLATE_FIELDS.items()}


def _math_final(row: dict) -> str:
    return row["answer"].rpartition("The answer is:")[2].strip()


def _verifiable(question: str, answer: str, reasoning: str = "The seeds test counting.\n") -> str:
    return (f"{reasoning}[New Question Begin]\n{question}\n[New Question End]\nSolving it step by step...\n"
            f"[Final Answer to New Question Begin]\\boxed{{{answer}}}[Final Answer to New Question End]")


# ----------------------------------------------------------------------------- templates


@pytest.mark.parametrize("role", sorted(F.TEMPLATE_FIELDS))
def test_packaged_templates_load_and_format(role):
    template = F.load_template(role)
    assert template == (F.TEMPLATES_DIR / f"{role}.txt").read_text()
    assert F.load_template(F.TEMPLATES_DIR / f"{role}.txt") == template  # the same file given as a path
    text = template.format(**VALUES[role])
    for value in VALUES[role].values():
        assert text.count(value) == 1
    assert "{{" not in text and "}}" not in text  # literal braces were written doubled
    expected = {"cot_verifiable": ["[New Question Begin]", "[Final Answer to New Question Begin]\\boxed{"],
                "self_instruct_verifiable": ["[New Question Begin]"], "cot_instruction": ["[New Prompt Begin]"],
                "self_instruct_instruction": ["[New Prompt Begin]"], "judge": ["Score: N"]}
    for marker in expected[role]:
        assert marker in text
    if role == "self_instruct_verifiable":
        assert "Final Answer" not in text and "\\boxed" not in text  # the baseline asks for no answer


def _format_lines(template: str, marker: str) -> str:
    """The template's own example of the output format: its lines from the one holding `marker` on."""
    lines = template.format(**SEEDS).splitlines()
    return "\n".join(lines[next(i for i, ln in enumerate(lines) if ln.startswith(marker)):])


def test_template_output_format_parses():
    """A completion that copies the format each generator template asks for parses with its parser."""
    row = MATH[1]  # answer \frac{14}{3}
    example = _format_lines(F.load_template("cot_verifiable"), "[New Question Begin]")
    completion = "Both seeds are about...\n" + example.replace("the new problem", row["question"]).replace(
        "the answer", _math_final(row))
    assert F.parse_verifiable(completion) == F.Parsed(row["question"].strip(), "\\frac{14}{3}")
    example = _format_lines(F.load_template("self_instruct_verifiable"), "[New Question Begin]")
    assert F.parse_verifiable(example.replace("the new problem", "Q?"), with_answer=False) == F.Parsed("Q?", None)
    for role in ("cot_instruction", "self_instruct_instruction"):
        example = _format_lines(F.load_template(role), "[New Prompt Begin]")
        assert F.parse_instruction(example.replace("the new prompt", "Write a haiku.")).question == "Write a haiku."
    judge = F.load_template("judge").format(prompt="p", response="r")
    assert F.judge_score(judge.replace("Score: N", "Score: 7")) == 7


def test_researcher_template_files(tmp_path):
    own = tmp_path / "cot_verifiable.txt"
    own.write_text("A: {seed1}\nB: {seed2}\nUse \\boxed{{}}.\n")
    assert F.load_template(own).format(**SEEDS) == f"A: {SEEDS['seed1']}\nB: {SEEDS['seed2']}\nUse \\boxed{{}}.\n"
    assert F.load_template(str(own)) == own.read_text()
    mine = tmp_path / "mine.txt"  # a stem that is no role: the placeholders tell which template it is
    mine.write_text("Rate: {prompt} / {response}\n")
    assert F.load_template(mine) == F.load_template(mine, role="judge") == "Rate: {prompt} / {response}\n"
    with pytest.raises(ValueError, match=re.escape(str(mine)) + r".*missing the placeholder \{seed1\}"):
        F.load_template(mine, role="cot_instruction")
    with pytest.raises(ValueError, match="unknown role 'solver'"):
        F.load_template(mine, role="solver")
    mine.write_text("{seed1} and {seed3}")
    with pytest.raises(ValueError, match=re.escape(str(mine)) + r": its placeholders \{seed1\}, \{seed3\} fit no"):
        F.load_template(mine)
    with pytest.raises(FileNotFoundError, match=r"other\.txt: no such template file \(a generator: \{seed1\}"):
        F.load_template(tmp_path / "other.txt")
    missing = tmp_path / "judge.txt"
    message = re.escape(f"{missing}: no such template file") + r".*\{prompt\}, \{response\}"
    with pytest.raises(FileNotFoundError, match=message):
        F.load_template(missing)
    with pytest.raises(FileNotFoundError, match=r"no_such_name\.txt.*\{seed1\}, \{seed2\}"):
        F.load_template("no_such_name", role="cot_instruction")
    cases = {"{seed1} only": r"missing the placeholder \{seed2\}",
             "{seed1} {seed2} \\boxed{x}": r"unknown placeholder\(s\) \{x\}",
             "{seed1} {seed2} {}": r"unknown placeholder\(s\) \{\}",
             "{seed1} {seed2} \\boxed{": "not a str.format template"}
    for text, message in cases.items():
        own.write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(own)) + ".*" + message):
            F.load_template(own)


# ----------------------------------------------------------------------------- parsing


# Real MATH500 answers: the checkable ones and their written form.
CHECKABLE = {"\\frac{14}{3}": "\\frac{14}{3}", "90^\\circ": "90", "3\\sqrt{13}": "3\\sqrt{13}", "x=5": "5",
             "11\\sqrt2": "11\\sqrt{2}", "\\frac43": "\\frac{4}{3}", "\\frac{270}7\\text{ degrees}": "\\frac{270}{7}",
             "10,\\!080": "10080", "\\text{(C)}": "C"}


def test_parse_verifiable_real_rows():
    checked = []
    for row in MATH:
        final = _math_final(row)
        parsed = F.parse_verifiable(_verifiable(row["question"], final))
        if final in CHECKABLE:
            assert parsed == F.Parsed(row["question"].strip(), CHECKABLE[final]), final
            checked.append((rewards.math_answer(row["answer"], strict=True), parsed.answer))
        else:  # tuples, intervals, unions, matrices, text, expressions, pi, complex numbers, decimals, mixed numbers
            assert parsed == F.Parsed(None, None, F.NOT_CHECKABLE), final
        assert F.parse_verifiable(_verifiable(row["question"], final), with_answer=False) == F.Parsed(
            row["question"].strip(), None)
    # the generated answer and the answer the grader reads from a solution boxing it are one value to the vote
    assert len(checked) == len(CHECKABLE) and rewards.math_equiv_batch(checked) == [True] * len(checked)


CHECKABLE_CASES = [
    ("42", "42"), ("-7", "-7"), ("1,234,567", "1234567"), ("0", "0"),
    ("\\frac{3}{4}", "\\frac{3}{4}"), ("\\dfrac{5}{12}", "\\frac{5}{12}"), ("\\tfrac{1}{3}", "\\frac{1}{3}"),
    ("\\frac34", "\\frac{3}{4}"), ("7/9", "\\frac{7}{9}"), ("-\\frac{2}{3}", "-\\frac{2}{3}"),
    ("\\frac{-2}{3}", "-\\frac{2}{3}"),
    ("3\\sqrt{2}", "3\\sqrt{2}"), ("\\sqrt 5", "\\sqrt{5}"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("2+\\sqrt{5}", "2+\\sqrt{5}"), ("\\sqrt[3]{2}", "\\sqrt[3]{2}"), ("-\\sqrt{2}", "-\\sqrt{2}"),
    ("\\frac{1+\\sqrt{5}}{2}", "\\frac{1+\\sqrt{5}}{2}"),
    ("\\frac{\\sqrt{2}}{1+\\sqrt{3}}", "\\frac{\\sqrt{2}}{1+\\sqrt{3}}"),
    ("(C)", "C"), ("C", "C"), ("$\\frac{1}{2}$", "\\frac{1}{2}"), ("12 \\text{ cm}", "12"),
    # rejected: decimals, not reduced, mixed numbers, several values, intervals, variables, constants, lower case
    ("0.5", None), ("2.0", None), (".25", None), ("\\frac{6}{8}", None), ("4/2", None), ("\\frac{4}{1}", None),
    ("1\\frac{1}{2}", None), ("007", None), ("1, 2", None), ("[1,2]", None), ("x+1", None), ("2\\pi", None),
    ("c", None), ("F", None), ("\\sqrt{8}", None), ("\\sqrt[3]{16}", None), ("1\\sqrt{2}", None),
    ("\\sqrt{2}\\sqrt{3}", None), ("\\frac{\\sqrt{2}}{0}", None), ("\\frac{\\sqrt{2}}{1}", None),
    ("1+2", None), ("\\sqrt{x}", None), ("", None), ("1" * 300, None),
]


@pytest.mark.parametrize("raw, expected", CHECKABLE_CASES)
def test_checkable_answer(raw, expected):
    assert F.checkable_answer(raw) == expected


def test_checkable_answers_are_what_a_solution_boxing_them_grades_to():
    cases = [(raw, written) for raw, written in CHECKABLE_CASES if written is not None]
    solutions = [f"so the answer is $\\boxed{{{raw}}}$." for raw, _ in cases]
    answers = rewards.math_answers(solutions, strict=True)
    assert rewards.math_equiv_batch([(a, w) for a, (_, w) in zip(answers, cases)]) == [True] * len(cases)
    _, correct = rewards.math_score(solutions, [w for _, w in cases], strict=True)
    assert correct == [True] * len(cases)


MALFORMED = {
    "no markers at all, \\boxed{3}": F.MISSING_QUESTION,
    "[New Question Begin] What is 2+2? \\boxed{4}": F.MISSING_QUESTION,  # cut off
    "[New Question End] What? [New Question Begin]": F.MISSING_QUESTION,
    "[New Question Begin]A?[New Question End][New Question Begin]B?[New Question End]": F.MULTIPLE_QUESTIONS,
    "I will write [New Question Begin] ... [New Question Begin]B?[New Question End]": F.MULTIPLE_QUESTIONS,
    "[New Question Begin]A?[New Question End] or rather B? [New Question End]": F.MULTIPLE_QUESTIONS,
    "[New Question Begin]  \n [New Question End][Final Answer to New Question Begin]\\boxed{1}"
    "[Final Answer to New Question End]": F.EMPTY_QUESTION,
    "[New Question Begin]A?[New Question End] The answer is \\boxed{3}.": F.MISSING_ANSWER,
    "[New Question Begin]A?[New Question End][Final Answer to New Question Begin]\\boxed{3}": F.MISSING_ANSWER,
    "[New Question Begin]A?[New Question End][Final Answer to New Question Begin]\\boxed{3}"
    "[Final Answer to New Question End][Final Answer to New Question Begin]\\boxed{4}"
    "[Final Answer to New Question End]": F.MULTIPLE_ANSWERS,
    "[New Question Begin]A?[New Question End][Final Answer to New Question Begin]3"
    "[Final Answer to New Question End]": F.NO_BOXED_ANSWER,
    "[New Question Begin]A?[New Question End]\\boxed{3}[Final Answer to New Question Begin]"
    "[Final Answer to New Question End]": F.NO_BOXED_ANSWER,
    "[New Question Begin]A?[New Question End][Final Answer to New Question Begin]\\boxed{0.75}"
    "[Final Answer to New Question End]": F.NOT_CHECKABLE,
    "[New Question Begin]A?[New Question End][Final Answer to New Question Begin]\\boxed{3} or \\boxed{4}"
    "[Final Answer to New Question End]": F.NOT_CHECKABLE,
}


@pytest.mark.parametrize("text, reason", MALFORMED.items(), ids=list(MALFORMED.values()))
def test_parse_verifiable_rejects(text, reason):
    assert F.parse_verifiable(text) == F.Parsed(None, None, reason)


def test_parse_verifiable_forms():
    text = _verifiable("How many divisors does $72$ have?", "12")
    assert F.parse_verifiable(text) == F.Parsed("How many divisors does $72$ have?", "12")
    loose = "[ new  question begin ]Q?[NEW QUESTION END]\n[final answer to new question begin] \\boxed{ (B) } " \
            "[Final Answer to New Question End]"
    assert F.parse_verifiable(loose) == F.Parsed("Q?", "B")
    # without_answer ignores the answer block entirely, even a malformed one
    assert F.parse_verifiable("[New Question Begin]Q?[New Question End] \\boxed{0.5}", with_answer=False).ok
    assert not F.parse_verifiable("[New Question Begin]Q?[New Question End]", with_answer=True).ok


def test_parse_instruction():
    assert F.parse_instruction("plan...\n[New Prompt Begin]\nWrite a poem.\n[New Prompt End]") == F.Parsed(
        "Write a poem.", None)
    cases = {"Write a poem.": F.MISSING_PROMPT, "[New Prompt Begin]Write a poem.": F.MISSING_PROMPT,
             "[New Prompt Begin]a[New Prompt End] [New Prompt Begin]b[New Prompt End]": F.MULTIPLE_PROMPTS,
             "[New Prompt Begin] \n[New Prompt End]": F.EMPTY_PROMPT,
             "[New Question Begin]a[New Question End]": F.MISSING_PROMPT}
    for text, reason in cases.items():
        assert F.parse_instruction(text) == F.Parsed(None, None, reason), text


def test_judge_score():
    assert F.judge_score("Good.\nScore: 8") == 8
    assert F.judge_score("Score: 3 at first, but on reflection\nScore: **9**.") == 9
    assert F.judge_score("Score: 10/10") == 10
    for bad in ("no score", "Score: 0", "Score: 11", "Score: 7.5", "Score: N"):
        assert F.judge_score(bad) is None, bad


# ----------------------------------------------------------------------------- consistency filters


def _reference(generated, solutions, min_share, ties):
    """The Answer-Consistency rules spelled out with collections.Counter: (keep, reason, majority)."""
    counts = collections.Counter(a for a in solutions if a is not None)
    if not counts:
        return (False, F.NO_GENERATED_ANSWER if generated is None else F.NO_VALID_SOLUTION, None)
    top = max(counts.values())
    tied_answers = [a for a in dict.fromkeys(a for a in solutions if a is not None) if counts[a] == top]
    majority = tied_answers[0]  # first occurrence among the tied answers
    if ties == "any" and generated in tied_answers:
        majority = generated
    if generated is None:
        return False, F.NO_GENERATED_ANSWER, majority
    if len(tied_answers) > 1 and ties == "reject":
        return False, F.TIE, majority
    if majority != generated:
        return False, F.MAJORITY_DIFFERS, majority
    if top / len(solutions) < min_share:
        return False, F.LOW_VOTE_SHARE, majority
    return True, None, majority


def test_answer_consistency_cases():
    generated = ["5", "5", "5", "5", "5", None, "7"]
    solutions = [
        ["5", "5", "3", None],  # kept: 2 of 4 = 0.5
        ["3", "5", "5", "3"],  # tie 3/5, 3 first
        ["5", "3", "3", "5"],  # tie 5/3, 5 first
        [None, None, None, None],  # no valid solution
        ["5", None, None, None],  # 1 of 4 < 0.5
        ["5", "5", "5", "5"],  # nothing generated
        ["5", "5", "7", "1"],  # majority 5 differs
    ]
    expected = {
        "reject": [None, F.TIE, F.TIE, F.NO_VALID_SOLUTION, F.LOW_VOTE_SHARE, F.NO_GENERATED_ANSWER,
                   F.MAJORITY_DIFFERS],
        "first": [None, F.MAJORITY_DIFFERS, None, F.NO_VALID_SOLUTION, F.LOW_VOTE_SHARE, F.NO_GENERATED_ANSWER,
                  F.MAJORITY_DIFFERS],
        "any": [None, None, None, F.NO_VALID_SOLUTION, F.LOW_VOTE_SHARE, F.NO_GENERATED_ANSWER, F.MAJORITY_DIFFERS],
    }
    for ties, reasons in expected.items():
        result = F.answer_consistency(generated, solutions, min_share=0.5, ties=ties)
        assert result.reason == reasons, ties
        assert result.keep.tolist() == [r is None for r in reasons]
        assert result.votes.tolist() == [2, 2, 2, 0, 1, 4, 2]
        np.testing.assert_allclose(result.vote_share, [0.5, 0.5, 0.5, 0, 0.25, 1, 0.5])
        assert result.tied.tolist() == [False, True, True, False, False, False, False]
        assert result.majority[1] == ("5" if ties == "any" else "3") and result.majority[3] is None
    result = F.answer_consistency(generated, solutions, min_share=0.5, ties="first")
    assert result.row(0) == {"keep": True, "reason": None, "majority": "5", "votes": 2, "vote_share": 0.5,
                             "tied": False}
    assert result.counts() == {"kept": 2, F.MAJORITY_DIFFERS: 2, F.NO_VALID_SOLUTION: 1, F.LOW_VOTE_SHARE: 1,
                               F.NO_GENERATED_ANSWER: 1}
    # min_share is inclusive, and K counts the samples without an answer
    assert F.answer_consistency(["5"], [["5", "5", None]], min_share=2 / 3, ties="reject").keep.tolist() == [True]
    assert F.answer_consistency(["5"], [["5", "5", None]], min_share=0.67, ties="reject").reason == [F.LOW_VOTE_SHARE]
    # rows of different K: each prompt's share is over its own K
    result = F.answer_consistency(["1", "2"], [["1"], ["2", "2", "3", "4"]], min_share=0.5, ties="reject")
    assert result.vote_share.tolist() == [1.0, 0.5] and result.keep.tolist() == [True, True]


def test_answer_consistency_random_against_counter():
    rng = random.Random(0)
    answers = ["1", "2", "\\frac{1}{2}", None]
    for k in (1, 4, 7):
        solutions = [[rng.choice(answers) for _ in range(k)] for _ in range(120)]
        generated = [rng.choice(answers) for _ in range(120)]
        for ties in F.TIE_POLICIES:
            for min_share in (0.0, 0.5, 0.75):
                result = F.answer_consistency(generated, solutions, min_share=min_share, ties=ties)
                for p in range(120):
                    keep, reason, majority = _reference(generated[p], solutions[p], min_share, ties)
                    assert (result.keep[p], result.reason[p]) == (keep, reason), (generated[p], solutions[p], ties)
                    assert result.majority[p] == majority


def test_votes_group_spellings_of_one_value():
    """Answers are grouped by the MATH grader's equivalence (rewards.math_equiv_batch) unless same=None."""
    generated = ["\\frac{1}{2}", "0.5", "7"]
    solutions = [["0.5", "1/2", "\\dfrac{1}{2}", "3", "3"],  # 1/2 has three spellings, 3 two equal strings
                 ["\\frac12", "\\frac{1}{2}", "x", "x", None],  # 1/2 two spellings, x two: a tie
                 ["7.0", "7", "7", "\\frac{14}{2}", "8"]]
    result = F.answer_consistency(generated, solutions, min_share=0.5, ties="reject")
    assert result.reason == [None, F.TIE, None] and result.votes.tolist() == [3, 2, 4]
    assert result.majority == ["\\frac{1}{2}", "0.5", "7"]  # the class's first spelling: the generated one
    assert F.answer_consistency(generated, solutions, min_share=0.4, ties="any").reason == [None, None, None]
    by_string = F.answer_consistency(generated, solutions, min_share=0.5, ties="reject", same=None)
    assert by_string.reason == [F.MAJORITY_DIFFERS, F.MAJORITY_DIFFERS, F.LOW_VOTE_SHARE]  # "3", "x", "7" twice
    assert by_string.votes.tolist() == [2, 2, 2]
    labels = F.self_consistency(solutions, threshold=0.5, ties="reject")
    assert labels.reason == [None, F.TIE, None] and labels.majority[0] == "0.5" and labels.majority[2] == "7.0"
    assert F.self_consistency(solutions, threshold=0.5, ties="reject", same=None).reason == [F.LOW_VOTE_SHARE] * 3
    letters = [[a, b] for a in "ABCDE" for b in "ABCDE" if a != b]  # ARC's answers: a letter equals only itself
    assert F.self_consistency(letters, threshold=0.5, ties="reject").reason == [F.TIE] * len(letters)


def test_self_consistency():
    solutions = [["4", "4", "2"], ["4", "2", "2", "4"], [None, None], ["1", "4", "4", "5", "6", "7", "8", "9"],
                 ["9", None, "9", None]]
    result = F.self_consistency(solutions, threshold=0.5, ties="reject")
    assert result.reason == [None, F.TIE, F.NO_VALID_SOLUTION, F.LOW_VOTE_SHARE, None]
    assert result.majority == ["4", "4", None, "4", "9"] and result.tied.tolist() == [False, True, False, False, False]
    np.testing.assert_allclose(result.vote_share, [2 / 3, 0.5, 0, 0.25, 0.5])
    result = F.self_consistency(solutions, threshold=0.5, ties="first")
    assert result.reason == [None, None, F.NO_VALID_SOLUTION, F.LOW_VOTE_SHARE, None]
    assert F.self_consistency(solutions, threshold=0.7, ties="first").keep.tolist() == [False] * 5
    assert F.self_consistency(solutions, threshold=0.0, ties="first").reason[2] == F.NO_VALID_SOLUTION


def test_consistency_argument_errors():
    with pytest.raises(ValueError, match="ties='most'"):
        F.answer_consistency(["1"], [["1"]], min_share=0.5, ties="most")
    with pytest.raises(ValueError, match="ties='any'"):
        F.self_consistency([["1"]], ties="any")  # no generated answer to be among the tied ones
    with pytest.raises(ValueError, match="min_share=1.5"):
        F.answer_consistency(["1"], [["1"]], min_share=1.5, ties="first")
    with pytest.raises(ValueError, match="threshold=-0.1"):
        F.self_consistency([["1"]], threshold=-0.1)
    with pytest.raises(ValueError, match="2 generated answers but 1 solution rows"):
        F.answer_consistency(["1", "2"], [["1"]], min_share=0.5, ties="first")
    with pytest.raises(ValueError, match=r"solutions\[1\]: no samples"):
        F.self_consistency([["1"], []])
    with pytest.raises(TypeError, match=r"generated\[0\]"):
        F.answer_consistency([5], [["5"]], min_share=0.5, ties="first")
    assert F.answer_consistency([], [], min_share=0.5, ties="first").keep.shape == (0,)


# ----------------------------------------------------------------------------- RIP


def test_rip():
    scores = np.array([[9, 2, 8], [4, 4, 4], [10, 3, 7], [1, 10, 10]], float)  # minima 2, 4, 3, 1
    result = F.rip(scores, percentile=50)  # median of [1, 2, 3, 4] = 2.5
    assert result.cutoff == 2.5 and result.min_score.tolist() == [2, 4, 3, 1]
    assert result.reason == [F.LOW_MIN_REWARD, None, None, F.LOW_MIN_REWARD]
    assert F.rip(scores, percentile=0).keep.all()
    assert F.rip(scores, percentile=100).keep.tolist() == [False, True, False, False]
    assert F.rip(scores, percentile=25).keep.tolist() == [True, True, True, False]  # 1.75
    tied = F.rip(np.array([[5.0], [5.0], [1.0]]), percentile=100)  # rows at the cutoff are kept
    assert tied.keep.tolist() == [True, True, False] and tied.row(2) == {
        "keep": False, "reason": F.LOW_MIN_REWARD, "min_score": 1.0, "cutoff": 5.0}
    assert F.rip(np.array([[3.0, 7.0]]), percentile=90).keep.tolist() == [True]
    assert F.rip(np.zeros((0, 4)), percentile=50).keep.shape == (0,)


def test_rip_errors():
    scores = np.ones((3, 4))
    scores[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"row 2 \(response 1\) is nan"):
        F.rip(scores, percentile=50)
    with pytest.raises(ValueError, match="percentile=101"):
        F.rip(np.ones((2, 2)), percentile=101)
    with pytest.raises(ValueError, match=r"shape \[prompts, responses >= 1\]"):
        F.rip(np.ones(4), percentile=50)


# ----------------------------------------------------------------------------- ROUGE-L and near duplicates


def _dp_lcs(a, b) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_paper_example():
    """Lin 2004, section 3.1: against the reference "police killed the gunman", "police kill the gunman" has
    LCS 3 (R = P = F = 3/4) and "the gunman kill police" has LCS 2 (F = 1/2)."""
    reference = "Police killed the gunman."
    assert F.rouge_l("police kill the gunman", reference) == 0.75
    assert F.rouge_l("the gunman kill police", reference) == 0.5
    # m = 6, n = 5, LCS "the cat on mat" = 4: F1 = 8 / 11; case and punctuation do not matter
    assert F.rouge_l("The cat sat on the mat!", "the CAT, on a mat") == pytest.approx(8 / 11)
    assert F.words("Don't stop_now: 3.5x") == ["don", "t", "stop", "now", "3", "5x"]
    assert F.rouge_l("", "a b") == 0.0 and F.rouge_l("a b", "a b") == 1.0


def test_lcs_against_dynamic_programming():
    rng = random.Random(1)
    for _ in range(400):
        alphabet = "abcd"[:rng.randint(1, 4)]
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 70))]  # lengths across the 64-bit boundary
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 70))]
        assert F.lcs_length(a, b) == _dp_lcs(a, b) == F.lcs_length(b, a)


def _brute_near_duplicates(texts, references, threshold):
    def f1(a, b):
        x, y = F.words(a), F.words(b)
        return 2 * _dp_lcs(x, y) / (len(x) + len(y)) if x and y else 0.0

    out, kept = [], []
    for i, text in enumerate(texts):
        hit = next((f"duplicate_of_seed:{s}" for s, r in enumerate(references) if f1(text, r) >= threshold), None)
        hit = hit or next((f"duplicate_of:{j}" for j in kept if f1(text, texts[j]) >= threshold), None)
        out.append(hit)
        if hit is None:
            kept.append(i)
    return out


def test_near_duplicates_against_brute_force():
    rng = random.Random(2)
    vocab = "a b c d e f g h i j".split()
    references = [" ".join(rng.choices(vocab, k=rng.randint(3, 12))) for _ in range(25)]
    texts = []
    for _ in range(300):  # a third copies a reference or an earlier text with a few edits
        source = rng.choice([None, references, texts]) if texts else None
        words = rng.choice(source).split() if source else rng.choices(vocab, k=rng.randint(0, 12))
        for _ in range(rng.randint(0, 3) if words else 0):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        texts.append(" ".join(words))
    for threshold in (0.3, 0.7, 0.9, 1.0):
        result = F.near_duplicates(texts, references, threshold=threshold)
        assert result == _brute_near_duplicates(texts, references, threshold), threshold
    assert 0 < sum(r is not None for r in F.near_duplicates(texts, references, threshold=0.7)) < len(texts)


def test_near_duplicates_kept_only_and_threshold():
    seeds = ["Find the sum of the first ten positive integers."]
    texts = [
        "Find the SUM of the first ten positive integers!",  # the seed again
        "What is the product of two and three?",  # 8 words
        "What is the product of two and three and four?",  # 10 words
        "What is the product of two and three and four and five?",  # 12 words
    ]
    assert F.rouge_l(texts[2], texts[1]) == 16 / 18 and F.rouge_l(texts[3], texts[1]) == 16 / 20
    assert F.rouge_l(texts[3], texts[2]) == 20 / 22 and F.rouge_l(texts[1], seeds[0]) == 4 / 17  # LCS "the of"
    # text 3 is closest to text 2, but text 2 was rejected: only kept texts count
    assert F.near_duplicates(texts, seeds, threshold=0.85) == ["duplicate_of_seed:0", None, "duplicate_of:1", None]
    assert F.near_duplicates(texts, seeds, threshold=0.8) == ["duplicate_of_seed:0", None, "duplicate_of:1",
                                                              "duplicate_of:1"]
    assert F.near_duplicates(texts, [], threshold=1.0) == [None, None, None, None]
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match=f"threshold={bad}"):
            F.near_duplicates(texts, seeds, threshold=bad)
