"""Final-answer extraction and correctness checks for GSM8K, MATH and ARC-Challenge.

GSM8K and ARC. A completion's answer is read in one of two modes:
  strict    only the format the prompt asks for: the text after the LAST "Final answer:".
  flexible  that format first, then fallbacks: another marker ("Final answer:", "The answer is",
            \\boxed{}, "####"), then the last number in the text (GSM8K) or the last "(X)" (ARC).
`gsm8k_answer` / `arc_answer` return the answer already normalised (None when there is none), so
majority votes can hash the strings: GSM8K a number ("1,000", "$18", "18.0", "18%", "3/4" -> "1000",
"18", "18", "18", "0.75"; integers bare, terminating fractions as decimals, others "p/q"), ARC an
upper-case letter A-E. A task scores by comparing that string with the normalised gold (gsm8k_gold, arc_gold).

MATH: Hugging Face's math-verify decides (parse + verify, with latex2sympy2_extended), configured as
math-verify's own MATH-500 task: the gold is read as LaTeX with \\boxed{} first (a bare gold answer such
as "\\frac{14}{3}" is boxed first), a completion with LaTeX and plain-expression extraction, in the
library's order of anchors ("final answer is ... I hope", "final answer ... is", \\boxed{}, "answer:",
then the last LaTeX or number); verify compares numbers to 6 decimals, expressions symbolically, sets,
tuples, intervals, matrices and (in)equalities structurally. Several \\boxed{} together are one answer set.
  strict    only the completion's \\boxed{} / \\fbox{} contents (all of them, as one answer); None without one.
  flexible  the whole completion, as above, where an answer written bare after a marker ("The answer is:
            3\\sqrt{13}") is put between $ first (the library reads LaTeX only between delimiters).
`math_score` returns each completion's answer as the string math-verify extracted (its normalised LaTeX,
e.g. "10,080" for "10,\\!080") and the verdict against the gold. Answers are not canonical strings: votes
group them with `math_equiv_batch` (rpo.consistency.answer_ids(..., same=...)), so "0.5" and "\\frac12"
share their votes. Kept from our own code, each for a reason: the worker pool (math-verify's timeouts use
SIGALRM, main thread only), the cache, the strict mode (the library has no boxes-only mode), delimiting
bare answers (PRM800K / MetaMath's "The answer is: X" lost its LaTeX), and the fast paths of
math_equiv_batch (identical strings, short integers: no process round trip).

The math-verify work runs in a module-level pool of worker PROCESSES, created on first use: plain
`python` subprocesses (no fork, so it is safe after JAX has started its threads) that import math-verify
only and speak one JSON line per request over pipes. Each request has its own deadline; a worker that
misses it is killed and replaced and the request counts as no answer, not equal. Anything math-verify
cannot parse is not equal, never an exception. The pool holds at most min(4, cpu count) workers (each
capped at 2 GiB of address space) and is killed at exit; verdicts are cached (the 100,000 most recently
used requests, by content hash; timeouts are not cached). The pool needs POSIX pipes (Linux, macOS).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Sequence

# ----------------------------------------------------------------------------- extraction

_FINAL_RE = re.compile(r"final\s+answer\s*:", re.IGNORECASE)
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BARE_BOXED_RE = re.compile(r" +([^\s$]+)")
# A number: optional sign (not a binary minus: no word character or closing bracket before it),
# digits with optional thousands commas, optional decimals, optional "/denominator".
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}.])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+|(?=\.\d))(?:\.\d+)?(?:/\d+(?![\d/.]))?"
)
_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u03c0": "\\pi ",
            "\u221e": "\\infty ", "\u00b0": "^\\circ", "\u221a": "\\sqrt", "\u22c5": "\\cdot ", "\u00b7": "\\cdot "}


def _marker_text(text: str, marker: re.Pattern) -> str | None:
    """The rest of the line after the last `marker` match (the next non-empty line if that is empty)."""
    last = None
    for last in marker.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end():]
    line, _, after = rest.partition("\n")
    if not line.strip(" *\t"):
        line = next((ln for ln in after.split("\n") if ln.strip(" *\t")), "")
    line = line.strip().strip("*").strip()
    return line or None


def extract_final_answer(text: str) -> str | None:
    """The text after the LAST "Final answer:" (any case) to the end of that line, stripped of spaces and
    markdown '*'; when that line is empty, the next non-empty line. None without the marker."""
    return _marker_text(text, _FINAL_RE)


def _brace_pairs(s: str) -> dict[int, int]:
    """Index of each '{' in s that is closed -> index of its '}' (escaped \\{ \\} do not count); one pass."""
    pairs, stack = {}, []
    for m in re.finditer(r"\\.|[{}]", s):
        if m.group() == "{":
            stack.append(m.start())
        elif m.group() == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def extract_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} or \\fbox{...} (nested braces matched; also the
    brace-less "\\boxed 5"), stripped. None when there is none."""
    closing = None
    for m in reversed(list(_BOXED_RE.finditer(text))):
        i = m.end()
        if text.startswith("{", i):
            closing = _brace_pairs(text) if closing is None else closing
            if i in closing:
                return text[i + 1:closing[i]].strip()
        elif text.startswith(" ", i):
            word = _BARE_BOXED_RE.match(text, i)
            if word:
                return word.group(1).rstrip(".,")
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in the text as written ("1,000", "-3.5", "3/4"), or None. A '-' is a sign
    only where it cannot be a binary minus ("5-3" -> "3"); '$' and LaTeX "\\!" are ignored."""
    matches = _NUMBER_RE.findall(_plain(text))
    return matches[-1] if matches else None


def _plain(text: str) -> str:
    for old, new in _UNICODE.items():
        text = text.replace(old, new)
    return text.replace("\\$", "").replace("$", "").replace("\\!", "").replace("{,}", ",")


# ----------------------------------------------------------------------------- GSM8K


def _decimal(fr: Fraction) -> str | None:
    """Exact decimal string of a fraction whose denominator divides a power of ten, else None."""
    den = fr.denominator
    for k in range(1, 64):
        if 10**k % den == 0:
            digits = str(abs(fr.numerator) * (10**k // den)).rjust(k + 1, "0")
            text = f"{digits[:-k]}.{digits[-k:]}".rstrip("0")
            return ("-" if fr < 0 else "") + text
    return None


def _canonical_number(fr: Fraction) -> str:
    if fr.denominator == 1:
        return str(fr.numerator)
    return _decimal(fr) or f"{fr.numerator}/{fr.denominator}"


_MAX_NUMBER_CHARS = 400  # longer "numbers" are not read as numbers (Python caps int() at 4300 digits)
_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|-?\.\d+|-?\d+/\d+")


def normalize_number(s: str) -> str | None:
    """Canonical form of a number string, or None when `s` is not one number. Accepts surrounding
    spaces, markdown '*', '$' (also "-$5", "$-5"), thousands commas ("1,000", not "1,00"), a trailing
    '%' or '.', decimals and "p/q". Output: "18", "-3", "0.75", "1/3" (no trailing zeros, "-0" -> "0")."""
    t = _plain(s).strip().strip("*").strip()
    t = t.replace("\\%", "%").removesuffix("%").rstrip(".").strip()
    if len(t) > _MAX_NUMBER_CHARS or not _PLAIN_NUMBER_RE.fullmatch(t):
        return None
    t = t.replace(",", "")
    if "/" in t:
        num, den = t.split("/")
        if int(den) == 0:
            return None
        return _canonical_number(Fraction(int(num), int(den)))
    return _canonical_number(Fraction(t))


def gsm8k_gold(answer: str) -> str:
    """Canonical gold number of a GSM8K answer field ("... #### 18") or of a bare number ("1,000");
    ValueError naming the value when it holds none."""
    tail = answer.rpartition("####")[2]
    gold = normalize_number(tail)
    if gold is None:
        where = "after '####' in" if "####" in answer else "in"
        shown = answer if len(answer) <= 80 else "..." + answer[-77:]
        raise ValueError(f"GSM8K gold: no number {where} {shown!r}")
    return gold


def _number_in_line(line: str) -> str | None:
    """The answer number of a marker line: the first number after its last '=' (or of the line)."""
    line = _plain(line)
    boxed = extract_boxed(line)
    if boxed is not None:
        line = boxed
    tail = line.rpartition("=")[2]
    m = _NUMBER_RE.search(tail) or _NUMBER_RE.search(line)
    return normalize_number(m.group()) if m else None


def gsm8k_answer(completion: str, strict: bool = False) -> str | None:
    """The canonical number a GSM8K completion answers, or None. strict: only from the "Final answer:"
    line. Flexible: "Final answer:", then the last \\boxed{}, "The answer is", "####", then the last
    number of the completion."""
    final = extract_final_answer(completion)
    number = _number_in_line(final) if final is not None else None
    if number is not None or strict:
        return number
    for line in (extract_boxed(completion), _marker_text(completion, _ANSWER_IS_RE),
                 completion.rpartition("####")[2] if "####" in completion else None):
        number = _number_in_line(line) if line is not None else None
        if number is not None:
            return number
    last = extract_last_number(completion)
    return normalize_number(last) if last is not None else None


def gsm8k_correct(completion: str, gold: str, strict: bool = False) -> bool:
    """Whether a completion's answer equals the gold one. gold: a GSM8K answer field
    ("... #### 18") or a bare number ("18", "1,000")."""
    answer = gsm8k_answer(completion, strict)
    return answer is not None and answer == gsm8k_gold(gold)


# ----------------------------------------------------------------------------- ARC

# The leading letter of an answer line: "(B)" / "[B]", "Option B", or a bare letter followed by ')', '.', ':', ','
# or the end ("B) ice", "B."), not by a word ("A cell wall, which is (C)" is not an answer A).
_ARC_LEAD_RE = re.compile(
    r"^(?:[(\[]([A-E])[)\]]|(?i:option|choice)\s*:?\s*[(\[]?([A-E])(?![A-Za-z0-9'])|([A-E])(?=[).:,]|\s*$))"
)
_ARC_PAREN_RE = re.compile(r"\(([A-E])\)")
_ARC_IS_RE = re.compile(
    r"(?i:answer|option|choice)\s+(?i:is)\s*:?\s*(?i:option\s+|choice\s+)?[(\[]?([A-E])(?![A-Za-z0-9'])"
)


def _arc_letter(text: str) -> str | None:
    """The choice letter of an answer line (markdown '*' ignored): leading "(B)" / "B)" / "B." / "B" / "Option B",
    else "answer is B", else the last "(B)", else \\boxed{B}."""
    text = text.replace("*", "").strip()
    lead = _ARC_LEAD_RE.match(text)
    if lead:
        return next(letter for letter in lead.groups() if letter)
    for pattern in (_ARC_IS_RE, _ARC_PAREN_RE):
        found = pattern.findall(text)
        if found:
            return found[-1]
    boxed = extract_boxed(text)
    if boxed is not None and re.fullmatch(r"\(?([A-E])\)?", boxed.strip()):
        return boxed.strip("() ")
    return None


def arc_answer(completion: str, strict: bool = False) -> str | None:
    """The letter (A-E) an ARC completion answers, or None. strict: only from the "Final answer:" line.
    Flexible: that line, then the last "answer is B", \\boxed{B}, the last "(B)", or a completion
    that is just a letter."""
    final = extract_final_answer(completion)
    letter = _arc_letter(final) if final is not None else None
    if letter is not None or strict:
        return letter
    found = _ARC_IS_RE.findall(completion)
    if found:
        return found[-1].upper()
    boxed = extract_boxed(completion)
    if boxed is not None and (letter := _arc_letter(boxed)) is not None:
        return letter
    found = _ARC_PAREN_RE.findall(completion)
    if found:
        return found[-1]
    m = re.fullmatch(r"\s*\(?([A-E])[).:]?\s*", completion)
    return m.group(1) if m else None


def arc_gold(gold_letter: str) -> str:
    """The upper-case gold letter of "B", "b" or "(B)"; ValueError naming the value for anything else."""
    m = re.fullmatch(r"\s*\(?([A-Ea-e])\)?\s*", gold_letter)
    if m is None:
        raise ValueError(f"ARC gold letter {gold_letter!r}: not one of A-E")
    return m.group(1).upper()


# ----------------------------------------------------------------------------- MATH (math-verify, in workers)

_UNESCAPED_MATH_RE = re.compile(r"(?<!\\)\$|\\[(\[]|\\(?:boxed|fbox)(?![a-zA-Z])")
_SHORT_INT_RE = re.compile(r"-?\d{1,15}")  # compared exactly here, as math-verify compares two integers


def _boxes(text: str) -> list[str]:
    """The contents of every complete top-level \\boxed{...} / \\fbox{...} (and brace-less "\\boxed 5"), in order."""
    out, closing, end = [], None, 0
    for m in _BOXED_RE.finditer(text):
        i = m.end()
        if i < end:  # inside a box already taken
            continue
        if text.startswith("{", i):
            closing = _brace_pairs(text) if closing is None else closing
            if i in closing:
                out.append(text[i + 1:closing[i]].strip())
                end = closing[i]
        elif word := _BARE_BOXED_RE.match(text, i):
            out.append(word.group(1).rstrip(".,"))
    return [b for b in out if b]


def _as_answer(s: str) -> str:
    """A gold or answer string as text for math-verify's gold reading: boxed unless it is LaTeX-delimited already."""
    s = s.strip()
    return s if _UNESCAPED_MATH_RE.search(s) else f"\\boxed{{{s}}}"


_MARKER_RE = re.compile(r"final answer is|answer is\s*:|final answer\s*:", re.IGNORECASE)
_HOPE_RE = re.compile(r"\.?\s*I hope it is correct\.?\s*$", re.IGNORECASE)
_LATEX_COMMAND_RE = re.compile(r"\\[a-zA-Z]|\^")
_WORD_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_BARE_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*%)?|[-+]?\.\d+")


def _delimit_bare_answers(text: str) -> str:
    """math-verify reads LaTeX only inside $ $, \\( \\), \\[ \\] or \\boxed{} (bare, "The answer is: 3\\sqrt{13}"
    reads as 3, "(6,31,-1)" as 6): on each line, the answer after the last marker ("The answer is:", "Final
    answer:", Minerva's "The final answer is X. I hope it is correct.") gets $...$ when it has no delimiter and
    holds a LaTeX command or ^, or is neither a plain number (the library reads those) nor has a word ("12
    apples"). Ours, as that gap of the library costs PRM800K / MetaMath-style answers ("The answer is: X")."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        marker = None
        for marker in _MARKER_RE.finditer(line):
            pass
        if marker is None:
            continue
        core = _HOPE_RE.sub("", line[marker.end():]).strip().rstrip(".").strip()
        if not core or _UNESCAPED_MATH_RE.search(core):
            continue
        if _LATEX_COMMAND_RE.search(core) or not (_BARE_NUMBER_RE.fullmatch(core) or _WORD_RE.search(core)):
            start = line.index(core, marker.end())
            lines[i] = f"{line[:start]}${core}${line[start + len(core):]}"
    return "\n".join(lines)


def _as_completion(completion: str, strict: bool) -> tuple[str, str] | None:
    """(text, how) math-verify reads of a completion: all of it, bare answers after a marker delimited, as a
    model's answer (flexible), or only its boxes, together one answer, as a gold is read (strict; None without
    a box)."""
    if not strict:
        return _delimit_bare_answers(completion), "answer"
    boxes = _boxes(completion)
    return (" ".join(f"\\boxed{{{b}}}" for b in boxes), "gold") if boxes else None


def _check_strings(name: str, values: Sequence) -> None:
    for k, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{k}]: expected str, got {type(v).__name__}")


_cache: collections.OrderedDict[bytes, tuple[str | None, bool]] = collections.OrderedDict()
_CACHE_SIZE = 100_000
_cache_lock = threading.Lock()


def _run(requests: list[tuple[str, str, str | None]], timeout: float) -> list[tuple[str | None, bool]]:
    """Each request (text, how, gold) read by a worker: (the answer math-verify extracts from `text` with the
    `how` configuration, whether it equals `gold`'s; False without a gold). Cached by content; a request past
    its deadline is (None, False) and is not cached."""
    out: list[tuple[str | None, bool]] = [(None, False)] * len(requests)
    todo: dict[bytes, list[int]] = {}
    for k, request in enumerate(requests):
        key = hashlib.blake2b(json.dumps(request).encode("utf-8", "surrogatepass"), digest_size=16).digest()
        todo.setdefault(key, []).append(k)
    with _cache_lock:
        for key in [key for key in todo if key in _cache]:
            _cache.move_to_end(key)
            for k in todo.pop(key):
                out[k] = _cache[key]
    if not todo:
        return out
    keys = list(todo)
    lines = _pool().run([json.dumps(requests[todo[key][0]]) for key in keys], timeout)
    with _cache_lock:
        for key, line in zip(keys, lines):
            if line is None:
                continue
            answer, verdict = json.loads(line)
            for k in todo[key]:
                out[k] = (answer, bool(verdict))
            _cache[key] = (answer, bool(verdict))
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return out


def math_score(completions: Sequence[str], golds: Sequence[str], strict: bool = False, timeout: float = 5.0
               ) -> tuple[list[str | None], list[bool]]:
    """Task.score for MATH: each completion's answer (as math-verify extracts it) and whether it equals its gold,
    all in one batch through the worker pool, each completion with `timeout` seconds."""
    if len(completions) != len(golds):
        raise ValueError(f"math_score: {len(completions)} completions but {len(golds)} golds")
    _check_strings("completions", completions)
    _check_strings("golds", golds)
    texts = [_as_completion(c, strict) for c in completions]
    asked = [k for k, t in enumerate(texts) if t is not None]
    results = _run([(*texts[k], _as_answer(golds[k])) for k in asked], timeout)
    answers: list[str | None] = [None] * len(texts)
    correct = [False] * len(texts)
    for k, (answer, verdict) in zip(asked, results):
        answers[k], correct[k] = answer, verdict
    return answers, correct


def math_answers(completions: Sequence[str], strict: bool = False, timeout: float = 5.0) -> list[str | None]:
    """The answer of each completion as the MATH grader reads it (see the module docstring), or None."""
    _check_strings("completions", completions)
    texts = [_as_completion(c, strict) for c in completions]
    asked = [k for k, t in enumerate(texts) if t is not None]
    results = _run([(*texts[k], None) for k in asked], timeout)
    answers: list[str | None] = [None] * len(texts)
    for k, (answer, _) in zip(asked, results):
        answers[k] = answer
    return answers


def math_answer(completion: str, strict: bool = False) -> str | None:
    """math_answers for one completion."""
    return math_answers([completion], strict)[0]


def math_equiv_batch(pairs: Sequence[tuple[str, str]], timeout: float = 5.0) -> list[bool]:
    """Whether each (answer, gold) pair of answer strings (a gold, a math_answer, a \\boxed{} content) is the
    same value to the MATH grader: both read as golds, then math-verify's verify(gold, answer). Identical
    strings and two integers of up to 15 digits are settled here; an empty one is never equal."""
    out = [False] * len(pairs)
    asked = []
    for k, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pairs[{k}]: expected an (answer, gold) pair, got {pair!r}")
        _check_strings(f"pairs[{k}]", pair)
        a, b = (s.strip() for s in pair)
        if not a or not b:
            continue
        if a == b:
            out[k] = True
        elif _SHORT_INT_RE.fullmatch(a) and _SHORT_INT_RE.fullmatch(b):
            out[k] = int(a) == int(b)
        else:
            asked.append(k)
    results = _run([(_as_answer(pairs[k][0]), "gold", _as_answer(pairs[k][1])) for k in asked], timeout)
    for k, (_, verdict) in zip(asked, results):
        out[k] = verdict
    return out


def _serve() -> None:
    """Worker main loop: read JSON [text, how, gold] lines on stdin, answer JSON [answer, verdict] lines (anything
    that fails: [null, false]); "ready" once math-verify is imported and warm. Print output goes to stderr."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = 2 << 30 if hard == resource.RLIM_INFINITY else min(2 << 30, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeout disabled": the pool's deadline is ours
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    how_configs = {"gold": (LatexExtractionConfig(boxed_match_priority=0),),  # a gold answer, a \boxed{} content
                   "answer": (LatexExtractionConfig(), ExprExtractionConfig())}  # a model's completion

    @functools.lru_cache(maxsize=4096)
    def read(text: str, how: str) -> tuple:
        return tuple(parse(text, how_configs[how], parsing_timeout=None))

    def answer_of(parsed: tuple) -> str | None:
        strings = [x for x in parsed if isinstance(x, str)]
        text = strings[-1] if strings else str(parsed[0]) if parsed else ""
        return text.strip() or None

    read("\\boxed{\\frac{1}{2}}", "gold")  # before "ready": the first parse builds the LaTeX grammar (~0.3 s)
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        try:
            text, how, gold = json.loads(line)
            parsed = read(text, how)
            verdict = bool(parsed) and gold is not None and verify(list(read(gold, "gold")), list(parsed),
                                                                  timeout_seconds=None)
            reply = [answer_of(parsed), bool(verdict)]
        except Exception:
            reply = [None, False]
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


# ----------------------------------------------------------------------------- the worker pool

_START_TIMEOUT = 120.0
_WORKER_CODE = "import sys; sys.path.insert(0, {root!r}); from rpo.rewards import _serve; _serve()"


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    started: float
    buf: bytes = b""
    ready: bool = False
    item: int | None = None  # the index of the request it is working on
    deadline: float = 0.0

    @classmethod
    def spawn(cls) -> _Worker:
        code = _WORKER_CODE.format(root=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return cls(proc, time.monotonic())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


class _Pool:
    """Worker processes that answer request lines, one request in flight per worker."""

    def __init__(self, max_workers: int):
        self.max_workers = max_workers
        self.pid = os.getpid()  # a forked child must not share its parent's workers
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()

    def close(self) -> None:
        if os.getpid() != self.pid:  # atexit in a forked child: the workers are the parent's
            return
        with self.lock:
            for w in self.workers:
                w.kill()
            self.workers = []

    def replace(self, w: _Worker) -> None:
        w.kill()
        self.workers[self.workers.index(w)] = _Worker.spawn()

    def run(self, requests: list[str], timeout: float) -> list[str | None]:
        """The answer line of each request; None where a worker missed its deadline or died on it."""
        with self.lock:
            for w in [w for w in self.workers if w.proc.poll() is not None or w.item is not None]:
                self.replace(w)  # dead, or still busy from an interrupted run (its answer would be stale)
            while len(self.workers) < min(self.max_workers, len(requests)):
                self.workers.append(_Worker.spawn())
            results: list[str | None] = [None] * len(requests)
            queue = collections.deque(range(len(requests)))
            left = len(requests)
            while left:
                now = time.monotonic()
                for w in self.workers:
                    if w.ready and w.item is None and queue:
                        w.item, w.deadline = queue.popleft(), now + timeout
                        try:
                            w.proc.stdin.write(requests[w.item].encode() + b"\n")
                            w.proc.stdin.flush()
                        except OSError:  # it died while idle: give the request to a fresh one
                            queue.appendleft(w.item)
                            self.replace(w)
                busy = [w for w in self.workers if w.item is not None]
                waiting = busy + [w for w in self.workers if not w.ready]
                wait = min([w.deadline for w in busy] + [w.started + _START_TIMEOUT for w in waiting]) - now
                fds = {w.proc.stdout.fileno(): w for w in waiting}
                readable, _, _ = select.select(list(fds), [], [], max(0.0, wait))
                for fd in readable:
                    w = fds[fd]
                    data = os.read(fd, 4096)
                    if not data:
                        if not w.ready:
                            raise RuntimeError(f"rpo.rewards: a math-verify worker exited with code {w.proc.wait()} "
                                               "before it was ready (its stderr is above; is math-verify installed? "
                                               "pip install -r requirements.txt)")
                        if w.item is not None:
                            left -= 1
                        self.replace(w)
                        continue
                    w.buf += data
                    while b"\n" in w.buf:
                        line, w.buf = w.buf.split(b"\n", 1)
                        if line == b"ready":
                            w.ready = True
                        elif w.item is not None:
                            results[w.item] = line.decode()
                            w.item = None
                            left -= 1
                now = time.monotonic()
                for w in list(self.workers):
                    if w.item is not None and now >= w.deadline:
                        left -= 1
                        self.replace(w)
                    elif not w.ready and now >= w.started + _START_TIMEOUT:
                        raise RuntimeError(f"rpo.rewards: a math-verify worker did not start in {_START_TIMEOUT:.0f} s")
            return results


_pool_instance: _Pool | None = None
_pool_lock = threading.Lock()


def _pool() -> _Pool:
    global _pool_instance
    with _pool_lock:
        if _pool_instance is None or _pool_instance.pid != os.getpid():
            _pool_instance = _Pool(max(1, min(4, os.cpu_count() or 1)))
            atexit.register(_pool_instance.close)
        return _pool_instance
