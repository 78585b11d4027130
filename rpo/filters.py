"""CoT-Self-Instruct's pure pieces (Yu et al. 2025): prompt templates, parsing of generated text, the
quality filters (Answer-Consistency, Self-Consistency, RIP) and ROUGE-L near-duplicate removal.

Shapes: P generated prompts, K samples (solutions or judged responses) per prompt; arrays `x_P`, `x_PK`.

Templates. Plain text files in rpo/data/templates/self_instruct/ with str.format placeholders (literal
braces are doubled: `\\boxed{{}}`). Each template has a role that fixes its placeholders (TEMPLATE_FIELDS):
the two generators per kind (CoT and the Self-Instruct baseline, verifiable and instruction) and `judge`
(the policy as a 1-10 judge for RIP, whose last line judge_score reads). The filters' K solutions use the
task's own prompt, so no template is needed for them.

Parsing. Generated text carries its output between markers: `[New Question Begin]...[New Question End]`
and `[Final Answer to New Question Begin]\\boxed{...}[Final Answer to New Question End]` (verifiable),
`[New Prompt Begin]...[New Prompt End]` (instructions). Markers match with any case and spacing inside
the brackets. A parse is accepted (reason None) or rejected with one reason code:
  MISSING_QUESTION      no "[New Question Begin]" followed by a "[New Question End]"
  MULTIPLE_QUESTIONS    either question marker appears more than once (more than one new question)
  EMPTY_QUESTION        nothing but spaces between the question markers
  MISSING_ANSWER        no answer-marker pair (only checked with_answer)
  MULTIPLE_ANSWERS      either answer marker appears more than once
  NO_BOXED_ANSWER       no \\boxed{} between the answer markers
  NOT_CHECKABLE         the boxed answer is not one checkable value (checkable_answer), or there are several
  MISSING_PROMPT / MULTIPLE_PROMPTS / EMPTY_PROMPT   the same three for the instruction markers
Checkable answers (checkable_answer) are an integer, a fraction in lowest terms, an exact radical with
integer parts and simplified radicands, or a letter A-E, returned in one written form ("\\frac{3}{4}",
"2\\sqrt{3}", "C") after math-verify's LaTeX normalisation (latex2sympy2_extended.normalize_latex).

Filters. Each takes plain arrays and returns a FilterResult: a keep mask, a reason per row (None when
kept) and the per-row numbers behind the decision. Votes come from rpo.consistency (answer_ids, then
majority_vote), and answers are grouped by `same`, by default rewards.math_equiv_batch, the MATH grader's
equivalence: "0.5", "\\frac12" and "1/2" share their votes, and the generated answer is the majority's when
it is the same value. On the other tasks' answers it is string equality but for decimals equal to 6 places
(integers and identical strings are settled without math-verify; the letters A-E equal only themselves);
pass same=None for plain string equality. A prompt's vote share is the winner's votes over its K samples,
so samples without an answer count against agreement. Tie policies (`ties`), for a top vote count shared by several
answers: "reject" rejects the prompt (TIE), "first" takes the answer that appears first (majority_vote's
rule), "any" (answer consistency only) accepts when the generated answer is one of the tied answers.
  answer_consistency  NO_GENERATED_ANSWER, NO_VALID_SOLUTION, TIE, MAJORITY_DIFFERS, LOW_VOTE_SHARE
  self_consistency    NO_VALID_SOLUTION, TIE, LOW_VOTE_SHARE (the majority answer becomes the label)
  rip                 LOW_MIN_REWARD: a prompt's lowest score is below the percentile of all lowest scores

Near duplicates. ROUGE-L F1 = 2 LCS / (m + n) over lowercased word tokens (runs of Unicode letters and
digits: rouge_score's default tokenizer on ASCII text, without stemming); 0 when either text has no
token. A text is a duplicate when its score against a reference or an earlier kept text is >= threshold
(Self-Instruct: 0.7). The LCS is bit-parallel (Allison-Dix / Hyyro: one big-int step per token of the
other text); pairs whose bound 2 * overlap / (m + n) is below the threshold are never compared, where
overlap = sum over tokens of min(count in a, count in b) >= LCS, computed for all pairs at once as a sparse
product of (token, occurrence number) indicator matrices.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import string
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse

from rpo import consistency, rewards

# ----------------------------------------------------------------------------- templates

TEMPLATES_DIR = Path(__file__).parent / "data" / "templates" / "self_instruct"
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "cot_verifiable": ("seed1", "seed2"),
    "cot_instruction": ("seed1", "seed2"),
    "self_instruct_verifiable": ("seed1", "seed2"),
    "self_instruct_instruction": ("seed1", "seed2"),
    "judge": ("prompt", "response"),
}
_ROLE_KINDS = {("seed1", "seed2"): "a generator", ("prompt", "response"): "judge"}


def _braced(fields: Sequence[str]) -> str:
    return ", ".join("{" + f + "}" for f in fields)


def load_template(name_or_path: str | os.PathLike, *, role: str | None = None) -> str:
    """The text of a template. A bare name ("cot_verifiable") is the packaged file TEMPLATES_DIR/<name>.txt;
    anything with a path separator or a suffix is a file of your own. `role` is the TEMPLATE_FIELDS entry
    whose placeholders the file must use, all of them and no others; by default the name, or the file's stem
    when that is a role, else the role whose placeholders the file uses. Errors name the file and the
    placeholders."""
    text = os.fspath(name_or_path)
    bare = not isinstance(name_or_path, os.PathLike) and "/" not in text and os.sep not in text and "." not in text
    path = TEMPLATES_DIR / f"{text}.txt" if bare else Path(text)
    if role is None and (bare or path.stem in TEMPLATE_FIELDS):
        role = text if bare else path.stem
    if role is not None and role not in TEMPLATE_FIELDS:
        raise ValueError(f"template {text!r}: unknown role {role!r}; pass role= one of {', '.join(TEMPLATE_FIELDS)}")
    kinds = "; ".join(f"{kind}: {_braced(fields)}" for fields, kind in _ROLE_KINDS.items())
    if not path.is_file():
        need = f"a {role} template with the placeholders {_braced(TEMPLATE_FIELDS[role])}" if role else kinds
        raise FileNotFoundError(f"{path}: no such template file ({need})")
    template = path.read_text(encoding="utf-8")
    try:
        found = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:
        raise ValueError(f"{path}: not a str.format template ({e}); write a literal brace as {{{{ or }}}}") from e
    if role is None:
        role = next((r for r, fields in TEMPLATE_FIELDS.items() if set(fields) == found), None)
        if role is None:
            raise ValueError(f"{path}: its placeholders {_braced(sorted(found))} fit no template ({kinds}); "
                             "pass role= to name the one it is meant to be")
    fields = TEMPLATE_FIELDS[role]
    for field in fields:
        if field not in found:
            raise ValueError(f"{path}: missing the placeholder {{{field}}} (a {role} template needs "
                             f"{_braced(fields)})")
    unknown = sorted(found - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown placeholder(s) {_braced(unknown)} (a {role} template uses only "
                         f"{_braced(fields)}; write a literal brace as {{{{ or }}}})")
    return template


# ----------------------------------------------------------------------------- parsing

MISSING_QUESTION = "missing_question"
MULTIPLE_QUESTIONS = "multiple_questions"
EMPTY_QUESTION = "empty_question"
MISSING_ANSWER = "missing_answer"
MULTIPLE_ANSWERS = "multiple_answers"
NO_BOXED_ANSWER = "no_boxed_answer"
NOT_CHECKABLE = "answer_not_checkable"
MISSING_PROMPT = "missing_prompt"
MULTIPLE_PROMPTS = "multiple_prompts"
EMPTY_PROMPT = "empty_prompt"


def _marker(words: str) -> re.Pattern:
    return re.compile(r"\[\s*" + r"\s+".join(words.split()) + r"\s*\]", re.IGNORECASE)


_QUESTION = (_marker("new question begin"), _marker("new question end"))
_ANSWER = (_marker("final answer to new question begin"), _marker("final answer to new question end"))
_PROMPT = (_marker("new prompt begin"), _marker("new prompt end"))
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


@dataclasses.dataclass(frozen=True)
class Parsed:
    question: str | None  # the new question / prompt, stripped; None when rejected
    answer: str | None  # the checkable answer in its written form (verifiable with_answer only)
    reason: str | None = None  # None: accepted; else one of the reason codes above

    @property
    def ok(self) -> bool:
        return self.reason is None


def _block(text: str, markers: tuple[re.Pattern, re.Pattern], missing: str, multiple: str
           ) -> tuple[str | None, str | None]:
    """(the stripped text between one begin/end marker pair, None) or (None, reason)."""
    begins, ends = (list(m.finditer(text)) for m in markers)
    if len(begins) > 1 or len(ends) > 1:
        return None, multiple
    if not begins or not ends or ends[0].start() < begins[0].end():
        return None, missing
    return text[begins[0].end():ends[0].start()].strip(), None


def parse_verifiable(text: str, *, with_answer: bool = True) -> Parsed:
    """The new question (and, with_answer, its checkable boxed answer) of a generated text; see the module
    docstring for the markers and the reason codes. With with_answer=False (the Self-Instruct baseline,
    whose label comes from a majority vote) the answer markers are ignored and `answer` is None."""
    question, reason = _block(text, _QUESTION, MISSING_QUESTION, MULTIPLE_QUESTIONS)
    if reason is None and not question:
        reason = EMPTY_QUESTION
    if reason is not None or not with_answer:
        return Parsed(question if reason is None else None, None, reason)
    block, reason = _block(text, _ANSWER, MISSING_ANSWER, MULTIPLE_ANSWERS)
    if reason is not None:
        return Parsed(None, None, reason)
    boxed = rewards.extract_boxed(block)
    if boxed is None:
        return Parsed(None, None, NO_BOXED_ANSWER)
    answer = checkable_answer(boxed) if len(_BOXED_RE.findall(block)) == 1 else None
    if answer is None:
        return Parsed(None, None, NOT_CHECKABLE)
    return Parsed(question, answer)


def parse_instruction(text: str) -> Parsed:
    """The new prompt of a generated text (between "[New Prompt Begin]" and "[New Prompt End]") as
    `question`; reasons MISSING_PROMPT, MULTIPLE_PROMPTS, EMPTY_PROMPT."""
    prompt, reason = _block(text, _PROMPT, MISSING_PROMPT, MULTIPLE_PROMPTS)
    if reason is None and not prompt:
        reason = EMPTY_PROMPT
    return Parsed(prompt if reason is None else None, None, reason)


_SCORE_RE = re.compile(r"score\s*:\s*\**\s*(\d+)(?!\d|\.\d)", re.IGNORECASE)


def judge_score(text: str) -> int | None:
    """The judge's rating: the number of the last "Score: N" (also "Score: **N**", "Score: N/10") when
    it is 1-10, else None."""
    found = _SCORE_RE.findall(text)
    if not found:
        return None
    score = int(found[-1])
    return score if 1 <= score <= 10 else None


# ----------------------------------------------------------------------------- checkable answers

_DECIMAL_RE = re.compile(r"\.\d")
_RADICAL_TOKEN_RE = re.compile(r"\d+|\\sqrt|\\frac|[{}\[\]+-]|.")
_MAX_RADICAND = 10**9  # larger radicands are not checked for square factors: not checkable
_MAX_CHECKABLE_CHARS = 200
# What a single value may still carry after normalize_latex: a text wrapper, a degree sign, "x =" in front.
_WRITTEN_SUBS = [(re.compile(p), r) for p, r in (
    (r"\s+|\$", ""), (r"\\(?:text|textrm|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1"),
    (r"\^\{?\\circ\}?|\\circ|\\degree", ""), (r"^[a-zA-Z]=", ""), (r"^\(([A-Z])\)$", r"\1"),
    (r"^\\frac\{-(\d+)\}", r"-\\frac{\1}"))]
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+")
_INTEGER_RE = re.compile(r"-?(?:0|[1-9]\d*)")
_FRACTION_RE = re.compile(r"-?\\frac\{([1-9]\d*)\}\{([1-9]\d*)\}")


def checkable_answer(s: str) -> str | None:
    """The written form of s when s is ONE checkable value, else None. Checkable: an integer ("-1,200" ->
    "-1200"), a fraction in lowest terms with a positive denominator > 1 (\\frac{3}{4}, \\dfrac, \\tfrac, \\frac34,
    3/4, a sign in front or on the numerator -> "\\frac{3}{4}", "-\\frac{2}{3}"), an exact radical (sums of terms
    [integer]\\sqrt{r} or \\sqrt[k]{r} and integers, in \\frac{}{} or not, with integers > 1 as coefficients, k >= 3
    and r free of k-th powers), or a letter A-E ("C", "(C)", "\\text{(C)}"); a unit, a degree sign or "x =" in
    front may be there. Not: decimals, "4/2", "\\frac{6}{8}", mixed numbers, intervals, variables, several
    values, constants such as \\pi. The form is math-verify's normalize_latex, then the rewrites above."""
    if not isinstance(s, str):
        raise TypeError(f"checkable_answer: expected str, got {type(s).__name__}")
    if len(s) > _MAX_CHECKABLE_CHARS or _DECIMAL_RE.search(s.strip().rstrip(".")):
        return None
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, normalize_latex

    config = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all")
    written = normalize_latex(s, config)
    for pattern, new in _WRITTEN_SUBS:
        written = pattern.sub(new, written)
    if _THOUSANDS_RE.fullmatch(written):
        written = written.replace(",", "")
    if re.fullmatch(r"[A-E]", written) or _INTEGER_RE.fullmatch(written):
        return written
    if m := _FRACTION_RE.fullmatch(written):
        return written if int(m.group(2)) > 1 and math.gcd(int(m.group(1)), int(m.group(2))) == 1 else None
    return written if "\\sqrt" in written and _Radical(written).parse() else None


class _Radical:
    """Recognises the exact-radical grammar of checkable_answer on its written form:
    expr := ['-'] term (('+' | '-') term)*;  term := int | [int] root | \\frac{expr}{expr};
    root := \\sqrt{int} | \\sqrt[int]{int}."""

    def __init__(self, s: str):
        self.tokens = _RADICAL_TOKEN_RE.findall(s)
        self.i = 0

    def parse(self) -> bool:
        return self.expr() and self.i == len(self.tokens)

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def eat(self, token: str) -> bool:
        if self.peek() == token:
            self.i += 1
            return True
        return False

    def integer(self) -> int | None:
        t = self.peek()
        if t is None or not t.isdigit() or (len(t) > 1 and t[0] == "0"):
            return None
        self.i += 1
        return int(t)

    def expr(self) -> bool:
        self.eat("-")
        if not self.term():
            return False
        while self.peek() in ("+", "-"):
            self.i += 1
            if not self.term():
                return False
        return True

    def term(self) -> bool:
        if self.eat("\\frac"):
            if not (self.eat("{") and self.expr() and self.eat("}") and self.eat("{")):
                return False
            denominator = self.i
            return self.expr() and self.eat("}") and self.tokens[denominator:self.i - 1] not in (["0"], ["1"])
        coefficient = self.integer()
        if self.peek() != "\\sqrt":
            return coefficient is not None
        return (coefficient is None or coefficient > 1) and self.root()

    def root(self) -> bool:
        self.i += 1  # \sqrt
        k = 2
        if self.eat("["):
            k = self.integer()
            if k is None or k < 3 or not self.eat("]"):
                return False
        if not self.eat("{"):
            return False
        r = self.integer()
        return r is not None and self.eat("}") and _power_free(r, k)


def _power_free(r: int, k: int) -> bool:
    """Whether 2 <= r <= _MAX_RADICAND has no divisor d**k with d > 1."""
    if not 2 <= r <= _MAX_RADICAND:
        return False
    d = 2
    while d**k <= r:
        if r % d**k == 0:
            return False
        d += 1
    return True


# ----------------------------------------------------------------------------- filters

NO_GENERATED_ANSWER = "no_generated_answer"
NO_VALID_SOLUTION = "no_valid_solution"
MAJORITY_DIFFERS = "majority_differs"
TIE = "tie"
LOW_VOTE_SHARE = "low_vote_share"
LOW_MIN_REWARD = "low_min_reward"
TIE_POLICIES = ("reject", "first", "any")


@dataclasses.dataclass(frozen=True, eq=False)
class FilterResult:
    """One filter's verdict on P prompts. keep[p] is True iff reason[p] is None. The other per-row fields
    are set by the filters that compute them (None otherwise): majority (the voted answer: the label of
    self_consistency), votes and vote_share of the majority, tied (the top vote count was shared), min_score
    (rip: the lowest of a prompt's K scores); cutoff is rip's percentile value over the batch."""

    keep: np.ndarray  # bool [P]
    reason: list[str | None]
    majority: list[str | None] | None = None
    votes: np.ndarray | None = None  # int32 [P]
    vote_share: np.ndarray | None = None  # float64 [P]
    tied: np.ndarray | None = None  # bool [P]
    min_score: np.ndarray | None = None  # float64 [P]
    cutoff: float | None = None

    def row(self, p: int) -> dict:
        """The verdict on prompt p as a JSON-ready dict (keep, reason, and the fields this filter sets)."""
        out: dict = {"keep": bool(self.keep[p]), "reason": self.reason[p]}
        if self.majority is not None:
            out.update(majority=self.majority[p], votes=int(self.votes[p]), vote_share=float(self.vote_share[p]),
                       tied=bool(self.tied[p]))
        if self.min_score is not None:
            out.update(min_score=float(self.min_score[p]), cutoff=self.cutoff)
        return out

    def counts(self) -> dict[str, int]:
        """{"kept": n, <reason>: n, ...}: how many prompts were kept and rejected for each reason."""
        return {"kept": int(self.keep.sum()), **collections.Counter(r for r in self.reason if r is not None)}


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: must be in [0, 1]")


def _check_ties(ties: str, allowed: Sequence[str]) -> None:
    if ties not in allowed:
        raise ValueError(f"ties={ties!r}: must be one of {', '.join(map(repr, allowed))}")


def _tally(solutions: Sequence[Sequence[str | None]], same, generated: Sequence[str | None] | None = None):
    """Majority vote per prompt via rpo.consistency: (ids_PK, valid_PK, winner ids_P, winner strings, votes_P,
    tied_P, K_P, generated ids_P). tied: the runner-up (the vote with the winner's samples masked out) has as
    many votes.
    With `generated`, each prompt's generated answer is grouped with its solutions (it comes first, so it
    names its class) but does not vote; its id is NO_ANSWER when it is None."""
    for p, row in enumerate(solutions):
        if len(row) == 0:
            raise ValueError(f"solutions[{p}]: no samples (each prompt needs K >= 1 solution answers)")
    rows = [[generated[p], *row] for p, row in enumerate(solutions)] if generated is not None else solutions
    vocab: dict[str, int] = {}
    ids, valid = consistency.answer_ids(rows, vocab, same=same)
    generated_ids = ids[:, 0] if generated is not None else None
    if generated is not None:
        ids, valid = ids[:, 1:], valid[:, 1:]
    winner, votes = (np.asarray(x) for x in consistency.majority_vote(ids, valid))
    _, runner_up = consistency.majority_vote(ids, valid & (ids != winner[:, None]))
    tied = (votes > 0) & (np.asarray(runner_up) == votes)
    names = {i: a for a, i in vocab.items()}
    majority = [names[int(w)] if v > 0 else None for w, v in zip(winner, votes)]
    k = np.array([len(row) for row in solutions], np.int32)
    return ids, valid, winner, majority, votes.astype(np.int32), tied, k, generated_ids


def answer_consistency(generated: Sequence[str | None], solutions: Sequence[Sequence[str | None]], *,
                       min_share: float, ties: str, same=rewards.math_equiv_batch) -> FilterResult:
    """Answer-Consistency: keep a generated question when the majority answer of its K solutions equals its
    generated answer and the majority's vote share (votes / K) is >= min_share. Answers are strings
    (parse_verifiable's answer, Task.score's answers; None: no answer) grouped by `same` (see the module
    docstring); ties: see the module docstring. `majority` is the answer the decision used, in its first
    spelling (with ties="any", the generated one when it is among the tied answers)."""
    if len(generated) != len(solutions):
        raise ValueError(f"answer_consistency: {len(generated)} generated answers but {len(solutions)} solution rows")
    _check_fraction("min_share", min_share)
    _check_ties(ties, TIE_POLICIES)
    if not generated:
        return _empty_votes()
    for p, answer in enumerate(generated):
        if answer is not None and not isinstance(answer, str):
            raise TypeError(f"generated[{p}]: expected str or None, got {type(answer).__name__}")
    ids, valid, winner, majority, votes, tied, k, generated_ids = _tally(solutions, same, generated)
    winner = winner.copy()
    share = votes / k
    reason: list[str | None] = []
    for p, answer in enumerate(generated):
        if ties == "any" and tied[p] and answer is not None:
            if int(((ids[p] == generated_ids[p]) & valid[p]).sum()) == votes[p]:
                majority[p], winner[p] = answer, generated_ids[p]
        if answer is None:
            reason.append(NO_GENERATED_ANSWER)
        elif votes[p] == 0:
            reason.append(NO_VALID_SOLUTION)
        elif tied[p] and ties == "reject":
            reason.append(TIE)
        elif winner[p] != generated_ids[p]:
            reason.append(MAJORITY_DIFFERS)
        elif share[p] < min_share:
            reason.append(LOW_VOTE_SHARE)
        else:
            reason.append(None)
    return FilterResult(np.array([r is None for r in reason]), reason, majority, votes, share, tied)


def self_consistency(solutions: Sequence[Sequence[str | None]], *, threshold: float = 0.5, ties: str = "reject",
                     same=rewards.math_equiv_batch) -> FilterResult:
    """Self-Consistency (the Self-Instruct baseline's filter): keep a question when the majority answer of
    its K solutions (grouped by `same`, see the module docstring) has a vote share (votes / K) >= threshold;
    `majority` is then its label, in its first spelling. ties: "reject" (no label without a strict majority)
    or "first"."""
    _check_fraction("threshold", threshold)
    _check_ties(ties, ("reject", "first"))
    if not solutions:
        return _empty_votes()
    _, _, _, majority, votes, tied, k, _ = _tally(solutions, same)
    share = votes / k
    reason: list[str | None] = []
    for p in range(len(solutions)):
        if votes[p] == 0:
            reason.append(NO_VALID_SOLUTION)
        elif tied[p] and ties == "reject":
            reason.append(TIE)
        elif share[p] < threshold:
            reason.append(LOW_VOTE_SHARE)
        else:
            reason.append(None)
    return FilterResult(np.array([r is None for r in reason]), reason, majority, votes, share, tied)


def _empty_votes() -> FilterResult:
    return FilterResult(np.zeros(0, bool), [], [], np.zeros(0, np.int32), np.zeros(0), np.zeros(0, bool))


def rip(scores: np.ndarray, *, percentile: float) -> FilterResult:
    """RIP (Yu et al. 2025, "Rejecting Instruction Preferences"): scores_PK are the rewards of K responses
    per prompt; keep a prompt when its LOWEST score is >= the `percentile` (0-100, numpy's linear
    interpolation) of the lowest scores over the batch. A NaN or infinite score is an error naming its row."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"rip: scores must have shape [prompts, responses >= 1], got {scores.shape}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile={percentile!r}: must be in [0, 100]")
    bad = np.argwhere(~np.isfinite(scores))
    if len(bad):
        p, k = bad[0]
        raise ValueError(f"rip: scores row {p} (response {k}) is {scores[p, k]}: every score must be finite")
    if scores.shape[0] == 0:
        return FilterResult(np.zeros(0, bool), [], min_score=np.zeros(0), cutoff=None)
    lowest = scores.min(axis=1)
    cutoff = float(np.percentile(lowest, percentile))
    keep = lowest >= cutoff
    return FilterResult(keep, [None if k else LOW_MIN_REWARD for k in keep], min_score=lowest, cutoff=cutoff)


# ----------------------------------------------------------------------------- near duplicates

_WORD_RE = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """ROUGE tokens: the lowercased runs of letters and digits."""
    return _WORD_RE.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences of hashable items (bit-parallel: O(len(b))
    operations on len(a)-bit integers)."""
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    return _lcs(masks, len(a), b)


def _lcs(masks: dict, m: int, b: Sequence) -> int:
    full = (1 << m) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts over words(): 2 LCS / (m + n); 0.0 when either has no word."""
    x, y = words(a), words(b)
    return 2 * lcs_length(x, y) / (len(x) + len(y)) if x and y else 0.0


def _occurrences(*corpora: list[list[str]]) -> list[scipy.sparse.csr_matrix]:
    """Per corpus a [documents, F] 0/1 matrix over shared features: a document has feature (w, j) iff the
    word w occurs more than j times in it, so the product of two rows is the multiset overlap
    sum_w min(count_a(w), count_b(w))."""
    features: dict[tuple[str, int], int] = {}
    coordinates = []
    for docs in corpora:
        rows, cols = [], []
        for d, doc in enumerate(docs):
            for w, c in collections.Counter(doc).items():
                for j in range(c):
                    rows.append(d)
                    cols.append(features.setdefault((w, j), len(features)))
        coordinates.append((rows, cols))
    shape = max(len(features), 1)
    return [scipy.sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(docs), shape))
            for docs, (rows, cols) in zip(corpora, coordinates)]


_BLOCK = 256  # texts per sparse product (bounds memory at _BLOCK x (texts + references) overlaps)


def near_duplicates(texts: Sequence[str], references: Sequence[str], *, threshold: float) -> list[str | None]:
    """For each text in order: None when kept, "duplicate_of_seed:<i>" when its ROUGE-L F1 with references[i]
    is >= threshold, else "duplicate_of:<j>" for an earlier KEPT text j with that score (the lowest such i,
    else the lowest j). threshold in (0, 1] (0 would make everything a duplicate)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r}: must be in (0, 1]")
    docs, refs = [words(t) for t in texts], [words(r) for r in references]
    doc_m, ref_m = _occurrences(docs, refs)
    doc_len = np.array([len(d) for d in docs], np.float64)
    ref_len = np.array([len(r) for r in refs], np.float64)
    out: list[str | None] = []
    kept = np.zeros(len(docs), bool)
    for start in range(0, len(docs), _BLOCK):
        stop = min(start + _BLOCK, len(docs))
        with_refs = (doc_m[start:stop] @ ref_m.T).tocsr()
        with_docs = (doc_m[start:stop] @ doc_m[:stop].T).tocsr()
        for i in range(start, stop):
            out.append(_first_duplicate(i, docs, refs, doc_len, ref_len, with_refs, with_docs, kept, start, threshold))
            kept[i] = out[-1] is None
    return out


def _candidates(overlaps: scipy.sparse.csr_matrix, r: int, m: float, lengths: np.ndarray, threshold: float
                ) -> np.ndarray:
    """Sorted indices whose overlap bound 2 * overlap / (m + n) reaches the threshold (row r of overlaps)."""
    lo, hi = overlaps.indptr[r], overlaps.indptr[r + 1]
    cols, overlap = overlaps.indices[lo:hi], overlaps.data[lo:hi]
    return np.sort(cols[2 * overlap / (m + lengths[cols]) >= threshold])


def _first_duplicate(i, docs, refs, doc_len, ref_len, with_refs, with_docs, kept, start, threshold) -> str | None:
    doc, m = docs[i], len(docs[i])
    if m == 0:
        return None
    masks: dict[str, int] = {}
    for k, w in enumerate(doc):
        masks[w] = masks.get(w, 0) | (1 << k)
    for s in _candidates(with_refs, i - start, m, ref_len, threshold):
        if 2 * _lcs(masks, m, refs[s]) / (m + ref_len[s]) >= threshold:
            return f"duplicate_of_seed:{s}"
    for j in _candidates(with_docs, i - start, m, doc_len, threshold):
        if j < i and kept[j] and 2 * _lcs(masks, m, docs[j]) / (m + doc_len[j]) >= threshold:
            return f"duplicate_of:{j}"
    return None
