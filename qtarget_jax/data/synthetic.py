"""A synthetic reasoning set: 2-3 step arithmetic word problems with worked solutions.

Each problem: a start amount and 2-3 operations (gain, lose, multiply) on small numbers
(start 2..12, amounts in [1, 60], products <= 36). The user turn is the question; the assistant turn
is one line per step (``5 + 3 = 8``...) and a final line ``#### N``. Phrasings of both the
question and of every step are drawn from several templates, so one problem has several valid
observed solutions (non-unique target tokens).

Splits are fixed by seed: problems are drawn from ``Random(seed)``, deduplicated, and the first
``n_test`` distinct problems are the test split (so the test set does not change with
``n_train``); the next ``n_train`` are train, each written ``phrasings`` times. Test rows are
always clean. A fraction ``noise`` of train rows is corrupted: ``wrong_step`` (one step's result
is off by 1-3 and later steps follow the wrong value) or ``wrong_answer`` (steps right, final
line off by 1-3). Rows carry ``id``, ``answer`` (the true one) and ``noise`` (null or the kind).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena",
         "Max", "Nora", "Omar", "Pia", "Ravi", "Sara", "Tom", "Uma", "Zoe")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards",
         "cookies", "stamps")

_Q_START = ("{name} has {a} {item}.", "{name} starts with {a} {item}.",
            "There are {a} {item} in {name}'s bag.")
_Q_OP = {
    "gain": ("{name} gets {b} more {item}.", "Then {name} finds {b} more {item}.",
             "A friend gives {name} {b} {item}."),
    "lose": ("{name} gives away {b} {item}.", "Then {name} loses {b} {item}.",
             "{name} uses {b} of the {item}."),
    "mul": ("Then the number of {item} becomes {b} times as large.",
            "{name} ends up with {b} times as many {item}.",
            "{name}'s {item} are multiplied by {b}."),
}
_Q_END = ("How many {item} does {name} have now?", "How many {item} are there at the end?",
          "What is the final number of {item}?")
_S_START = ("{name} starts with {a} {item}.", "Start: {a} {item}.", "At first there are {a}.")
_S_OP = {
    "gain": ("{prev} + {b} = {new}", "After getting {b} more: {prev} + {b} = {new}.",
             "Adding {b} gives {prev} + {b} = {new} {item}."),
    "lose": ("{prev} - {b} = {new}", "After losing {b}: {prev} - {b} = {new}.",
             "Taking away {b} leaves {prev} - {b} = {new} {item}."),
    "mul": ("{prev} * {b} = {new}", "Multiplying by {b}: {prev} * {b} = {new}.",
            "{b} times as many is {prev} * {b} = {new} {item}."),
}
MAX_VALUE = 60  # no amount exceeds this
MAX_MUL = 36    # a product (one-digit x one-digit mostly) stays small for a 135M model
_ANSWER_RE = re.compile(r"^####\s*(-?\d+)\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    item: str
    start: int
    ops: tuple[tuple[str, int], ...]  # ("gain"|"lose"|"mul", operand), 2-3 of them

    def values(self) -> list[int]:
        """Amounts after each step: [start, v1, ..., answer]."""
        vals = [self.start]
        for op, b in self.ops:
            vals.append(_apply(op, vals[-1], b))
        return vals

    @property
    def answer(self) -> int:
        return self.values()[-1]


def _apply(op: str, x: int, b: int) -> int:
    return {"gain": x + b, "lose": x - b, "mul": x * b}[op]


def sample_problem(rng: random.Random) -> Problem:
    """Draws one problem: start 2..12, add/subtract 1..9, multiply by 2 or 3 only while the
    product stays <= MAX_MUL; every amount stays in [1, MAX_VALUE]."""
    start = rng.randint(2, 12)
    ops, x = [], start
    for _ in range(rng.choice((2, 3))):
        options = []
        if x + 1 <= MAX_VALUE:
            options.append(("gain", rng.randint(1, min(9, MAX_VALUE - x))))
        if x >= 2:
            options.append(("lose", rng.randint(1, min(9, x - 1))))
        if 2 * x <= MAX_MUL:
            options.append(("mul", rng.choice([k for k in (2, 3) if k * x <= MAX_MUL])))
        op, b = rng.choice(options)
        ops.append((op, b))
        x = _apply(op, x, b)
    return Problem(rng.choice(NAMES), rng.choice(ITEMS), start, tuple(ops))


def question(p: Problem, rng: random.Random) -> str:
    parts = [rng.choice(_Q_START).format(name=p.name, a=p.start, item=p.item)]
    parts += [rng.choice(_Q_OP[op]).format(name=p.name, b=b, item=p.item) for op, b in p.ops]
    parts.append(rng.choice(_Q_END).format(name=p.name, item=p.item))
    return " ".join(parts)


def solution(p: Problem, rng: random.Random, noise: str | None = None) -> str:
    """Worked solution lines and ``#### N``; ``noise`` in (None, "wrong_step", "wrong_answer")."""
    if noise not in (None, "wrong_step", "wrong_answer"):
        raise ValueError(f"unknown noise kind {noise!r}")
    bad_step = rng.randrange(len(p.ops)) if noise == "wrong_step" else -1
    delta = rng.randint(1, 3)
    # Off by -delta, or +delta when going down would make any later amount < 1.
    values = _chain(p, bad_step, -delta)
    if min(values) < 1:
        values = _chain(p, bad_step, delta)
    lines = [rng.choice(_S_START).format(name=p.name, a=p.start, item=p.item)]
    for k, (op, b) in enumerate(p.ops):
        lines.append(rng.choice(_S_OP[op]).format(prev=values[k], b=b, new=values[k + 1],
                                                  item=p.item))
    final = values[-1]
    if noise == "wrong_answer":
        final = final - delta if final - delta >= 1 and rng.random() < 0.5 else final + delta
    lines.append(f"#### {final}")
    return "\n".join(lines)


def _chain(p: Problem, bad_step: int, delta: int) -> list[int]:
    """Amounts [start, v1, ...] when step ``bad_step``'s result is shifted by ``delta``."""
    vals = [p.start]
    for k, (op, b) in enumerate(p.ops):
        vals.append(_apply(op, vals[-1], b) + (delta if k == bad_step else 0))
    return vals


def extract_answer(text: str) -> int | None:
    """The integer on the last ``#### N`` line of ``text``, or None when there is none."""
    found = _ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def generate(n_train: int, n_test: int, *, seed: int = 0, noise: float = 0.0,
             phrasings: int = 2) -> dict[str, list[dict]]:
    """Returns ``{"train": rows, "test": rows}`` of chat rows (see module doc)."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if phrasings < 1 or n_train < 0 or n_test < 0:
        raise ValueError(f"need phrasings >= 1 and n_train, n_test >= 0; got "
                         f"{phrasings}, {n_train}, {n_test}")
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n_train + n_test:
        p = sample_problem(rng)
        if p in seen:
            continue
        seen.add(p)
        problems.append(p)
        if len(seen) > 50 * (n_train + n_test) + 1000:
            raise RuntimeError("could not draw enough distinct problems")
    out: dict[str, list[dict]] = {"test": [], "train": []}
    for pid, p in enumerate(problems[:n_test]):
        r = random.Random(f"{seed}-test-{pid}")  # per-row streams: rows do not shift each other
        out["test"].append(_row(f"test-{pid}", p, question(p, r), solution(p, r), None))
    for pid, p in enumerate(problems[n_test:]):
        for k in range(phrasings):
            r = random.Random(f"{seed}-train-{pid}-{k}")
            kind = None
            if r.random() < noise:
                kind = r.choice(("wrong_step", "wrong_answer"))
            out["train"].append(_row(f"train-{pid}-{k}", p, question(p, r),
                                     solution(p, r, kind), kind))
    return out


def _row(rid: str, p: Problem, q: str, s: str, noise: str | None) -> dict:
    return {"id": rid, "answer": p.answer, "noise": noise,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": s}]}


def write_jsonl(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
