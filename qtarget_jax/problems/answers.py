"""Final answers of reasoning outputs: extraction (`#### N`, `\\boxed{...}`, last number) and
numeric normalisation, so "1,000.0", "$1000" and "\\boxed{1000}" all compare equal to "1000".

An output with no parsable answer is scored wrong and reported (`parse_error`), never raised.
"""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

_HASH_RE = re.compile(r"####\s*([^\n]+)")
_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_BOXED = "\\boxed{"


@dataclasses.dataclass(frozen=True)
class Scored:
    """The answer found in an output and whether it matches the gold answer."""

    extracted: str | None   # raw answer text found, None when none was found
    normalized: str | None  # canonical form compared against the gold one
    method: str             # "hash" | "boxed" | "last_number" | "none"
    correct: bool
    parse_error: str | None  # why no answer could be read (None when one was)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, balancing nested braces; None if none is closed."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOXED):i - 1]
        start = text.rfind(_BOXED, 0, start)
    return None


def _marked_answer(text: str) -> tuple[str, str] | None:
    """(answer, "hash") of the last `#### X` line, else (answer, "boxed") of the last
    `\\boxed{X}`; None when `text` has neither mark."""
    found = _HASH_RE.findall(text)
    if found:
        return found[-1].strip(), "hash"
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    return None


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer text, method): the last `#### X` line, else the last `\\boxed{X}`, else the last
    number in `text`; (None, "none") when there is none of these."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


def gold_answer(text: str) -> tuple[str | None, str]:
    """(gold answer, method) of a reference answer column: the `#### N` of a GSM8K answer, the
    `\\boxed{X}` of a MATH solution, else the whole text stripped ("plain": MATH-500's
    `answer` column holds the bare answer, e.g. `\\frac{14}{3}`, whose last number is not it).
    (None, "none") for empty text."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    return (text.strip(), "plain") if text.strip() else (None, "none")


def normalize_answer(answer: str) -> str | None:
    """Canonical text of an answer: numbers as reduced fractions or integers ("1,000.50" ->
    "2001/2", "-0" -> "0", "3/6" -> "1/2"), after dropping $, %, commas, spaces, a trailing dot
    and a \\text{...} unit; anything else lower-cased and stripped. None for an empty answer."""
    s = answer.strip()
    s = re.sub(r"\\text\{[^}]*\}", "", s)
    s = re.sub(r"\\[,!;]|\\\$|[$%]|\\%", "", s)
    s = s.replace(",", "").replace(" ", "").rstrip(".")
    s = re.sub(r"^\\(?:d|t)?frac\{(-?\d+)\}\{(-?\d+)\}$", r"\1/\2", s)
    if not s:
        return None
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        try:
            value = Fraction(s)
        except (ValueError, ZeroDivisionError):
            return s.lower()
        return str(value.numerator) if value.denominator == 1 else str(value)
    return s.lower()


def score(output: str, gold: str | int | float) -> Scored:
    """Exact match of the normalised answer of `output` against the normalised `gold`."""
    gold_norm = normalize_answer(str(gold))
    if gold_norm is None:
        raise ValueError(f"score: gold answer {gold!r} is empty after normalisation")
    extracted, method = extract_answer(output)
    if extracted is None:
        return Scored(None, None, method, False, "no '####', \\boxed{} or number in output")
    norm = normalize_answer(extracted)
    if norm is None:
        return Scored(extracted, None, method, False, f"empty answer after {method}")
    return Scored(extracted, norm, method, norm == gold_norm, None)
