"""MATH (Hendrycks et al. 2021) as a TFDS dataset built from jsonl files, and its task.

Source: train.jsonl and/or test.jsonl (splits are the files present), one problem a line, in
either spelling:
  - MATH / MATH-500 jsonl: "problem" (or "question"), "solution", optional "answer" (else the
    last \\boxed{} of the solution), optional "level", "subject" (or "type"), "unique_id";
  - the PRM800K / MetaMath-style variant of MATH-500: "question", no "solution", and "answer"
    holding the full solution followed by "The answer is: X"; split at the last such trailer,
    the solution is the text before it and the gold answer X (stripped; when X is empty, the
    solution's last \\boxed{} / \\fbox{}). Without the trailer, an "answer" holding a \\boxed{}
    is the solution and its last box the gold; any other "answer" is the gold, with no solution.
A row with no problem, or where no gold answer can be found, is a bad row naming why (see
tfds_util). `MathBuilder` (TFDS name rpo_math) keeps the file order (row = line - 1).

Task config fields (the `task` block, name='math'): source_dir, tfds_dir, skip_bad_rows,
max_examples, strict (passed to rpo.rewards).

Prompt: 4-shot, templates/math.txt (four worked examples written for this project, answers in
\\boxed{}, each "Problem:\\n...\\n\\nSolution:\\n..."), ending "Solution:\\n". target(): the solution
(it contains the \\boxed{} answer); None when the row has no solution with a \\boxed{} or \\fbox{}.
stop: the next "Problem:" block, what a model continuing the few-shot pattern writes next.
score(): rpo.rewards.math_score (math-verify in worker processes, with its default timeout): the answer
math-verify extracts and whether it equals the gold. same_answers(): rpo.rewards.math_equiv_batch, the
equivalence that groups answers for maj@k (rpo.consistency.answer_ids(..., same=task.same_answers)).
uid: "math/<split>/<row>"; the subject is the Example's category (CoT-Self-Instruct pairs seeds by it);
level and unique_id stay in the TFDS data (Example has no field for them).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rpo.data import Example
from rpo.data import tfds_util
from rpo.data.tfds_util import BadRow, tfds

TRAILER = "The answer is:"
TEXT_FIELDS = ("question", "solution", "answer", "level", "subject", "unique_id")


def parse_row(obj: dict) -> dict:
    from rpo import rewards

    question = obj.get("problem", obj.get("question"))
    if not isinstance(question, str) or not question.strip():
        raise BadRow("no 'problem' or 'question'")
    solution, answer = obj.get("solution"), obj.get("answer")
    if not isinstance(solution, (str, type(None))) or not isinstance(answer, (str, int, type(None))):
        raise BadRow("'solution' must be a string and 'answer' a string or an int")
    why = "no 'answer' field and no \\boxed{} or \\fbox{} in 'solution'"
    if solution is None and isinstance(answer, str):
        if TRAILER in answer:  # PRM800K spelling: the full solution, then "The answer is: X"
            solution, _, answer = answer.rpartition(TRAILER)
            why = f"nothing after the last {TRAILER!r} in 'answer' and no \\boxed{{}} or \\fbox{{}} before it"
        elif rewards.extract_boxed(answer) is not None:
            solution, answer = answer, None
    solution = (solution or "").strip()
    answer = str(answer).strip() if answer is not None else ""
    if not answer:
        answer = (rewards.extract_boxed(solution) or "").strip()
    if not answer:
        raise BadRow(f"no answer: {why}")
    subject = str(obj.get("subject", obj.get("type", "")))
    level, unique_id = str(obj.get("level", "")), str(obj.get("unique_id", ""))
    return dict(question=question, solution=solution, answer=answer, level=level, subject=subject, unique_id=unique_id)


class MathBuilder(tfds_util.JsonlBuilder):
    """MATH problems from train.jsonl / test.jsonl in the manual dir."""

    name = "rpo_math"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "File order kept; both jsonl spellings; gold from 'answer' or the last \\boxed{}."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put train.jsonl and/or test.jsonl (MATH or MATH-500 jsonl) in the manual dir."
    parse_row = staticmethod(parse_row)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {key: tfds.features.Text() for key in TEXT_FIELDS}
        return tfds.core.DatasetInfo(
            builder=self,
            description="MATH competition problems with worked solutions and final answers.",
            features=tfds.features.FeaturesDict({**features, "row": tfds.features.Scalar(np.int64)}),
            homepage="https://github.com/hendrycks/math",
            disable_shuffling=True,
        )


class MathTask:
    name = "math"
    stop = ("\n\nProblem:",)  # the few-shot pattern's next problem

    def __init__(self, cfg):
        self.cfg = cfg
        self.template = tfds_util.load_template("math", ("question",))
        self.skipped_rows: dict[str, list[str]] = {}  # split -> ["file:line: why", ...] left out by skip_bad_rows

    def load(self, split: str) -> list[Example]:
        what = "a MATH jsonl file (problem, solution, answer, ...)"
        rows, self.skipped_rows[split] = tfds_util.load_jsonl_split(self.cfg, split, MathBuilder, what)
        text = tfds_util.text
        return [
            Example(f"math/{split}/{r['row']}", text(r["question"]), text(r["answer"]), text(r["solution"]),
                    category=text(r["subject"]))
            for r in rows
        ]

    def prompt(self, example: Example) -> str:
        return tfds_util.fill(self.template, question=example.question)

    def target(self, example: Example) -> str | None:
        from rpo import rewards

        return example.solution if rewards.extract_boxed(example.solution) is not None else None

    def answer(self, completion: str) -> str | None:
        from rpo import rewards

        return rewards.math_answer(completion, self.cfg.strict)

    def score(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[list[str | None], list[bool]]:
        from rpo import rewards

        return rewards.math_score(completions, [ex.answer for ex in examples], strict=self.cfg.strict)

    def same_answers(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each pair of answers (from score()) is one value, for votes: "0.5" and "\\frac12" are."""
        from rpo import rewards

        return rewards.math_equiv_batch(pairs)
