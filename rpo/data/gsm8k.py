"""GSM8K (Cobbe et al. 2021) as a TFDS dataset built from the official jsonl files, and its task.

Source: train.jsonl / test.jsonl of github.com/openai/grade-school-math (grade_school_math/data),
one {"question", "answer"} object a line, the answer a worked solution with <<a*b=c>>
calculator annotations that ends in "#### N". `Gsm8kBuilder` (TFDS name rpo_gsm8k) reads them
from its manual dir, keeps the file order (row = line - 1) and splits each answer into the
solution (before "####") and the gold answer N (after it, as written, e.g. "1,080"). A row with
no question, or without a number after "####" (as rpo.rewards.gsm8k_gold reads it), is a bad
row (see tfds_util). Splits are the files present.

Task config fields (the `task` block, name='gsm8k'): source_dir (the directory holding the two
files), tfds_dir, skip_bad_rows, max_examples, strict (passed to rpo.rewards).

Prompt: zero-shot, templates/gsm8k.txt (the IRPO paper's: step-by-step reasoning, then
"Final answer: ..."), ending "Solution:\n". target(): the solution without the <<...>>
annotations, then "Final answer: N". stop: a new "Question:" block or a repeat of the
instruction, which is what a model continuing the prompt's pattern writes next.
score(): each completion's number (rpo.rewards.gsm8k_answer) against the gold's (gsm8k_gold).
uid: "gsm8k/<split>/<row>".
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from rpo.data import Example, score_by_answer
from rpo.data import tfds_util
from rpo.data.tfds_util import BadRow, tfds

CALCULATOR = re.compile(r"<<[^<>]*>>")


def parse_row(obj: dict) -> dict:
    from rpo import rewards

    question, answer = obj.get("question"), obj.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise BadRow("no 'question'")
    if not isinstance(answer, str) or "####" not in answer:
        raise BadRow("no '####' answer")
    solution, _, gold = answer.rpartition("####")
    try:
        rewards.gsm8k_gold(gold)
    except ValueError:
        raise BadRow(f"no number after '####': {gold.strip()!r}") from None
    return {"question": question, "solution": solution.strip(), "answer": gold.strip()}


class Gsm8kBuilder(tfds_util.JsonlBuilder):
    """GSM8K from the official train.jsonl / test.jsonl in the manual dir."""

    name = "rpo_gsm8k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "File order kept; answer split into solution and gold at '####'."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put train.jsonl and/or test.jsonl of github.com/openai/grade-school-math (grade_school_math/data/) "
        "in the manual dir."
    )
    parse_row = staticmethod(parse_row)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {key: tfds.features.Text() for key in ("question", "solution", "answer")}
        return tfds.core.DatasetInfo(
            builder=self,
            description="GSM8K grade-school math word problems with worked solutions.",
            features=tfds.features.FeaturesDict({**features, "row": tfds.features.Scalar(np.int64)}),
            homepage="https://github.com/openai/grade-school-math",
            disable_shuffling=True,
        )


class GSM8KTask:
    name = "gsm8k"
    stop = ("\n\nQuestion:", "\n\nYour task is")  # the template's next problem, from either of its blocks

    def __init__(self, cfg):
        self.cfg = cfg
        self.template = tfds_util.load_template("gsm8k", ("question",))
        self.skipped_rows: dict[str, list[str]] = {}  # split -> ["file:line: why", ...] left out by skip_bad_rows

    def load(self, split: str) -> list[Example]:
        what = "GSM8K's official file (github.com/openai/grade-school-math)"
        rows, self.skipped_rows[split] = tfds_util.load_jsonl_split(self.cfg, split, Gsm8kBuilder, what)
        text = tfds_util.text
        return [
            Example(f"gsm8k/{split}/{r['row']}", text(r["question"]), text(r["answer"]), text(r["solution"]))
            for r in rows
        ]

    def prompt(self, example: Example) -> str:
        return tfds_util.fill(self.template, question=example.question)

    def target(self, example: Example) -> str:
        return f"{CALCULATOR.sub('', example.solution)}\nFinal answer: {example.answer}"

    def answer(self, completion: str) -> str | None:
        from rpo import rewards

        return rewards.gsm8k_answer(completion, self.cfg.strict)

    def score(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[list[str | None], list[bool]]:
        from rpo import rewards

        return score_by_answer("gsm8k", completions, examples, self.answer, rewards.gsm8k_gold)
