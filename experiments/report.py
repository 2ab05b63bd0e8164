"""experiments/run.py's runs.jsonl -> summary.json, table.md and per-epoch curves (PNG).

    .venv/bin/python experiments/report.py experiments/runs/regime
    .venv/bin/python experiments/report.py experiments/runs/learn

Per method, over seeds: mean ± sd and min-max of held-out greedy accuracy, Average@k,
memorisation share, KL(B0 || model), answer-token accuracy and second-skill accuracy after the
last epoch; the base B0 and the teacher T as reference rows; per-epoch curves (mean over seeds,
min-max band) of answer-token accuracy, memorisation and KL. With a new skill (learn.yaml) the
columns are the new skill's greedy accuracy and Average@k, the old skill's greedy accuracy,
the second skill, KL and memorisation, the curves add the new skill's answer-token accuracy
and the target's mass at its answer tokens, and a second table gives that mass at the start
and the end. With conditions: one table and one figure per condition. Works on a partial
runs.jsonl.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

# (key in the records, column title, scale)
COLUMNS = (("accuracy", "greedy acc %", 100), ("avg@", "Average@{k} %", 100),
           ("memorisation", "memorised %", 100), ("kl_ref", "KL(B0‖model)", 1),
           ("answer_token_acc", "answer-token acc %", 100),
           ("skill_accuracy", "2nd-skill acc %", 100))
CURVES = (("answer_token_acc", "held-out answer-token accuracy (%)", 100),
          ("memorisation", "corrupted token preferred (%)", 100),
          ("kl_ref", "KL(B0 || model) on off-task answers", 1))
LEARN_COLUMNS = (("new_accuracy", "new greedy %", 100), ("new_avg@", "new Average@{k} %", 100),
                 ("accuracy", "old greedy %", 100), ("skill_accuracy", "2nd-skill acc %", 100),
                 ("kl_ref", "KL(B0‖model)", 1), ("memorisation", "memorised %", 100),
                 ("new_answer_token_acc", "new answer-token acc %", 100))
LEARN_CURVES = (("new_answer_token_acc", "new skill: answer-token accuracy (%)", 100),
                ("answer_token_acc", "old skill: answer-token accuracy (%)", 100),
                ("memorisation", "corrupted token preferred (%)", 100),
                ("kl_ref", "KL(B0 || model) on off-task answers", 1),
                ("new_gamma", "new skill answer tokens: mean gamma", 1),
                ("new_residual_y", "new skill: (1 - gamma) pi~(y), residual's label mass", 1))
# The target's mass at the new skill's answer tokens, at the start and the end of stage 1.
MASS = (("new_gamma", "gamma"), ("new_p_y", "p(y)"), ("new_residual_y", "(1-γ)·π̃(y)"),
        ("new_q_y", "Q(y)"), ("new_teacher_p_y", "teacher p(y)"))


def design(config: dict) -> tuple[tuple, tuple]:
    """(table columns, curves) of the experiment: the new skill's when it has one."""
    return (LEARN_COLUMNS, LEARN_CURVES) if config["data"].get("new") else (COLUMNS, CURVES)


def load_runs(path: str) -> tuple[dict, list[dict], list[dict], float, bool]:
    """(config, stage-0 model records, run records, wall seconds, finished) of the last config.

    A resumed experiment re-logs its finished records after a new `start` event, so records
    are those after the last start; the wall time sums every segment under that config."""
    config, models, runs, segments, finished = {}, [], [], [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["event"] == "start":
                if rec["config"] != config:
                    segments = []
                config, models, runs, finished = rec["config"], [], [], False
                segments.append(0.0)
            elif rec["event"] == "model":
                models.append(rec)
            elif rec["event"] == "run":
                runs.append(rec)
            elif rec["event"] == "done":
                finished = True
            if segments and "elapsed_s" in rec:
                segments[-1] = rec["elapsed_s"]
    return config, models, runs, float(sum(segments)), finished


def _key(key: str, k: int) -> str:
    return f"{key}{k}" if key.endswith("@") else key


def _stats(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "n": int(v.size)}


def conditions(runs: list[dict]) -> list:
    """The conditions of the runs in first-seen order ([None] without conditions)."""
    return list(dict.fromkeys(r.get("condition") for r in runs)) or [None]


def summarize(models: list[dict], runs: list[dict], k: int, columns: tuple = COLUMNS,
              curve_keys: tuple = CURVES, condition=None) -> list[dict]:
    """One row per stage-0 model and per method (first-seen order) of `condition`, stats over
    seeds; a model's memorisation is the condition's (`by_condition`) when it has one."""
    rows = []
    for m in models:
        flat = {**m.get("per_epoch", {}), **m.get("by_condition", {}).get(condition, {}), **m}
        rows.append({"name": m["name"], "teacher": "-", "seeds": 1, "seconds": m["seconds"],
                     **{_key(c, k): _stats([flat[_key(c, k)]]) for c, _, _ in columns
                        if _key(c, k) in flat}})
    by: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("condition") == condition:
            by.setdefault(r["name"], []).append(r)
    for name, recs in by.items():
        row = {"name": name, "teacher": recs[0]["teacher"], "seeds": len(recs),
               "seconds": float(np.mean([r["seconds"] for r in recs])),
               "eval_s": float(np.mean([r["eval_s"] for r in recs]))}
        if condition is not None:
            row["condition"] = condition
        for c, _, _ in columns:
            if _key(c, k) in recs[0]:
                row[_key(c, k)] = _stats([r[_key(c, k)] for r in recs])
        mass = {}
        for c, _ in MASS:
            if c in recs[0]["epochs"][0]:
                mass[c] = {"start": _stats([r["epochs"][0][c] for r in recs]),
                           "end": _stats([r["epochs"][-1][c] for r in recs])}
        if mass:
            row["mass"] = mass
        curves = {}
        for c, _, _ in curve_keys:
            if c in recs[0]["epochs"][0]:
                per_seed = np.array([[e[c] for e in r["epochs"]] for r in recs], float)
                curves[c] = {"epoch": [e["epoch"] for e in recs[0]["epochs"]],
                             "mean": per_seed.mean(0).tolist(), "min": per_seed.min(0).tolist(),
                             "max": per_seed.max(0).tolist()}
        row["curves"] = curves
        rows.append(row)
    return rows


def _cell(stat: dict | None, scale: float) -> str:
    if stat is None:
        return "-"
    digits = 1 if scale == 100 else 3
    if stat["n"] == 1:
        return f"{scale * stat['mean']:.{digits}f}"
    return (f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f} "
            f"({scale * stat['min']:.{digits}f}-{scale * stat['max']:.{digits}f})")


def table(rows: list[dict], k: int, columns: tuple, teacher_name: str = "T") -> list[str]:
    titles = [t.format(k=k) for _, t, _ in columns]
    lines = ["| method | teacher | seeds | " + " | ".join(titles) + " | s / run |",
             "|" + "---|" * (len(titles) + 4)]
    show = lambda name: teacher_name if name == "T" else name
    for r in rows:
        cells = [_cell(r.get(_key(c, k)), s) for c, _, s in columns]
        lines.append(f"| {show(r['name'])} | {show(r['teacher'])} | {r['seeds']} | "
                     + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return lines


def mass_table(rows: list[dict], teacher_name: str) -> list[str]:
    """Per method, the target's mass at the new skill's answer tokens: start -> end means."""
    lines = ["| method | teacher | " + " | ".join(t for _, t in MASS) + " |",
             "|" + "---|" * (len(MASS) + 2)]
    for r in rows:
        if "mass" not in r:
            continue
        cells = []
        for c, _ in MASS:
            m = r["mass"].get(c)
            cells.append("-" if m is None else
                         f"{m['start']['mean']:.3f} → {m['end']['mean']:.3f}")
        teacher = teacher_name if r["teacher"] == "T" else r["teacher"]
        lines.append(f"| {r['name']} | {teacher} | " + " | ".join(cells) + " |")
    return lines


def learn_markdown(tables: dict, config: dict, wall: float, finished: bool) -> str:
    """One section per condition: the results table, then the target's mass table."""
    k, d, e = config["eval"]["samples"], config["data"], config["eval"]
    noise = {c["name"]: c["noise"] for c in config.get("conditions") or []}
    lines = []
    for cond, rows in tables.items():
        title = "" if cond is None else f" {cond} (noise {noise.get(cond, d['noise'])})"
        lines += [f"### Condition{title}", ""] + table(rows, k, LEARN_COLUMNS, "T+") + [""]
        lines += ["Mass of the target at the new skill's held-out answer tokens, mean over "
                  "tokens and seeds, start → end of stage 1:", ""]
        lines += mass_table(rows, "T+") + [""]
    n = d["new"]
    lines += [f"Mean ± sd over seeds (min-max). New skill: {n['n_test']} held-out problems of "
              f"{n['ops'][0]}-{n['ops'][1]} operations (one = {100 / n['n_test']:.2f} points); "
              f"greedy and Average@{k} at temperature {e['temperature']}, up to "
              f"{e['max_new_tokens']} new tokens. Old skill: {d['n_test']} held-out 2-3-op "
              f"problems, greedy. 2nd skill: {d['n_skill_test']} held-out 'largest number' "
              "questions. KL(B0‖model): mean per token on B0's own answers to off-task prompts. "
              "memorised: share of the corrupted positions of set B where the model prefers the "
              f"corrupted token. T+ = B0 + {config['teacher']['epochs']} epochs of "
              f"{n['n_teacher']} new-skill problems. Stage 1: {config['stage1']['epochs']} "
              f"epochs of {n['n_b']} problems. Wall time: {wall / 60:.1f} min"
              f"{'' if finished else ' (not finished)'}."]
    return "\n".join(lines)


def markdown(rows: list[dict], config: dict, wall: float, finished: bool) -> str:
    k = config["eval"]["samples"]
    lines = table(rows, k, COLUMNS)
    d, e = config["data"], config["eval"]
    lines += ["", f"Mean ± sd over seeds (min-max). {d['n_test']} held-out problems "
              f"(one = {100 / max(d['n_test'], 1):.1f} points); Average@{k} at temperature "
              f"{e['temperature']}; memorised: share of the corrupted positions of set B where "
              "the model prefers the corrupted token to the correct one; KL(B0‖model): mean "
              "per token on B0's own answers to off-task prompts; answer-token accuracy: "
              "teacher-forced, step results and final line of the held-out references; "
              f"2nd skill: {d['n_skill_test']} held-out 'largest number' questions. Stage 1: "
              f"{config['stage1']['epochs']} epochs of {d['n_b']} problems, noise "
              f"{d['noise']}. Wall time: {wall / 60:.1f} min"
              f"{'' if finished else ' (not finished)'}."]
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: str, curve_keys: tuple = CURVES, title: str = ""
                ) -> None:
    """One panel per per-epoch metric (3 a row): mean over seeds per method, min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in rows if r.get("curves")]
    n_rows = -(-len(curve_keys) // 3)
    n_cols = min(3, len(curve_keys))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.0 * n_cols, 4.0 * n_rows),
                             squeeze=False)
    for ax in axes.flat[len(curve_keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    for ax, (key, title, scale) in zip(axes.flat, curve_keys):
        for r in methods:
            c = r["curves"].get(key)
            if c is None:
                continue
            x = np.asarray(c["epoch"])
            line, = ax.plot(x, scale * np.asarray(c["mean"]), marker="o", label=r["name"])
            ax.fill_between(x, scale * np.asarray(c["min"]), scale * np.asarray(c["max"]),
                            color=line.get_color(), alpha=0.12)
        ax.set_xlabel("epoch of set B")
        ax.set_title(title, fontsize=10)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out_dir: str) -> str:
    config, models, runs, wall, finished = load_runs(os.path.join(out_dir, "runs.jsonl"))
    columns, curve_keys = design(config)
    k = config["eval"]["samples"]
    tables = {c: summarize(models, runs, k, columns, curve_keys, c) for c in conditions(runs)}
    if config["data"].get("new"):
        text = learn_markdown(tables, config, wall, finished)
    else:
        text = markdown(tables[None], config, wall, finished)
    summary = {"config": config, "wall_s": wall, "finished": finished}
    if list(tables) == [None]:
        summary["rows"] = tables[None]
    else:                      # per condition: B0 and T rows, then its methods
        summary["conditions"] = tables
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    for cond, rs in tables.items():
        if any(r.get("curves") for r in rs):
            name = "curves.png" if cond is None else f"curves_{cond}.png"
            plot_curves(rs, os.path.join(out_dir, name), curve_keys, cond or "")
    print(text)
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: experiments/report.py OUT_DIR")
    main(sys.argv[1])
