"""Where each method's Q-target puts its mass on the new skill's answer tokens at the start of
stage 1, split by how sure B0 is of the label: the tokens left to learn against the ones it
knows (learn.yaml; `probes.target_mass_by_confidence`).

    .venv/bin/python experiments/mass.py --config experiments/learn.yaml

Needs the experiment's stage 0 (made, or found cached, exactly as `run.py` does: the sets,
B0, T). On the held-out new-skill references, B0 and T are run once each; per method the
target is built on B0's logits (stage 1 starts from B0) with its teacher's logits. Per bucket
of B0's p(y): the share of tokens, the teacher's p(y), Q(y), and the pull on the label
Q(y) - p(y) (minus the label's logit gradient) relative to plain SFT's 1 - p(y). Writes
`mass_by_confidence.md` and `.json` to the experiment's out_dir and prints the markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from run import eval_examples, load_experiment, read_jsonl, stage0

from qtarget_jax.libtpu_env import quiet_without_tpu

EDGES = (0.0, 0.1, 0.5, 0.9, 1.0)


def _bucket(lo: float, hi: float) -> str:
    return f"[{lo:g}, {hi:g}{']' if hi == 1.0 else ')'}"


def markdown(buckets: dict[str, list[dict]], teachers: dict[str, str], n_test: int) -> str:
    """Two tables from `measure`'s buckets: what the tokens are, and each method's Q(y) and
    label pull relative to SFT per bucket."""
    first = next(iter(buckets.values()))
    heads = [_bucket(b["lo"], b["hi"]) for b in first]
    sep = "|" + "---|" * (len(heads) + 1)
    fmt = lambda x, f: "-" if x is None else format(x, f)
    t_rows = {t: next(buckets[m] for m in buckets if teachers[m] == t)
              for t in dict.fromkeys(teachers.values()) if t not in ("none", "B0")}
    lines = [f"New skill, {n_test} held-out references, answer tokens by B0's p(y):", "",
             "| B0's p(y) | " + " | ".join(heads) + " |", sep,
             "| share of tokens | " + " | ".join(f"{100 * b['share']:.1f}%" for b in first)
             + " |",
             "| B0's mean p(y) | " + " | ".join(fmt(b["p_y"], ".3f") for b in first) + " |"]
    for t, rows in t_rows.items():
        lines.append(f"| {'T+' if t == 'T' else t}'s mean p(y) | "
                     + " | ".join(fmt(b["teacher_p_y"], ".3f") for b in rows) + " |")
    for title, key, f in (("Q(y), the target's mass on the label", "q_y", ".3f"),
                          ("label pull Q(y) - p(y), relative to SFT's 1 - p(y)", "pull_vs_sft",
                           ".2f")):
        lines += ["", f"{title}:", "", "| method | teacher | " + " | ".join(heads) + " |",
                  "|" + "---|" * (len(heads) + 2)]
        for m, rows in buckets.items():
            t = {"T": "T+"}.get(teachers[m], teachers[m])
            lines.append(f"| {m} | {t} | " + " | ".join(fmt(b[key], f) for b in rows) + " |")
    return "\n".join(lines)


def measure(exp, made) -> tuple[dict[str, list[dict]], dict[str, str], int]:
    """(method -> `target_mass_by_confidence` buckets on B0's logits, method -> teacher name,
    number of held-out problems)."""
    from qtarget_jax.evaluate import load_source
    from qtarget_jax.problems import probes
    from qtarget_jax.targets import spec_from_dict
    from qtarget_jax.train.build import resolve_source
    if "new_test" not in made.paths:
        sys.exit("mass.py: the experiment has no new skill (data.new): nothing to measure")
    b0, tokenizer = load_source(resolve_source(made.b0))
    new = eval_examples(read_jsonl(made.paths["new_test"]))
    batches = probes.answer_batches(tokenizer, new, batch_size=exp.eval.batch_size)
    logits = {"B0": probes.answer_logits(b0, batches)}
    if made.teacher is not None:
        logits["T"] = probes.answer_logits(load_source(resolve_source(made.teacher))[0],
                                           batches)
    out, teachers = {}, {}
    for m in exp.methods:
        out[m.name] = probes.target_mass_by_confidence(
            batches, logits["B0"], spec_from_dict(dict(m.target)), logits.get(m.teacher), EDGES)
        teachers[m.name] = m.teacher
    return out, teachers, len(new)


def main(argv: list[str]) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value, as run.py takes them")
    args = p.parse_args(argv)
    quiet_without_tpu()
    from qtarget_jax.config import ConfigError
    try:
        exp = load_experiment(args.config, args.overrides)
        made = stage0(exp, lambda rec: print(json.dumps(rec), flush=True))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    buckets, teachers, n = measure(exp, made)
    text = markdown(buckets, teachers, n)
    os.makedirs(exp.out_dir, exist_ok=True)
    with open(os.path.join(exp.out_dir, "mass_by_confidence.json"), "w", encoding="utf-8") as f:
        json.dump({"edges": EDGES, "teachers": teachers, "buckets": buckets}, f, indent=1)
    with open(os.path.join(exp.out_dir, "mass_by_confidence.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
