"""How the old skill's greedy answers go wrong after stage 1: how many steps the model writes,
and how often it solved the problem and kept going (learn.yaml, docs/results.md section 2).

    .venv/bin/python experiments/oldskill.py experiments/runs/learn

Reads the per-problem greedy outputs a run with a new skill leaves in its out_dir
(`eval_<name>_old.jsonl`: `gold`, `output`, `correct`) and gives, per model or method (seeds
pooled, with conditions per condition): answers, mean step lines (lines with `= <number>`),
the share wrong, and the share wrong although one of its steps had computed the gold answer.
Writes `old_skill.md` to the folder and prints it.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

_STEP = re.compile(r"=\s*(-?\d+)")
_SEED = re.compile(r"_\d+$")


def step_results(output: str) -> list[str]:
    """The number after the first `=` of each line that has one: a solution's step results."""
    found = (_STEP.search(line) for line in output.split("\n"))
    return [m.group(1) for m in found if m]


def summarise(rows: list[dict]) -> dict:
    """rows: {"gold": str, "output": str, "correct": bool} per problem -> n, mean step lines,
    share wrong, share wrong with the gold among the step results (floats in [0, 1])."""
    n = len(rows)
    steps = [step_results(r["output"]) for r in rows]
    wrong = [not r["correct"] for r in rows]
    return {"n": n,
            "steps": sum(map(len, steps)) / n,
            "wrong": sum(wrong) / n,
            "kept_going": sum(w and r["gold"] in s for w, r, s in zip(wrong, rows, steps)) / n}


def read_rows(path: str) -> list[dict]:
    """One eval file's rows (blank lines skipped, as run.py's reader does); a malformed line or
    a row without gold/output/correct is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({k: row[k] for k in ("gold", "output", "correct")})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not an eval row with gold, output and correct "
                                 f"({type(e).__name__}: {e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def by_method(folder: str) -> dict[str, dict]:
    """name (seed suffix dropped: `noise0_sft_2` -> `noise0_sft`; `B0`, `T` as they are) ->
    `summarise` over its files' rows, in sorted file order."""
    pooled: dict[str, list[dict]] = {}
    paths = sorted(glob.glob(os.path.join(folder, "eval_*_old.jsonl")))
    if not paths:
        raise FileNotFoundError(f"{folder}: no eval_*_old.jsonl (a config with a new skill "
                                f"writes them)")
    for path in paths:
        name = os.path.basename(path)[len("eval_"):-len("_old.jsonl")]
        pooled.setdefault(_SEED.sub("", name), []).extend(read_rows(path))
    return {name: summarise(rows) for name, rows in pooled.items()}


def markdown(stats: dict[str, dict]) -> str:
    lines = ["Old skill, greedy answers after stage 1 (seeds pooled):", "",
             "| model / method | answers | step lines per answer | wrong % | "
             "wrong, a step had the answer % |", "|---|---|---|---|---|"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['n']} | {s['steps']:.2f} | {100 * s['wrong']:.1f} | "
                     f"{100 * s['kept_going']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: oldskill.py OUT_DIR")
    text = markdown(by_method(argv[0]))
    with open(os.path.join(argv[0], "old_skill.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
