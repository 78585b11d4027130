"""Tasks: a dataset split, the prompt the model sees, the gold response, and the reward.

Every task (synthetic arithmetic, GSM8K, MATH, ARC-Challenge) is one object with the same
six methods and a `stop` attribute, so the IRPO loop never branches on the task:

  task.load(split)                 -> list[Example]    rows of "train" / "test"
  task.prompt(example)             -> str              the paper's prompt (no chat template)
  task.target(example)             -> str | None       the gold response in the format the
                                                       prompt asks for (SFT, gold winners)
  task.answer(completion)          -> str | None       the normalised final answer (None: it has none)
  task.score(completions, examples) -> (answers, correct)
        answers: list[str | None]   the extracted, normalised final answer of each
                                    completion (None when it has none): majority votes
                                    hash these strings
        correct: list[bool]         the reward: the completion's answer equals the gold one
  task.stop                        -> tuple[str, ...]  strings at which sampling cuts a completion
                                                       (the model starting another problem)

Prompt/response boundary: prompt(ex) + target(ex) is the full training text; the prompt ends
with its separator (e.g. "Solution:\n"), so a target or a sampled completion starts directly
with its first word.

Optional: tasks reading files expose `skipped_rows: dict[split, list[str]]`, the rows of each
loaded split left out with skip_bad_rows ("file:line: why"), also when prepared data is reused.

`get_task(cfg)` builds the task named by `cfg.name` from a config's `task` block.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from rpo.configlib import ConfigError


@dataclasses.dataclass(frozen=True)
class Example:
    uid: str  # stable across runs, e.g. "gsm8k/train/17"
    question: str  # the problem text as the dataset gives it (ARC: the stem only)
    answer: str  # the gold final answer (GSM8K: the number after ####; ARC: the letter)
    solution: str = ""  # the dataset's worked solution, "" when it has none
    choices: tuple[tuple[str, str], ...] = ()  # ARC: ((label, text), ...)
    category: str = ""  # MATH: the subject; CoT-Self-Instruct pairs seeds of one category


class Task(Protocol):
    name: str
    stop: tuple[str, ...]  # strings at which sampling cuts a completion (the model starting another problem)

    def load(self, split: str) -> list[Example]: ...

    def prompt(self, example: Example) -> str: ...

    def target(self, example: Example) -> str | None: ...

    def answer(self, completion: str) -> str | None: ...

    def score(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[list[str | None], list[bool]]: ...


def score_by_answer(task_name: str, completions: Sequence[str], examples: Sequence[Example], answer, gold
                    ) -> tuple[list[str | None], list[bool]]:
    """Task.score for tasks whose answers compare as normalised strings: answer(completion) ->
    str | None extracts each completion's answer once; gold(example.answer) -> str is the
    normalised gold it must equal."""
    if len(completions) != len(examples):
        raise ValueError(f"task {task_name}: {len(completions)} completions for {len(examples)} examples")
    answers = [answer(c) for c in completions]
    correct = [a is not None and a == gold(ex.answer) for a, ex in zip(answers, examples)]
    return answers, correct


def get_task(cfg) -> Task:
    """The task named by cfg.name ('arith' | 'gsm8k' | 'math' | 'arc'), configured by cfg."""
    name = cfg.name
    if name == "arith":
        from rpo.data.synthetic import ArithTask

        return ArithTask(cfg)
    if name == "gsm8k":
        from rpo.data.gsm8k import GSM8KTask

        return GSM8KTask(cfg)
    if name == "math":
        from rpo.data.math import MathTask

        return MathTask(cfg)
    if name == "arc":
        from rpo.data.arc import ARCTask

        return ARCTask(cfg)
    raise ConfigError(f"config field task.name: {name!r} is not one of 'arith', 'gsm8k', 'math', 'arc'")
