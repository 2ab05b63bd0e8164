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
from typing import NamedTuple

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


class Records(NamedTuple):
    """What runs.jsonl holds under its last config."""
    config: dict
    models: list[dict]          # stage-0 models' evaluation records (B0, T)
    runs: list[dict]            # stage-1 run records
    trained: dict[str, float]   # stage-0 model name -> seconds its training took
    wall: float                 # seconds, summed over the invocations
    finished: bool


def load_runs(path: str) -> Records:
    """The records of runs.jsonl's last config.

    A resumed experiment re-logs its finished records after a new `start` event, so records
    are those after the last start; the wall time sums every segment under that config.
    Stage-0 training is logged once, by the invocation that trained it (a resume finds its
    models cached)."""
    config, models, runs, trained, segments, finished = {}, [], [], {}, [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["event"] == "start":
                if rec["config"] != config:
                    segments, trained = [], {}
                config, models, runs, finished = rec["config"], [], [], False
                segments.append(0.0)
            elif rec["event"] == "stage0":
                trained[rec["name"]] = rec["seconds"]
            elif rec["event"] == "model":
                models.append(rec)
            elif rec["event"] == "run":
                runs.append(rec)
            elif rec["event"] == "done":
                finished = True
            if segments and "elapsed_s" in rec:
                segments[-1] = rec["elapsed_s"]
    return Records(config, models, runs, trained, float(sum(segments)), finished)


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
    f = lambda x: f"{round(scale * x, digits) + 0.0:.{digits}f}"     # + 0.0: no "-0.000"
    if stat["n"] == 1:
        return f(stat["mean"])
    return f"{f(stat['mean'])} ± {f(stat['std'])} ({f(stat['min'])}-{f(stat['max'])})"


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


# The three questions of the learn experiment (issue: "the answer, whatever it is"), per
# condition. Seeds are few (3), so a difference counts only when the seed ranges separate.
RETENTION = (("accuracy", "old-skill greedy", 100, +1), ("skill_accuracy", "2nd skill", 100, +1),
             ("kl_ref", "KL(B0‖model)", 1, -1), ("memorisation", "memorised", 100, -1))


def _versus(a: dict, b: dict) -> str:
    """'above' when every seed of a is above every seed of b, 'below' for the reverse,
    'within spread' when their min-max ranges overlap."""
    if a["min"] > b["max"]:
        return "above"
    if a["max"] < b["min"]:
        return "below"
    return "within spread"


def answer(rows: list[dict], config: dict, k: int) -> dict:
    """(a)-(c) for one condition's rows (`summarize`), from the new skill's Average@k.

    (a) per Target-SFT variant: mean - B0 and the variant's seed range (max - min); it ends
        above B0 by more than the seed spread when mean - B0 > range.
    (b) the best variant by mean Average@k against SFT and DFT: mean difference and
        `_versus` of the seed ranges.
    (c) the same variant's retention against SFT and DFT: old-skill and second-skill greedy
        accuracy, KL(B0 || model) and memorisation (where measured), differences of means
        (points; KL in nats/token) and `_versus` (for KL and memorisation lower is better:
        'above' means better retention there too).
    Raises KeyError when the condition lacks B0, an SFT or DFT run, or any Target-SFT run."""
    avg = _key("new_avg@", k)
    by = {r["name"]: r for r in rows}
    presets = {m["name"]: m["target"]["preset"] for m in config["methods"]}
    variants = [n for n, p in presets.items() if p == "target_sft" and n in by]
    if not variants:
        raise KeyError("no Target-SFT run in this condition")
    sft, dft = (next((n for n, p in presets.items() if p == want and n in by), None)
                for want in ("sft", "dft"))
    if sft is None or dft is None:
        raise KeyError("no SFT or no DFT run in this condition")
    b0 = by["B0"][avg]["mean"]
    out = {"metric": avg, "B0": b0, "a": {}, "b": {}, "c": {}}
    for n in variants:
        s = by[n][avg]
        out["a"][n] = {"mean": s["mean"], "delta": s["mean"] - b0, "seeds": s["n"],
                       "range": s["max"] - s["min"], "above": s["mean"] - b0 > s["max"] - s["min"]}
    best = max(variants, key=lambda n: by[n][avg]["mean"])
    out["best"] = best
    for other in (sft, dft):
        a, b = by[best][avg], by[other][avg]
        out["b"][other] = {"delta": a["mean"] - b["mean"], "versus": _versus(a, b)}
        out["c"][other] = {}
        for key, _, _, sign in RETENTION:
            if key in by[best] and key in by[other]:
                a, b = by[best][key], by[other][key]
                v = _versus(a, b) if sign > 0 else _versus(b, a)
                out["c"][other][key] = {"delta": a["mean"] - b["mean"], "versus": v}
    return out


def answer_lines(ans: dict, k: int) -> list[str]:
    """(a)-(c) of `answer` as three markdown bullets."""
    pts = lambda x: f"{100 * x:+.1f}"
    a = "; ".join(f"{n} {100 * v['mean']:.1f} ({pts(v['delta'])} vs B0, range over "
                  f"{v['seeds']} seed{'s' * (v['seeds'] > 1)} {100 * v['range']:.1f}: "
                  f"{'yes' if v['above'] else 'no'})" for n, v in ans["a"].items())
    b = "; ".join(f"vs {o} {pts(v['delta'])} ({v['versus']})" for o, v in ans["b"].items())
    c = []
    for o, metrics in ans["c"].items():
        parts = [f"{title} {pts(m['delta']) if scale == 100 else format(m['delta'], '+.3f')}"
                 f" ({m['versus']})"
                 for key, title, scale, _ in RETENTION if (m := metrics.get(key))]
        c.append(f"vs {o}: " + ", ".join(parts))
    return [f"- (a) above B0 (Average@{k} {100 * ans['B0']:.1f}) by more than the seed spread? {a}.",
            f"- (b) best Target-SFT variant, {ans['best']}, on Average@{k}: {b}.",
            f"- (c) its retention (best variant minus the other; 'above' = every seed "
            f"retains more): {'; '.join(c)}."]


def answers(tables: dict, config: dict) -> dict:
    """condition -> `answer`, for the conditions that have B0, SFT, DFT and a Target-SFT
    variant (a partial runs.jsonl may not yet)."""
    out = {}
    for cond, rows in tables.items():
        try:
            out[cond] = answer(rows, config, config["eval"]["samples"])
        except KeyError:
            pass
    return out


def learn_markdown(tables: dict, rec: Records) -> str:
    """The answers (a)-(c) per condition where they can be computed, then one section per
    condition (the results table, the target's mass table), then what the columns are and the
    measured cost."""
    config = rec.config
    k, d, e = config["eval"]["samples"], config["data"], config["eval"]
    noise = {c["name"]: c["noise"] for c in config.get("conditions") or []}
    title = lambda cond: "" if cond is None else f" {cond} (noise {noise.get(cond, d['noise'])})"
    lines = []
    for cond, ans in answers(tables, config).items():
        lines += [f"### Answer, condition{title(cond)}", ""] + answer_lines(ans, k) + [""]
    for cond, rows in tables.items():
        lines += [f"### Condition{title(cond)}", ""] + table(rows, k, LEARN_COLUMNS, "T+") + [""]
        lines += ["Mass of the target at the new skill's held-out answer tokens, mean over "
                  "tokens and seeds, start → end of stage 1:", ""]
        lines += mass_table(rows, "T+") + [""]
    n = d["new"]
    runs_s = sum(r["seconds"] for r in rec.runs)
    stage0_s = sum(rec.trained.values()) + sum(m["seconds"] for m in rec.models)
    trained = ", ".join(f"{name} {s:.0f} s" for name, s in rec.trained.items()) or "cached"
    lines += [f"Mean ± sd over seeds (min-max). New skill: {n['n_test']} held-out problems of "
              f"{n['ops'][0]}-{n['ops'][1]} operations (one = {100 / n['n_test']:.2f} points); "
              f"greedy and Average@{k} at temperature {e['temperature']}, up to "
              f"{e['max_new_tokens']} new tokens. Old skill: {d['n_test']} held-out 2-3-op "
              f"problems, greedy. 2nd skill: {d['n_skill_test']} held-out 'largest number' "
              "questions. KL(B0‖model): mean per token on B0's own answers to off-task prompts. "
              "memorised: share of the corrupted positions of set B where the model prefers the "
              f"corrupted token. T+ = B0 + {config['teacher']['epochs']} epochs of "
              f"{n['n_teacher']} new-skill problems. Stage 1: {config['stage1']['epochs']} "
              f"epochs of {n['n_b']} problems.",
              "",
              f"Cost, as logged: stage 0 {stage0_s / 60:.1f} min (training: {trained}; "
              f"evaluations {sum(m['seconds'] for m in rec.models):.0f} s), {len(rec.runs)} "
              f"stage-1 runs {runs_s / 60:.1f} min ({runs_s / max(len(rec.runs), 1):.0f} s a "
              f"run), {(stage0_s + runs_s) / 3600:.2f} h in all; wall time over the invocations "
              f"{rec.wall / 60:.1f} min{'' if rec.finished else ' (not finished)'}."]
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
    next((ax for ax in axes.flat if ax.get_lines()), axes.flat[0]).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out_dir: str) -> str:
    rec = load_runs(os.path.join(out_dir, "runs.jsonl"))
    config, models, runs, wall, finished = rec.config, rec.models, rec.runs, rec.wall, rec.finished
    columns, curve_keys = design(config)
    k = config["eval"]["samples"]
    tables = {c: summarize(models, runs, k, columns, curve_keys, c) for c in conditions(runs)}
    if config["data"].get("new"):
        text = learn_markdown(tables, rec)
    else:
        text = markdown(tables[None], config, wall, finished)
    summary = {"config": config, "wall_s": wall, "finished": finished}
    if list(tables) == [None]:
        summary["rows"] = tables[None]
    else:                      # per condition: B0 and T rows, then its methods
        summary["conditions"] = tables
    if config["data"].get("new"):
        summary["answers"] = answers(tables, config)
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
