"""A synthetic multi-step arithmetic task, generated from a seed, and its character tokenizer.

A problem is a start value and a chain of operations, applied left to right:

  Q: 23 +15 -9 *2
  A: 23+15=38. 38-9=29. 29*2=58. Final answer: 58

A solution writes one equation per step and ends in the prompted answer line. Two styles:
  equations   the model's own, as above (what M_0 was pre-trained on: experiments/arith_m0.py)
  prose       the task's gold solutions, a human's style (spaces, commas, 'x' for times):
                23 + 15 = 38, 38 - 9 = 29, 29 x 2 = 58. Final answer: 58
Every step is an injective map (+b, -b, *m), so one wrong step always gives a wrong final answer:
a correct answer by luck needs two errors that cancel. `check_steps` reads the equations of a
completion and says whether every step is right (the winner precision of rpo.irpo).

Config fields of the `task` block (name='arith'):
  seed          problems are a pure function of (seed, split, index); the splits are disjoint
                (a problem in train is never in test)
  num_train, num_test      rows per split (rpo.irpo holds out the last select.heldout train rows)
  min_steps, max_steps     operations per problem (uniform in the range)
  max_value     the largest start value, operand and intermediate result
  ops           operations: '+' and '-' (both required) and optionally '*' (x2, x3)
  style         the gold solutions' style: 'prose' (a human's) or 'equations' (the model's own)
  strict        reward only the 'Final answer:' line (else also the last number)

`char_tokenizer()` is a fixed character-level tokenizer (transformers PreTrainedTokenizerFast;
<pad>=0, <eos>=1, <unk>=2, then space, newline and printable ASCII), saved with the model so
an exported checkpoint is usable on its own.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

from rpo.configlib import ConfigError
from rpo.data import Example, score_by_answer

STYLES = ("prose", "equations")
SPLITS = ("train", "test")
PROMPT = "Q: {question}\nA: "
SPECIALS = ("<pad>", "<eos>", "<unk>")

Step = tuple[int, str, int, int]  # (a, op, b, c): a op b = c, op in '+-*'

_EQUATION = re.compile(r"(\d+)\s*([-+*x])\s*(\d+)\s*=\s*(\d+)")
_QUESTION = re.compile(r"^(\d+)((?: [-+*]\d+)+)$")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def char_tokenizer():
    """The character-level tokenizer of the synthetic task (a transformers tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [" ", "\n"] + [chr(i) for i in range(33, 127)]
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@dataclasses.dataclass(frozen=True)
class Problem:
    steps: tuple[Step, ...]

    @property
    def question(self) -> str:
        return " ".join([str(self.steps[0][0])] + [f"{op}{b}" for _, op, b, _ in self.steps])

    @property
    def answer(self) -> int:
        return self.steps[-1][3]

    def solution(self, style: str) -> str:
        if style == "equations":
            body = " ".join(f"{a}{op}{b}={c}." for a, op, b, c in self.steps)
        elif style == "prose":
            body = ", ".join(f"{a} {'x' if op == '*' else op} {b} = {c}" for a, op, b, c in self.steps) + "."
        else:
            raise ConfigError(f"config field task.style: {style!r} is not one of {STYLES}")
        return f"{body} Final answer: {self.answer}"


def make_problem(rng: random.Random, *, min_steps: int, max_steps: int, max_value: int, ops: str) -> Problem:
    """One problem with min_steps..max_steps operations; every value stays in [1, max_value]."""
    value = rng.randint(1, max_value)
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        choices = [op for op in ops if (op != "-" or value > 1) and (op != "+" or value < max_value)
                   and (op != "*" or 2 * value <= max_value)]
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(1, max_value - value)
        elif op == "-":
            b = rng.randint(1, value - 1)
        else:
            b = rng.choice([m for m in (2, 3) if m * value <= max_value])
        steps.append((value, op, b, _APPLY[op](value, b)))
        value = steps[-1][3]
    return Problem(tuple(steps))


def question_steps(question: str) -> tuple[Step, ...]:
    """The true steps of a problem, read back from its text ("23 +15 -9 *2")."""
    m = _QUESTION.match(question.strip())
    if not m:
        raise ValueError(f"not an arith problem (a number, then ' <op><number>' per step): {question!r}")
    value, steps = int(m.group(1)), []
    for term in m.group(2).split():
        op, b = term[0], int(term[1:])
        steps.append((value, op, b, _APPLY[op](value, b)))
        value = steps[-1][3]
    return tuple(steps)


def completion_steps(completion: str) -> tuple[Step, ...]:
    """The equations a completion writes, in order, as (a, op, b, c); 'x' reads as '*'."""
    return tuple((int(a), "*" if op == "x" else op, int(b), int(c)) for a, op, b, c in _EQUATION.findall(completion))


def check_steps(completion: str, question: str) -> bool:
    """Whether the completion's equations are exactly the problem's steps, each computed right."""
    return completion_steps(completion) == question_steps(question)


class ArithTask:
    name = "arith"
    stop = ("\nQ:",)  # the model starting another problem

    def __init__(self, cfg):
        for field in ("num_train", "num_test", "min_steps", "max_steps", "max_value"):
            if not isinstance(cfg[field], int) or cfg[field] < 1:
                raise ConfigError(f"config field task.{field}: must be a positive int, got {cfg[field]!r}")
        if cfg.min_steps > cfg.max_steps:
            raise ConfigError(f"config field task.min_steps: {cfg.min_steps} > task.max_steps={cfg.max_steps}")
        if not cfg.ops or set(cfg.ops) - set("+-*"):
            raise ConfigError(f"config field task.ops: {cfg.ops!r} must be a non-empty string of '+', '-', '*'")
        if "+" not in cfg.ops or "-" not in cfg.ops or cfg.max_value < 6:
            raise ConfigError("config fields task.ops / task.max_value: need both '+' and '-', and max_value >= 6")
        if cfg.style not in STYLES:
            raise ConfigError(f"config field task.style: {cfg.style!r} is not one of {STYLES}")
        self.cfg = cfg
        self._splits: dict[str, list[Example]] = {}

    def problems(self, stream: str, count: int, exclude: set[str] = frozenset()) -> list[Problem]:
        """`count` distinct problems of the seeded stream `stream`, none of whose texts is in `exclude`."""
        c = self.cfg
        rng = random.Random(f"{c.seed}/{stream}")
        out, seen = [], set(exclude)
        for _ in range(100 * count):
            if len(out) == count:
                break
            p = make_problem(rng, min_steps=c.min_steps, max_steps=c.max_steps, max_value=c.max_value, ops=c.ops)
            if p.question not in seen:
                seen.add(p.question)
                out.append(p)
        if len(out) < count:
            raise ConfigError(f"config field task.num_{stream}: only {len(out)} distinct problems exist at these knobs")
        return out

    def load(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"task arith: no split {split!r} ({' | '.join(SPLITS)})")
        if split not in self._splits:
            earlier = {ex.question for s in SPLITS[:SPLITS.index(split)] for ex in self.load(s)}
            count = self.cfg[f"num_{split}"]
            self._splits[split] = [
                Example(f"arith/{split}/{i}", p.question, str(p.answer), p.solution(self.cfg.style))
                for i, p in enumerate(self.problems(split, count, exclude=earlier))]
        return self._splits[split]

    def new_problem(self, rng: random.Random) -> Example:
        """A fresh problem at the task's knobs (what a CoT-Self-Instruct warm start demonstrates writing)."""
        c = self.cfg
        p = make_problem(rng, min_steps=c.min_steps, max_steps=c.max_steps, max_value=c.max_value, ops=c.ops)
        return Example("arith/new", p.question, str(p.answer), p.solution(c.style))

    def prompt(self, example: Example) -> str:
        return PROMPT.format(question=example.question)

    def target(self, example: Example) -> str:
        return example.solution

    def answer(self, completion: str) -> str | None:
        from rpo import rewards

        return rewards.gsm8k_answer(completion, self.cfg.strict)

    def score(self, completions, examples):
        from rpo import rewards

        return score_by_answer("arith", completions, examples, self.answer, rewards.gsm8k_gold)

    def steps_correct(self, completions: Sequence[str], examples: Sequence[Example]) -> list[bool]:
        """Per completion: every step right (check_steps), for the winner precision."""
        return [check_steps(c, ex.question) for c, ex in zip(completions, examples)]
