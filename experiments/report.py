"""Aggregates experiments/run.py's runs.jsonl into summary.json, table.md and accuracy.png.

    .venv/bin/python experiments/report.py experiments/runs/quick

Per method: greedy exact-match accuracy and Average@k (mean over k samples per problem), each as
mean ± standard deviation over seeds (and min-max), held-out loss, train-loss first/last; plus
the model before fine-tuning and the teacher. Works on a partial runs.jsonl (methods so far).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np


def load_runs(path: str) -> tuple[dict, list[dict], float, bool]:
    """(config, eval events, wall seconds, finished) of the last config in `path`.

    run.py resumes an interrupted experiment by re-logging the finished (method, seed) records
    after a new `start` event, so the evals are those after the last start; the wall time is the
    sum of every segment run under that config (each segment's last `elapsed_s`).
    """
    config, evals, segments, finished = {}, [], [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["event"] == "start":
                if rec["config"] != config:
                    segments = []
                config, evals, finished = rec["config"], [], False
                segments.append(0.0)
            elif rec["event"] == "eval":
                evals.append(rec)
            elif rec["event"] == "done":
                finished = True
            if segments and "elapsed_s" in rec:
                segments[-1] = rec["elapsed_s"]
    return config, evals, float(sum(segments)), finished


def summarize(evals: list[dict]) -> list[dict]:
    """One row per method, in first-seen order, with mean/std/min/max over seeds."""
    by_method: dict[str, list[dict]] = {}
    for rec in evals:
        by_method.setdefault(rec["method"], []).append(rec)
    rows = []
    for method, recs in by_method.items():
        row = {"method": method, "seeds": len(recs), "teacher": recs[0].get("teacher", "")}
        for key in sorted(recs[0]):
            if key.startswith("eval/") and key not in ("eval/n",):
                vals = np.array([r[key] for r in recs], float)
                row[key] = {"mean": float(vals.mean()), "std": float(vals.std()),
                            "min": float(vals.min()), "max": float(vals.max())}
        for key in ("train_loss_first", "train_loss_last", "train_s", "seconds"):
            if key in recs[0]:
                row[key] = float(np.mean([r[key] for r in recs]))
        rows.append(row)
    return rows


def _fmt(cell: dict | None, pct: bool = True) -> str:
    if cell is None:
        return "-"
    scale = 100.0 if pct else 1.0
    return f"{scale * cell['mean']:.1f} ± {scale * cell['std']:.1f}" if pct else \
        f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def markdown(rows: list[dict], config: dict, wall: float, finished: bool) -> str:
    k = config.get("samples", 0)
    avg_key = f"eval/avg@{k}"
    head = ("| method | teacher | seeds | greedy acc % (mean ± sd) | greedy min-max | "
            f"Average@{k} % | held-out loss | train loss first → last |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        acc = r.get("eval/accuracy")
        span = "-" if acc is None else f"{100 * acc['min']:.0f}-{100 * acc['max']:.0f}"
        train = ("-" if "train_loss_first" not in r else
                 f"{r['train_loss_first']:.3f} → {r['train_loss_last']:.3f}")
        lines.append(f"| {r['method']} | {r['teacher'] or '-'} | {r['seeds']} | {_fmt(acc)} | "
                     f"{span} | {_fmt(r.get(avg_key))} | {_fmt(r.get('eval/loss'), False)} | "
                     f"{train} |")
    n = config.get("eval_problems")
    lines.append("")
    lines.append(f"{n} held-out problems; Average@{k}: mean accuracy of {k} samples per problem "
                 f"(temperature {config.get('temperature')}); sd over seeds. "
                 f"{config.get('steps')} steps of {config.get('batch_size')} packed row(s) of "
                 f"{config.get('seq_len')} tokens at lr "
                 f"{config.get('lr')} on {config.get('n_train')} problems x "
                 f"{config.get('phrasings')} phrasings, noise {config.get('noise')}. Wall time: "
                 f"{wall / 60:.1f} min{'' if finished else ' (run not finished)'}.")
    return "\n".join(lines)


def plot(rows: list[dict], k: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(rows), 4.0))
    for off, key, label in ((-0.2, "eval/accuracy", "greedy"),
                            (0.2, f"eval/avg@{k}", f"Average@{k}")):
        mean = [100 * r[key]["mean"] if key in r else np.nan for r in rows]
        err = [[100 * (r[key]["mean"] - r[key]["min"]) if key in r else 0 for r in rows],
               [100 * (r[key]["max"] - r[key]["mean"]) if key in r else 0 for r in rows]]
        ax.bar(x + off, mean, 0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("held-out exact-match accuracy (%)\n(bars: mean; whiskers: min-max seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out_dir: str) -> str:
    config, evals, wall, finished = load_runs(os.path.join(out_dir, "runs.jsonl"))
    rows = summarize(evals)
    table = markdown(rows, config, wall, finished)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"config": config, "wall_s": wall, "finished": finished, "methods": rows},
                  f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot(rows, config.get("samples", 0), os.path.join(out_dir, "accuracy.png"))
    print(table)
    return table


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: experiments/report.py OUT_DIR")
    main(sys.argv[1])
