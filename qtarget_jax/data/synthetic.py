"""A synthetic reasoning set: arithmetic word problems (2-3 steps by default) with worked solutions.

Each problem: a start amount and ``ops`` operations (gain, lose, multiply; ``ops=(2, 3)`` by
default: 2 or 3, drawn uniformly; ``(1, 1)`` gives one-step problems) on small numbers
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
from typing import Sequence

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
DEFAULT_OPS = (2, 3)  # (fewest, most) operations per problem
_ANSWER_RE = re.compile(r"^####\s*(-?\d+)\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    item: str
    start: int
    ops: tuple[tuple[str, int], ...]  # ("gain"|"lose"|"mul", operand), DEFAULT_OPS of them

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


def check_ops(ops: Sequence[int]) -> tuple[int, int]:
    """``ops`` as a validated ``(fewest, most)`` pair of operation counts, 1 <= fewest <= most."""
    if (len(ops) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) for k in ops)
            or not 1 <= ops[0] <= ops[1]):
        raise ValueError(f"ops must be (fewest, most) integers with 1 <= fewest <= most, "
                         f"got {tuple(ops)!r}")
    return int(ops[0]), int(ops[1])


def sample_problem(rng: random.Random, ops: Sequence[int] = DEFAULT_OPS) -> Problem:
    """Draws one problem: start 2..12, then ``ops[0]..ops[1]`` operations (count drawn
    uniformly): add/subtract 1..9, multiply by 2 or 3 only while the product stays <= MAX_MUL;
    every amount stays in [1, MAX_VALUE]."""
    lo, hi = check_ops(ops)
    start = rng.randint(2, 12)
    steps, x = [], start
    for _ in range(rng.choice(tuple(range(lo, hi + 1)))):
        options = []
        if x + 1 <= MAX_VALUE:
            options.append(("gain", rng.randint(1, min(9, MAX_VALUE - x))))
        if x >= 2:
            options.append(("lose", rng.randint(1, min(9, x - 1))))
        if 2 * x <= MAX_MUL:
            options.append(("mul", rng.choice([k for k in (2, 3) if k * x <= MAX_MUL])))
        op, b = rng.choice(options)
        steps.append((op, b))
        x = _apply(op, x, b)
    return Problem(rng.choice(NAMES), rng.choice(ITEMS), start, tuple(steps))


def question(p: Problem, rng: random.Random, templates: Sequence[int] | None = None) -> str:
    """The word problem; ``templates``: indices of the sentence templates to draw from."""
    pick = _template_picker(templates)
    parts = [pick(_Q_START, rng).format(name=p.name, a=p.start, item=p.item)]
    parts += [pick(_Q_OP[op], rng).format(name=p.name, b=b, item=p.item) for op, b in p.ops]
    parts.append(pick(_Q_END, rng).format(name=p.name, item=p.item))
    return " ".join(parts)


def solution(p: Problem, rng: random.Random, noise: str | None = None,
             templates: Sequence[int] | None = None) -> str:
    """Worked solution lines and ``#### N``; ``noise`` in (None, "wrong_step", "wrong_answer");
    ``templates``: the indices of the line templates to draw from (default all)."""
    return solution_pair(p, rng, noise, templates)[0]


def solution_pair(p: Problem, rng: random.Random, noise: str | None = None,
                  templates: Sequence[int] | None = None) -> tuple[str, str]:
    """(shown, clean): the solution as written with ``noise``, and the same lines (same template
    draws) with the correct numbers. Equal when ``noise`` is None."""
    if noise not in (None, "wrong_step", "wrong_answer"):
        raise ValueError(f"unknown noise kind {noise!r}")
    pick = _template_picker(templates)
    bad_step = rng.randrange(len(p.ops)) if noise == "wrong_step" else -1
    delta = rng.randint(1, 3)
    # Off by -delta, or +delta when going down would make any later amount < 1.
    values = _chain(p, bad_step, -delta)
    if min(values) < 1:
        values = _chain(p, bad_step, delta)
    start = pick(_S_START, rng).format(name=p.name, a=p.start, item=p.item)
    steps = [pick(_S_OP[op], rng) for op, _ in p.ops]
    final = values[-1]
    if noise == "wrong_answer":
        final = final - delta if final - delta >= 1 and rng.random() < 0.5 else final + delta

    def render(vals: list[int], last: int) -> str:
        lines = [start] + [t.format(prev=vals[k], b=b, new=vals[k + 1], item=p.item)
                           for k, (t, (_, b)) in enumerate(zip(steps, p.ops))]
        return "\n".join(lines + [f"#### {last}"])
    return render(values, final), render(p.values(), p.answer)


def _template_picker(templates: Sequence[int] | None):
    """rng.choice over all templates, or over those at ``templates`` (same draw count)."""
    if templates is None:
        return lambda options, rng: rng.choice(options)
    if not templates or any(not 0 <= t < 3 for t in templates):
        raise ValueError(f"templates must be indices in 0..2, got {list(templates)}")
    return lambda options, rng: rng.choice([options[t] for t in templates])


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


def draw_problems(n: int, seed: int | str, ops: Sequence[int] = DEFAULT_OPS) -> list[Problem]:
    """``n`` distinct problems of ``ops`` operations drawn from ``Random(seed)`` in a fixed order
    (a longer draw extends a shorter one); a string seed names a stream of its own
    (``f"{seed}-new"``), as the row streams of `write_problems` do."""
    check_ops(ops)
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n:
        p = sample_problem(rng, ops)
        if p in seen:
            continue
        seen.add(p)
        problems.append(p)
        if len(seen) > 50 * n + 1000:
            raise RuntimeError("could not draw enough distinct problems")
    return problems


def generate(n_train: int, n_test: int, *, seed: int = 0, noise: float = 0.0,
             phrasings: int = 2, ops: Sequence[int] = DEFAULT_OPS) -> dict[str, list[dict]]:
    """Returns ``{"train": rows, "test": rows}`` of chat rows (see module doc); ``ops``: the
    (fewest, most) operations per problem."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if phrasings < 1 or n_train < 0 or n_test < 0:
        raise ValueError(f"need phrasings >= 1 and n_train, n_test >= 0; got "
                         f"{phrasings}, {n_train}, {n_test}")
    problems = draw_problems(n_train + n_test, seed, ops)
    return {"test": write_problems(problems[:n_test], "test", seed),
            "train": write_problems(problems[n_test:], "train", seed, noise=noise,
                                    phrasings=phrasings)}


def write_problems(problems: Sequence[Problem], split: str, seed: int, *, noise: float = 0.0,
                   phrasings: int = 1, templates: Sequence[int] | None = None) -> list[dict]:
    """Chat rows ``{split}-{k}`` (``{split}-{k}-{j}`` for phrasing j when ``split`` is not
    "test"), each from its own ``Random(f"{seed}-{split}-...")`` stream; a fraction ``noise``
    corrupted. A corrupted row also carries ``clean``: the same lines with the right numbers."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    rows = []
    for pid, p in enumerate(problems):
        if split == "test":  # one clean row per problem (the original test-split ids)
            r = random.Random(f"{seed}-test-{pid}")
            rows.append(_row(f"test-{pid}", p, question(p, r, templates),
                             solution(p, r, None, templates), None))
            continue
        for k in range(phrasings):
            r = random.Random(f"{seed}-{split}-{pid}-{k}")
            kind = None
            if r.random() < noise:
                kind = r.choice(("wrong_step", "wrong_answer"))
            q = question(p, r, templates)
            shown, clean = solution_pair(p, r, kind, templates)
            row = _row(f"{split}-{pid}-{k}", p, q, shown, kind)
            if kind is not None:
                row["clean"] = clean
            rows.append(row)
    return rows


_L_Q = ("Which number is the largest: {xs}?", "What is the biggest of these numbers: {xs}?",
        "Find the largest number among {xs}.")


def largest_rows(n: int, split: str, seed: int) -> list[dict]:
    """A second skill (no arithmetic): ``n`` rows "which of these 3-5 numbers (1..99) is the
    largest", answered ``The largest number is M.`` then ``#### M``; ids ``{split}-k``."""
    rows = []
    for k in range(n):
        r = random.Random(f"{seed}-largest-{split}-{k}")
        xs = r.sample(range(1, 100), r.randint(3, 5))
        m = max(xs)
        q = r.choice(_L_Q).format(xs=", ".join(map(str, xs)))
        rows.append({"id": f"{split}-{k}", "answer": m, "noise": None,
                     "messages": [{"role": "user", "content": q},
                                  {"role": "assistant",
                                   "content": f"The largest number is {m}.\n#### {m}"}]})
    return rows


def _row(rid: str, p: Problem, q: str, s: str, noise: str | None) -> dict:
    return {"id": rid, "answer": p.answer, "noise": noise,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": s}]}


def write_jsonl(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
