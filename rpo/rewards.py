"""Final-answer extraction and correctness checks for GSM8K, MATH and ARC-Challenge.

Extraction. A completion's answer is read in one of two modes:
  strict    only the format the prompt asks for: the text after the LAST "Final answer:" (GSM8K,
            ARC) or the content of the last \\boxed{} (MATH).
  flexible  that format first, then fallbacks: another marker ("Final answer:", "The answer is",
            \\boxed{}, "####"), then the last number in the text (GSM8K, MATH) or the last "(X)" (ARC).
Every `*_answer` function returns the answer already normalised (None when there is none), so
majority votes can hash the strings. A task scores by extracting each answer once and comparing it
with the normalised gold (gsm8k_gold, arc_gold; MATH: math_score, which also settles equivalence).

Normal forms.
  GSM8K  a number: "1,000", "$18", "18.0", "18%", "3/4" -> "1000", "18", "18", "18", "0.75";
         integers bare, terminating fractions as decimals, others as "p/q".
  MATH   Hendrycks-style string normalisation (normalize_math): spaces, \\left/\\right, \\dfrac,
         units, degrees, "$", "\\%", "x =" prefixes, \\text{} wrappers, \\frac12 -> \\frac{1}{2}, ...;
         a plain rational number (integer, decimal, a/b, \\frac{a}{b}, mixed number) becomes
         "n" or "\\frac{p}{q}" in lowest terms, so "0.5", "\\dfrac{2}{4}" and "\\frac12" agree.
  ARC    an upper-case letter A-E.

MATH equivalence (math_equiv_batch). Equal normal forms are equal; two different plain rationals
and anything holding a word of three or more letters are not; every other pair goes to sympy:
tuples and intervals elementwise (same brackets), comma lists and \\{sets\\} as multisets ("\\pm"
spreads into two elements), matrices entrywise, equations up to sign, constants by value at 50
digits (exact forms: "1.414" is not \\sqrt{2}), expressions when two random points agree and
simplify(a - b) == 0. LaTeX is read by a small parser of this module (\\frac, \\sqrt, ^, \\pi,
\\cdot, implicit products, functions, |x|, ...; "i" is the imaginary unit, other letters are
symbols) that builds sympy objects directly: nothing is eval'ed, and integer powers and factorials
too large to compute are refused. Anything unparsable is "not equal", never an exception.

The sympy work runs in a module-level pool of worker PROCESSES, created on first use: plain
`python` subprocesses (no fork, so it is safe after JAX has started its threads) that import
sympy only and speak one JSON line per pair over pipes. Each pair has its own deadline; a worker
that misses it is killed and replaced and the pair counts as not equal. The pool holds at most
min(4, cpu count) workers (each capped at 2 GiB of address space) and is killed at exit; sympy
verdicts are cached (the 100,000 most recently used pairs). The pool needs POSIX pipes (Linux, macOS).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import functools
import importlib
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
from typing import Any, Callable, Sequence

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


# ----------------------------------------------------------------------------- MATH normalisation

_MAX_ANSWER_CHARS = 1000  # longer MATH answers are compared as strings only
_MATH_SUBS = [
    (r"\\(?:left|right)\.", ""), (r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", ""),
    (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"), (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
    (r"\\displaystyle(?![a-zA-Z])", ""), (r"\\\$", ""), (r"\$", ""), (r"\\%", ""), (r"%", ""),
    (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", ""),
    (r"(?<!\\)\\[!,;:](?![a-zA-Z])", ""), (r"(?<!\\)\\ |~", " "), (r"\{,\}", ""), (r"\\[lr]?vert(?![a-zA-Z])", "|"),
    (r"\\varnothing(?![a-zA-Z])", r"\\emptyset"),
    (r"\\(?:le|leq|leqslant)(?![a-zA-Z])", r"\\le "), (r"\\(?:ge|geq|geqslant)(?![a-zA-Z])", r"\\ge "),
    (r"\\(?:ne|neq)(?![a-zA-Z])", r"\\ne "),
]
_MATH_SUBS_RE = [(re.compile(p), r) for p, r in _MATH_SUBS]
_MATRIX_ENV_RE = re.compile(r"\\(begin|end)\{[bBvV]?matrix\}")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{")
_TRAILING_UNIT_RE = re.compile(r"\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}(?:\s*\^\s*\{?\d\}?)?\s*$")
_TRAILING_WORDS_RE = re.compile(r"(?<=[\d}])(?:\s+[a-zA-Z]{2,}\.?)+\s*(?:\^\s*\{?\d\}?)?$")
_SHORT_VAR_RE = re.compile(r"[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+")
_RATIONAL_RES = (
    re.compile(r"(-?)(\d+)(?:\.(\d+))?"),
    re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}"),
    re.compile(r"(-?)(\d+)/(\d+)"),
    re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}"),  # mixed number 1\frac{4}{5}
)


def _as_rational(s: str) -> Fraction | None:
    """The value of a normalised answer that is a plain rational number (of up to 400 characters), else None."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    m = _RATIONAL_RES[0].fullmatch(s)
    if m:
        value = Fraction(f"{m.group(2)}.{m.group(3) or 0}")
    elif m := _RATIONAL_RES[1].fullmatch(s) or _RATIONAL_RES[2].fullmatch(s):
        if int(m.group(3)) == 0:
            return None
        value = Fraction(int(m.group(2)), int(m.group(3)))
    elif m := _RATIONAL_RES[3].fullmatch(s):
        if int(m.group(4)) == 0:
            return None
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
    else:
        return None
    return -value if m.group(1) else value


def _canonical_rational(fr: Fraction) -> str:
    if fr.denominator == 1:
        return str(fr.numerator)
    return f"{'-' if fr < 0 else ''}\\frac{{{abs(fr.numerator)}}}{{{fr.denominator}}}"


def _unwrap_commands(s: str, pattern: re.Pattern) -> str:
    """Replace every `\\cmd{X}` matched by `pattern` (which ends at the '{') with X."""
    while m := pattern.search(s):
        end = _brace_pairs(s).get(m.end() - 1)
        if end is None:
            return s[:m.start()] + s[m.end():]
        s = s[:m.start()] + s[m.end():end] + s[end + 1:]
    return s


_BRACED_CMD_RE = re.compile(r"\\(frac|binom|sqrt)(?![a-zA-Z])")
_ARGUMENT_RE = re.compile(r"\\[a-zA-Z]+|.")


def _brace_arguments(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\sqrt3 -> \\sqrt{3}, \\frac ab -> \\frac{a}{b}: brace bare arguments."""
    out = []
    closing = _brace_pairs(s)
    i = 0
    while i < len(s):
        m = _BRACED_CMD_RE.match(s, i)
        if not m:
            out.append(s[i])
            i += 1
            continue
        out.append(m.group())
        i = m.end()
        for k in range(1 if m.group(1) == "sqrt" else 2):
            while s.startswith(" ", i):
                i += 1
            if k == 0 and m.group(1) == "sqrt" and s.startswith("[", i):
                close = s.find("]", i)
                if close < 0:
                    break
                out.append(s[i:close + 1])
                i = close + 1
            if i >= len(s):
                break
            if s[i] == "{":
                end = closing.get(i, len(s) - 1)
                out.append(_brace_arguments(s[i:end + 1]))
                i = end + 1
            else:
                cmd = _ARGUMENT_RE.match(s, i)
                out.append("{" + cmd.group() + "}")
                i = cmd.end()
    return "".join(out)


def _split_top(s: str, sep: str) -> list[str]:
    """Split `s` at the occurrences of `sep` outside any (), [], {}."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _strip_var_prefix(s: str) -> str:
    """"x = 5" -> "5", "x \\in [1,2]" -> "[1,2]"; also in each part of "x=1, x=2"."""
    s = re.sub(r"^[a-zA-Z]\s*\\in(?![a-zA-Z])\s*", "", s)
    parts = _split_top(s, ",")
    sides = [_split_top(p, "=") for p in parts]
    lhs = {side[0].strip() for side in sides}
    if all(len(side) == 2 for side in sides) and len(lhs) == 1 and _SHORT_VAR_RE.fullmatch(lhs.pop()):
        return ",".join(side[1] for side in sides)
    return s


@functools.lru_cache(maxsize=1 << 16)
def normalize_math(s: str) -> str:
    """Hendrycks-style normal form of a MATH answer (see the module docstring); idempotent. An answer
    longer than 1,000 characters only loses its whitespace."""
    s = s.strip()
    if len(s) > _MAX_ANSWER_CHARS:
        return re.sub(r"\s+", "", s)
    if (boxed := extract_boxed(s)) is not None and _BOXED_RE.match(s):
        s = boxed
    s = re.sub(r"\s+", " ", s)
    for old, new in _UNICODE.items():
        s = s.replace(old, new)
    for pattern, new in _MATH_SUBS_RE:
        s = pattern.sub(new, s)
    s = _MATRIX_ENV_RE.sub(lambda m: f"\\{m.group(1)}{{pmatrix}}", s).strip()
    while (m := _TRAILING_UNIT_RE.search(s)) and s[:m.start()].strip() and s[:m.start()].strip()[-1] not in "+-=(,":
        s = s[:m.start()]
    s = _unwrap_commands(s, _TEXT_CMD_RE).strip()
    s = _TRAILING_WORDS_RE.sub("", s)
    s = _strip_var_prefix(s.strip())
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\0", s)  # keep "\cot x" apart
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = _brace_arguments(s)
    s = re.sub(r"([\^_])\{([a-zA-Z0-9])\}", r"\1\2", s)
    s = re.sub(r"(?<!\d)\.(?=\d)", "0.", s).rstrip(".")
    while s.startswith("{") and _brace_pairs(s).get(0) == len(s) - 1:
        s = s[1:-1]
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if m := re.fullmatch(r"\(([A-Z])\)", s):
        s = m.group(1)
    if re.fullmatch(r"[a-zA-Z]{3,}", s):
        s = s.lower()
    if (value := _as_rational(s)) is not None:
        s = _canonical_rational(value)
    return s


# ----------------------------------------------------------------------------- MATH answers


def _inline_math(text: str) -> str:
    """The answer inside a marker line: the first $...$ segment when there is one, else the line."""
    m = re.search(r"\$+([^$]+)\$+", text) or re.search(r"\\\((.+?)\\\)", text)
    return (m.group(1) if m else text).strip().rstrip(".").strip()


def math_answer(completion: str, strict: bool = False) -> str | None:
    """The normalised answer of a MATH completion, or None. strict: the last \\boxed{}. Flexible: then
    the "Final answer:" line, the last "The answer is" line, the last number."""
    raw = extract_boxed(completion)
    if raw is None and not strict:
        for line in (extract_final_answer(completion), _marker_text(completion, _ANSWER_IS_RE)):
            if line is not None:
                raw = extract_boxed(line) or _inline_math(line)
                break
        else:
            raw = extract_last_number(completion)
    if raw is None:
        return None
    return normalize_math(raw) or None


_WORD_RE = re.compile(r"[a-zA-Z]{3,}")
_COMMAND_RE = re.compile(r"\\(?:begin|end)\{[a-z]*\}|\\[a-zA-Z]+")


def _has_word(s: str) -> bool:
    return _WORD_RE.search(_COMMAND_RE.sub(" ", s)) is not None


_cache: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()
_CACHE_SIZE = 100_000
_cache_lock = threading.Lock()


def math_equiv_batch(pairs: Sequence[tuple[str, str]], timeout: float = 5.0) -> list[bool]:
    """Whether each (answer, gold) pair is mathematically equal. Both are normalised first (raw or
    already-normal answers both work; an empty one is never equal); pairs not settled by the normal
    forms go to the sympy worker pool, each with `timeout` seconds (past it: not equal)."""
    out = [False] * len(pairs)
    todo: dict[tuple[str, str], list[int]] = {}
    for k, (a, b) in enumerate(pairs):
        na, nb = normalize_math(a), normalize_math(b)
        if not na or not nb:
            continue
        if na == nb:
            out[k] = True
        elif (_as_rational(na) is None or _as_rational(nb) is None) and not (_has_word(na) or _has_word(nb)):
            if max(len(na), len(nb)) <= _MAX_ANSWER_CHARS:
                todo.setdefault((na, nb), []).append(k)
    with _cache_lock:
        hits = {key: _cache[key] for key in todo if key in _cache}
        for key in hits:
            _cache.move_to_end(key)
    for key, verdict in hits.items():
        for k in todo.pop(key):
            out[k] = verdict
    if todo:
        keys = list(todo)
        verdicts = _pool().run([json.dumps(key) for key in keys], timeout)
        with _cache_lock:
            for key, verdict in zip(keys, verdicts):
                for k in todo[key]:
                    out[k] = verdict == "1"
                if verdict is not None:  # a timeout is not cached: a longer timeout may settle it
                    _cache[key] = verdict == "1"
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return out


def math_score(
    completions: Sequence[str], golds: Sequence[str], strict: bool = False, timeout: float = 5.0
) -> tuple[list[str | None], list[bool]]:
    """Task.score for MATH: the normalised answer of each completion and whether it equals its gold,
    all pairs checked in one math_equiv_batch call."""
    if len(completions) != len(golds):
        raise ValueError(f"math_score: {len(completions)} completions but {len(golds)} golds")
    answers = [math_answer(c, strict) for c in completions]
    asked = [k for k, a in enumerate(answers) if a is not None]
    verdicts = math_equiv_batch([(answers[k], golds[k]) for k in asked], timeout)
    correct = [False] * len(answers)
    for k, verdict in zip(asked, verdicts):
        correct[k] = verdict
    return answers, correct


# ----------------------------------------------------------------------------- LaTeX -> sympy (workers)


class _Unparsable(Exception):
    pass


_TOKEN_RE = re.compile(r"\d*\.?\d+|\\[a-zA-Z]+|\\.|[a-zA-Z]|\S")
_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma tau "
    "upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split()
)
_FUNCTIONS = ("sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp").split()
_MAX_BITS = 100_000  # refuse integer powers whose value would need more bits than this
_MAX_FACTORIAL = 1000


class _Parser:
    """Recursive-descent LaTeX reader building sympy objects. Precedence, loosest first:
    + -, then * / \\cdot \\times \\div and implicit products, then unary -, then ^, then !."""

    def __init__(self, text: str):
        import sympy

        self.sp = sympy
        self.toks = _TOKEN_RE.findall(text)
        self.i = 0
        self.abs_depth = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        if self.i >= len(self.toks):
            raise _Unparsable("unexpected end")
        self.i += 1
        return self.toks[self.i - 1]

    def expect(self, tok: str) -> None:
        if self.take() != tok:
            raise _Unparsable(f"expected {tok}")

    def parse(self) -> Any:
        e = self.expr()
        if self.i != len(self.toks):
            raise _Unparsable(f"left over: {self.toks[self.i]}")
        return e

    def expr(self) -> Any:
        e = self.term()
        while self.peek() in ("+", "-"):
            e = e + self.term() if self.take() == "+" else e - self.term()
        return e

    def starts_factor(self, t: str | None) -> bool:
        if t is None:
            return False
        if t[0].isalpha() or t[-1].isdigit() or t in ("(", "[", "{"):
            return True
        if t == "|":
            return self.abs_depth == 0
        return t[1:] in _GREEK or t[1:] in _FUNCTIONS or t in (
            "\\frac", "\\sqrt", "\\binom", "\\pi", "\\infty", "\\lfloor", "\\lceil")

    def term(self) -> Any:
        e = self.unary()
        while True:
            t = self.peek()
            if t in ("*", "\\cdot", "\\times"):
                self.take()
                e = e * self.unary()
            elif t in ("/", "\\div"):
                self.take()
                e = e / self.unary()
            elif self.starts_factor(t):
                e = e * self.power()
            else:
                return e

    def unary(self) -> Any:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> Any:
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            return self.pow(base, self.exponent())
        return base

    def exponent(self) -> Any:
        if self.peek() in ("-", "+"):
            sign = -1 if self.take() == "-" else 1
            return sign * self.exponent()
        return self.postfix()

    def pow(self, base: Any, exp: Any) -> Any:
        if base.is_Rational and exp.is_Rational and abs(base) not in (0, 1):
            if max(abs(base.p), base.q).bit_length() * abs(exp.p) > _MAX_BITS:
                raise _Unparsable("power too large")
        return self.sp.Pow(base, exp)

    def postfix(self) -> Any:
        e = self.atom()
        while self.peek() == "!":
            self.take()
            if e.is_Integer and e > _MAX_FACTORIAL:
                raise _Unparsable("factorial too large")
            e = self.sp.factorial(e)
        return e

    def group(self) -> Any:
        """A {...} group, or a single atom where the braces were left out."""
        if self.peek() == "{":
            self.take()
            e = self.expr()
            self.expect("}")
            return e
        return self.postfix()

    def raw_group(self) -> str:
        """The tokens of a subscript ({...} or one token) as text."""
        if self.peek() != "{":
            return self.take()
        start = self.i
        depth = 0
        while True:
            t = self.take()
            depth += {"{": 1, "}": -1}.get(t, 0)
            if depth == 0:
                return "".join(self.toks[start + 1:self.i - 1])

    def atom(self) -> Any:
        sp = self.sp
        t = self.take()
        if t[-1].isdigit():
            return sp.Rational(t)
        if t.isalpha():
            if self.peek() == "_":
                self.take()
                return sp.Symbol(f"{t}_{self.raw_group()}")
            return sp.I if t == "i" else sp.Symbol(t)
        closing = {"(": ")", "[": "]", "{": "}"}
        if t in closing:
            e = self.expr()
            self.expect(closing[t])
            return e
        if t == "|":
            self.abs_depth += 1
            e = self.expr()
            self.expect("|")
            self.abs_depth -= 1
            return sp.Abs(e)
        if t == "\\frac":
            return self.group() / self.group()
        if t == "\\binom":
            n, k = self.group(), self.group()
            if n.is_Integer and n > 10 * _MAX_FACTORIAL:
                raise _Unparsable("binomial too large")
            return sp.binomial(n, k)
        if t == "\\sqrt":
            if self.peek() == "[":
                self.take()
                n = self.expr()
                self.expect("]")
                return sp.root(self.group(), n)
            return sp.sqrt(self.group())
        if t in ("\\lfloor", "\\lceil"):
            e = self.expr()
            self.expect("\\rfloor" if t == "\\lfloor" else "\\rceil")
            return sp.floor(e) if t == "\\lfloor" else sp.ceiling(e)
        if t == "\\pi":
            return sp.pi
        if t == "\\infty":
            return sp.oo
        if t[1:] in _GREEK:
            return sp.Symbol(t[1:])
        if t[1:] in _FUNCTIONS:
            return self.function(t[1:])
        raise _Unparsable(f"unknown token {t}")

    def function(self, name: str) -> Any:
        sp = self.sp
        base = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.group()
        exp = None
        if self.peek() == "^":
            self.take()
            exp = self.exponent()
        arg = self.power()
        fn: Callable[..., Any] = {"ln": sp.log, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan}.get(
            name, getattr(sp, name))
        value = sp.log(arg, base) if base is not None else fn(arg)
        return value if exp is None else self.pow(value, exp)


def _parse(s: str) -> Any:
    return _Parser(s).parse()


def _is_zero(d: Any, scale: Any) -> bool:
    """Whether the sympy expression d is zero: constants numerically (|d| <= 1e-20 max(1, |scale|) at 50
    digits: exact forms, not decimal approximations), expressions by simplify once two random rational
    points have failed to show a difference."""
    import random

    import sympy

    symbols = sorted(d.free_symbols | scale.free_symbols, key=str)
    rng = random.Random(0)
    for _ in range(2 if symbols else 1):
        point = {s: sympy.Rational(rng.randint(11, 97), rng.randint(7, 13)) for s in symbols}
        try:
            value, size = (complex(sympy.N(e.subs(point), 50)) for e in (d, scale))
        except (TypeError, ValueError):
            continue
        if abs(value) > 1e-20 * max(1.0, abs(size)):
            return False
        if not symbols:
            return True
    return sympy.simplify(d) == 0


def _scalar_equiv(a: str, b: str) -> bool:
    import sympy

    x, y = _parse(a), _parse(b)
    if x == y:
        return True
    if any(e.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) for e in (x, y)):
        return False
    return _is_zero(x - y, y)


def _structure(s: str) -> tuple[str, Any]:
    """How an answer is compared: ("matrix", rows), ("union", parts), ("seq", (brackets, parts)),
    ("set", elements), ("eq", (lhs, rhs)) or ("scalar", s)."""
    m = re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", s)
    if m:
        return "matrix", [row.split("&") for row in m.group(1).split("\\\\") if row]
    if len(parts := _split_top(s, "\\cup")) > 1:
        return "union", parts
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", _spread_pm(_split_top(s[2:-2], ","))
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and len(_split_top(s[1:-1], ",")) > 1:
        depth = 0
        for i, c in enumerate(s):
            depth += (c in "([{") - (c in ")]}")
            if depth == 0 and i < len(s) - 1:
                break
        else:
            return "seq", (s[0] + s[-1], _split_top(s[1:-1], ","))
    if len(parts := _split_top(s, ",")) > 1 or s.count("\\pm") == 1:
        return "set", _spread_pm(parts)
    if len(sides := _split_top(s, "=")) == 2:
        return "eq", sides
    return "scalar", s


def _spread_pm(parts: list[str]) -> list[str]:
    out = []
    for p in parts:
        if p.count("\\pm") == 1:
            out += [p.replace("\\pm", "+"), p.replace("\\pm", "-")]
        else:
            out.append(p)
    return out


def _equiv(a: str, b: str) -> bool:
    """Whether two normalised MATH answers are equal (runs in a worker; may raise)."""
    if a == b:
        return True
    (kind, x), (kind_b, y) = _structure(a), _structure(b)
    if kind != kind_b:
        return False
    if kind == "scalar":
        return _scalar_equiv(x, y)
    if kind == "eq":
        dx, dy = _parse(x[0]) - _parse(x[1]), _parse(y[0]) - _parse(y[1])
        return _is_zero(dx - dy, dy) or _is_zero(dx + dy, dy)
    if kind == "matrix":
        return [len(r) for r in x] == [len(r) for r in y] and all(
            _equiv(p, q) for rx, ry in zip(x, y) for p, q in zip(rx, ry))
    if kind == "seq":
        (brackets_x, x), (brackets_y, y) = x, y
        if brackets_x != brackets_y:
            return False
    if kind in ("seq", "union"):
        return len(x) == len(y) and all(_equiv(p, q) for p, q in zip(x, y))
    unmatched = list(y)  # "set": a multiset match; equivalence is transitive, so greedy is exact
    for p in x:
        hit = next((q for q in unmatched if _equiv(p, q)), None)
        if hit is None:
            return False
        unmatched.remove(hit)
    return not unmatched


def _serve() -> None:
    """Worker main loop: read JSON [a, b] lines on stdin, answer "1" / "0" lines (anything that fails,
    "0"); "ready" once sympy is imported. Print output goes to stderr, not into the protocol."""
    import warnings

    warnings.simplefilter("ignore")
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = 2 << 30 if hard == resource.RLIM_INFINITY else min(2 << 30, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    importlib.import_module("sympy")  # before "ready", so the deadlines do not pay for the import

    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        try:
            a, b = json.loads(line)
            verdict = _equiv(a, b)
        except Exception:
            verdict = False
        channel.write("1\n" if verdict else "0\n")
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
                            raise RuntimeError(f"rpo.rewards: a sympy worker exited with code {w.proc.wait()} "
                                               "before it was ready (its stderr is above)")
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
                        raise RuntimeError(f"rpo.rewards: a sympy worker did not start in {_START_TIMEOUT:.0f} s")
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
