"""experiments/run.py's runs.jsonl -> summary.json, table.md and per-epoch curves (PNG).

    .venv/bin/python experiments/report.py experiments/runs/regime

Per method, over seeds: mean ± sd and min-max of held-out greedy accuracy, Average@k,
memorisation share, KL(B0 || model), answer-token accuracy and second-skill accuracy after the
last epoch; the base B0 and the teacher T as reference rows; per-epoch curves (mean over seeds,
min-max band) of answer-token accuracy, memorisation and KL. Works on a partial runs.jsonl.
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
    return f"avg@{k}" if key == "avg@" else key


def _stats(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "n": int(v.size)}


def summarize(models: list[dict], runs: list[dict], k: int) -> list[dict]:
    """One row per stage-0 model and per method (first-seen order), stats over seeds."""
    rows = []
    for m in models:
        flat = {**m.get("per_epoch", {}), **m}
        rows.append({"name": m["name"], "teacher": "-", "seeds": 1, "seconds": m["seconds"],
                     **{_key(c, k): _stats([flat[_key(c, k)]]) for c, _, _ in COLUMNS
                        if _key(c, k) in flat}})
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["name"], []).append(r)
    for name, recs in by.items():
        row = {"name": name, "teacher": recs[0]["teacher"], "seeds": len(recs),
               "seconds": float(np.mean([r["seconds"] for r in recs])),
               "eval_s": float(np.mean([r["eval_s"] for r in recs]))}
        for c, _, _ in COLUMNS:
            if _key(c, k) in recs[0]:
                row[_key(c, k)] = _stats([r[_key(c, k)] for r in recs])
        curves = {}
        for c, _, _ in CURVES:
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


def markdown(rows: list[dict], config: dict, wall: float, finished: bool) -> str:
    k = config["eval"]["samples"]
    titles = [t.format(k=k) for _, t, _ in COLUMNS]
    lines = ["| method | teacher | seeds | " + " | ".join(titles) + " | s / run |",
             "|" + "---|" * (len(titles) + 4)]
    for r in rows:
        cells = [_cell(r.get(_key(c, k)), s) for c, _, s in COLUMNS]
        lines.append(f"| {r['name']} | {r['teacher']} | {r['seeds']} | " + " | ".join(cells)
                     + f" | {r['seconds']:.0f} |")
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


def plot_curves(rows: list[dict], path: str) -> None:
    """One panel per per-epoch metric: mean over seeds per method, min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in rows if r.get("curves")]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.0 * len(CURVES), 4.0))
    for ax, (key, title, scale) in zip(np.atleast_1d(axes), CURVES):
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
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out_dir: str) -> str:
    config, models, runs, wall, finished = load_runs(os.path.join(out_dir, "runs.jsonl"))
    rows = summarize(models, runs, config["eval"]["samples"])
    table = markdown(rows, config, wall, finished)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"config": config, "wall_s": wall, "finished": finished, "rows": rows},
                  f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    if any(r.get("curves") for r in rows):
        plot_curves(rows, os.path.join(out_dir, "curves.png"))
    print(table)
    return table


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: experiments/report.py OUT_DIR")
    main(sys.argv[1])
