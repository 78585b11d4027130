"""A synthetic arithmetic word-problem task, generated from a seed, and its character tokenizer.

Each problem starts a quantity and changes it in several steps; the gold chain of thought
writes one equation per step and ends in the prompted answer line:

  Q: Mia has 23 pens. Mia gets 15. Mia loses 9. How many pens?
  A: 23+15=38. 38-9=29. Final answer: 29

Answers are exact non-negative integers; every intermediate value stays in [0, max_value].
Difficulty knobs (config fields of the `task` block, name='arith'):
  seed          problems are a pure function of (seed, split, index); train and test use
                disjoint streams and the test split drops any problem that is also in train
  num_train, num_test      rows per split
  min_steps, max_steps     operations per problem (uniform in the range)
  max_value     the largest start value, operand and intermediate result
  ops           the operations allowed: '+' add and '-' subtract (both required: one of them
                is always possible), optionally '*' multiply (x2, x3)
  strict        reward only the 'Final answer:' line (else also the last number)

`char_tokenizer()` is a fixed character-level tokenizer (transformers PreTrainedTokenizerFast;
<pad>=0, <eos>=1, <unk>=2, then space, newline and printable ASCII), saved with the model so
an exported checkpoint is usable on its own.
"""

from __future__ import annotations

import random

from rpo.data import Example, score_by_answer

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eli", "Kai")
ITEMS = ("apples", "shells", "stamps", "coins", "pens", "cards", "books", "rocks", "beads", "eggs")
PROMPT = "Q: {question}\nA: "
SPECIALS = ("<pad>", "<eos>", "<unk>")


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


def make_problem(rng: random.Random, *, min_steps: int, max_steps: int, max_value: int, ops: str
                 ) -> tuple[str, str, int]:
    """One problem: (question, gold chain of thought ending in 'Final answer: N', N)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, max_value)
    sentences = [f"{name} has {value} {item}."]
    equations = []
    for _ in range(rng.randint(min_steps, max_steps)):
        choices = [op for op in ops if (op != "-" or value > 0) and (op != "+" or value < max_value)
                   and (op != "*" or 2 * value <= max_value)]
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(1, max_value - value)
            sentences.append(f"{name} {rng.choice(('finds', 'buys', 'gets'))} {b}.")
            new = value + b
        elif op == "-":
            b = rng.randint(1, value)
            sentences.append(f"{name} {rng.choice(('gives', 'loses', 'sells'))} {b}.")
            new = value - b
        else:
            b = rng.choice([m for m in (2, 3) if m * value <= max_value])
            sentences.append(f"{name} {'doubles' if b == 2 else 'triples'} them.")
            new = value * b
        equations.append(f"{value}{op}{b}={new}.")
        value = new
    sentences.append(f"How many {item}?")
    return " ".join(sentences), " ".join(equations) + f" Final answer: {value}", value


class ArithTask:
    name = "arith"
    stop = ("\nQ:",)  # the model starting another problem

    def __init__(self, cfg):
        for field in ("num_train", "num_test", "min_steps", "max_steps", "max_value"):
            if not isinstance(cfg[field], int) or cfg[field] < 1:
                raise ValueError(f"config field task.{field}: must be a positive int, got {cfg[field]!r}")
        if cfg.min_steps > cfg.max_steps:
            raise ValueError(f"config field task.min_steps: {cfg.min_steps} > task.max_steps={cfg.max_steps}")
        if not cfg.ops or set(cfg.ops) - set("+-*"):
            raise ValueError(f"config field task.ops: {cfg.ops!r} must be a non-empty string of '+', '-', '*'")
        if "+" not in cfg.ops or "-" not in cfg.ops or cfg.max_value < 6:
            raise ValueError("config fields task.ops / task.max_value: need both '+' and '-', and max_value >= 6")
        self.cfg = cfg

    def _generate(self, split: str, count: int, exclude: set[str] = frozenset()) -> list[Example]:
        c = self.cfg
        rng = random.Random(f"{c.seed}/{split}")
        rows, seen = [], set(exclude)
        for _ in range(100 * count):
            if len(rows) == count:
                break
            question, solution, answer = make_problem(
                rng, min_steps=c.min_steps, max_steps=c.max_steps, max_value=c.max_value, ops=c.ops
            )
            if question in seen:
                continue
            seen.add(question)
            rows.append(Example(f"arith/{split}/{len(rows)}", question, str(answer), solution))
        if len(rows) < count:
            raise ValueError(f"config field task.num_{split}: only {len(rows)} distinct problems exist at these knobs")
        return rows

    def load(self, split: str) -> list[Example]:
        if split == "train":
            return self._generate("train", self.cfg.num_train)
        if split == "test":
            train = {ex.question for ex in self._generate("train", self.cfg.num_train)}
            return self._generate("test", self.cfg.num_test, exclude=train)
        raise ValueError(f"task arith: no split {split!r} (train | test)")

    def new_problem(self, rng: random.Random) -> Example:
        """A fresh problem at the task's knobs (what a CoT-Self-Instruct warm start demonstrates writing)."""
        c = self.cfg
        question, solution, answer = make_problem(rng, min_steps=c.min_steps, max_steps=c.max_steps,
                                                  max_value=c.max_value, ops=c.ops)
        return Example("arith/new", question, str(answer), solution)

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
