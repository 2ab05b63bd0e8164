"""Target-SFT vs SFT and friends on SmolLM2-135M-Instruct with noisy synthetic demonstrations.

    .venv/bin/python experiments/run.py --config experiments/quick.yaml  # experiments/README.md

One process, methods run one after the other: every run starts from the same initial weights
and uses the training step of `qtarget_jax.train` (the `make train` code); a method's jitted
step is compiled once and reused for all its seeds (same shapes; TargetSpec is static). The
teacher for Target-SFT / distillation is SmolLM2 briefly fine-tuned on CLEAN demonstrations of
the same problems, saved as a Hugging Face folder under `teacher_dir` and reused when present;
methods may instead use the frozen initial model as teacher (`teacher: initial`).

Outputs (under `out_dir`): `runs.jsonl` (one line per (method, seed): metrics, wall time),
`summary.json`, `table.md` and `accuracy.png` (written by experiments/report.py), and
`eval_<method>_<seed>.jsonl` per-example outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx

from qtarget_jax.config import OptimSection, ScheduleSection
from qtarget_jax.data.chat import tokenize_conversation, to_training_example
from qtarget_jax.data.packing import build_rows, pack_bins
from qtarget_jax.data.records import row_to_conversation
from qtarget_jax.data.synthetic import generate as synth_generate
from qtarget_jax.evaluate import EvalExample, evaluate_model
from qtarget_jax.models.sharding import LOGICAL_RULES
from qtarget_jax.targets import spec_from_dict
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.state import init_state
from qtarget_jax.train.step import jit_train_step, logits_loss


@dataclasses.dataclass(frozen=True)
class Method:
    name: str               # row label in the table
    target: dict            # loss.target mapping ({preset: ..., knobs})
    teacher: str = "none"   # none | trained | initial (pi_ref / pi_T of the target)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: str = "smollm2"          # load_model source
    scan_layers: bool = True        # nnx.scan; unrolled layers step ~25% faster on CPU but
    #                                 compile longer (teacher methods: +10 s), no net gain
    n_train: int = 200              # distinct training problems (x phrasings rows)
    n_test: int = 50                # held-out problems (clean)
    phrasings: int = 2
    noise: float = 0.4              # fraction of corrupted training demonstrations
    data_seed: int = 0
    seq_len: int = 480              # packed row length; a longer example is an error
    batch_size: int = 2             # packed rows per step (about seq_len / 117 examples each)
    steps: int = 30
    lr: float = 5.0e-5
    warmup_steps: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_steps: int = 30         # fine-tuning of the teacher on clean demonstrations
    teacher_lr: float = 5.0e-5
    teacher_dir: str = "experiments/cache/teacher"
    eval_problems: int = 50         # first n of the test split
    eval_seq_len: int = 160         # rows of the held-out loss (one example each)
    max_new_tokens: int = 72
    eval_batch: int = 50            # prompts per decode call (x (1 + samples) rows)
    samples: int = 4                # Average@k: k sampled outputs per problem (0: greedy only)
    temperature: float = 0.7
    out_dir: str = "experiments/runs/quick"
    methods: tuple[Method, ...] = ()


def load_experiment(path: str, overrides: list[str]) -> ExperimentConfig:
    """YAML file + `key=value` overrides (YAML-parsed) -> ExperimentConfig; unknown keys raise."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        raw[key] = yaml.safe_load(value)
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(fields)}")
    methods = tuple(Method(**m) for m in raw.pop("methods", []))
    for m in methods:
        if m.teacher not in ("none", "trained", "initial"):
            raise ValueError(f"{path}: method {m.name}: teacher={m.teacher!r}, expected "
                             "none, trained or initial")
        if spec_from_dict(m.target).needs_teacher != (m.teacher != "none"):
            raise ValueError(f"{path}: method {m.name}: target {m.target} and teacher="
                             f"{m.teacher!r} disagree on needing a teacher")
    if "seeds" in raw:
        raw["seeds"] = tuple(raw["seeds"])
    return ExperimentConfig(**raw, methods=methods)


def tokenize_examples(tokenizer: Any, rows: list[dict], seq_len: int) -> list:
    """Chat rows -> TokenizedExamples (assistant tokens supervised); one longer than seq_len is
    an error naming the row."""
    out = []
    for row in rows:
        conv = row_to_conversation(row, row["id"])
        ids, mask = tokenize_conversation(tokenizer, conv, row["id"])
        out.append(to_training_example(ids, mask, seq_len, truncate=False, where=row["id"]))
    return out


def batches(examples: list, rows: int, seq_len: int, steps: int, seed: int):
    """`steps` batches of `rows` packed rows ([rows, seq_len] arrays of the data batch contract).

    Each epoch visits the examples in a fresh permutation (seeded by (seed, epoch)) and packs
    them first-fit into rows of seq_len tokens (qtarget_jax.data.packing), as `make train`
    does: each example is its own segment (attention and positions restart), and no padding
    row is computed. Yields (batch, number of examples in it).
    """
    lengths = np.array([len(e) for e in examples])
    bins: list[list[int]] = []
    epoch = 0
    while len(bins) < steps * rows:
        order = np.random.default_rng([seed, epoch]).permutation(len(examples))
        bins += pack_bins(lengths, order, seq_len)
        epoch += 1
    for s in range(steps):
        chosen = bins[s * rows:(s + 1) * rows]
        yield build_rows(examples, chosen, seq_len), sum(len(b) for b in chosen)


class Trainer:
    """Runs fine-tuning jobs from fixed initial weights, one compiled step per method."""

    def __init__(self, base: nnx.Module, cfg: ExperimentConfig):
        self.base, self.cfg = base, cfg
        self.mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1},
                                       devices=jax.devices()[:1])
        self.steps: dict[str, Any] = {}

    def train(self, key: str, target: dict, data, *, seed: int, steps: int, lr: float,
              teacher: nnx.Module | None) -> tuple[nnx.Module, list[float], int]:
        """Fine-tunes a copy of the base model; returns (model, per-step losses, examples
        seen)."""
        cfg = self.cfg
        spec = spec_from_dict(target)
        tx, schedule = make_optimizer(OptimSection(lr=lr, weight_decay=0.0),
                                      ScheduleSection(warmup_steps=cfg.warmup_steps), steps)
        built = init_state(self.base, tx, self.mesh, dict(LOGICAL_RULES), seed, teacher=teacher)
        rep = mesh_lib.replicated(self.mesh)
        step_key = f"{key}/{steps}/{lr}"
        if step_key not in self.steps:
            self.steps[step_key] = jit_train_step(
                built.shardings, mesh_lib.batch_sharding(self.mesh), rep,
                # Full-logits loss (train's loss.fused=false): the same math as the fused
                # default, and at this size on CPU the faster one (docs/performance.md).
                graphdef=built.graphdef, loss_fn=logits_loss(spec, "token"), tx=tx,
                schedule=schedule, microbatches=1)
        step_fn, state, losses, seen = self.steps[step_key], built.state, [], 0
        for batch, n in batches(data, cfg.batch_size, cfg.seq_len, steps, seed):
            state, metrics = step_fn(state, mesh_lib.global_batch(batch, self.mesh))
            losses.append(metrics["loss"])
            seen += n
        losses = [float(x) for x in jax.device_get(losses)]
        if not all(np.isfinite(losses)):
            raise FloatingPointError(f"{key} seed {seed}: non-finite loss {losses}")
        return nnx.merge(built.graphdef, state.params, state.rest), losses, seen


def eval_examples(rows: list[dict]) -> list[EvalExample]:
    return [EvalExample(r["id"], r["messages"][:-1], r["messages"][-1]["content"],
                        str(r["answer"])) for r in rows]


def run_eval(model, tokenizer, examples, cfg: ExperimentConfig, seed: int, path: str) -> dict:
    return evaluate_model(model, tokenizer, examples, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.eval_batch, num_samples=cfg.samples,
                          temperature=cfg.temperature, seed=seed, loss_seq_len=cfg.eval_seq_len,
                          out_path=path)


def get_teacher(trainer: Trainer, tokenizer, clean, cfg: ExperimentConfig, log) -> nnx.Module:
    """The clean-data teacher from `teacher_dir`, fine-tuning and saving it on first use."""
    from qtarget_jax.models.export import export_hf
    from qtarget_jax.models.loading import load_hf

    marker = os.path.join(cfg.teacher_dir, "config.json")
    if os.path.isfile(marker):
        log({"event": "teacher_loaded", "dir": cfg.teacher_dir})
        # The student's layer layout: the step merges teacher params with its graphdef.
        return load_hf(cfg.teacher_dir, param_dtype="float32", scan_layers=cfg.scan_layers)[0]
    t0 = time.perf_counter()
    teacher, losses, seen = trainer.train("teacher", {"preset": "sft"}, clean, seed=0,
                                          steps=cfg.teacher_steps, lr=cfg.teacher_lr,
                                          teacher=None)
    export_hf(teacher, teacher.cfg, cfg.teacher_dir, tokenizer=tokenizer)
    log({"event": "teacher_trained", "dir": cfg.teacher_dir, "examples_seen": seen,
         "first_loss": losses[0],
         "last_loss": losses[-1], "seconds": round(time.perf_counter() - t0, 1)})
    return teacher


def finished_runs(runs_path: str, cfg: ExperimentConfig) -> dict[tuple[str, int], dict]:
    """(method, seed) -> eval record of runs already in `runs_path` under this same config, so
    re-running the command resumes an interrupted experiment instead of repeating it."""
    if not os.path.isfile(runs_path):
        return {}
    same, done = False, {}
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))
    with open(runs_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["event"] == "start":
                same = rec["config"] == want
            elif rec["event"] == "eval" and same:
                done[(rec["method"], rec["seed"])] = rec
    return done


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--only", default=None, help="comma-separated method names to run")
    p.add_argument("overrides", nargs="*", help="key=value (YAML values)")
    args = p.parse_args(argv)
    cfg = load_experiment(args.config, args.overrides)
    os.makedirs(cfg.out_dir, exist_ok=True)
    runs_path = os.path.join(cfg.out_dir, "runs.jsonl")
    start = time.perf_counter()
    done = finished_runs(runs_path, cfg)

    def log(rec: dict) -> None:
        rec = {**rec, "elapsed_s": round(time.perf_counter() - start, 1)}
        print(json.dumps(rec), flush=True)
        with open(runs_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    from qtarget_jax.models.loading import load_model
    base, _, tokenizer = load_model(cfg.model, param_dtype="float32", scan_layers=cfg.scan_layers)
    noisy = synth_generate(cfg.n_train, cfg.n_test, seed=cfg.data_seed, noise=cfg.noise,
                           phrasings=cfg.phrasings)
    clean = synth_generate(cfg.n_train, cfg.n_test, seed=cfg.data_seed, noise=0.0,
                           phrasings=cfg.phrasings)
    assert clean["test"] == noisy["test"]
    noise_frac = float(np.mean([r["noise"] is not None for r in noisy["train"]]))
    log({"event": "start", "config": dataclasses.asdict(cfg), "noisy_fraction": noise_frac,
         "devices": str(jax.devices()[0]), "resumed_runs": len(done)})
    train_noisy = tokenize_examples(tokenizer, noisy["train"], cfg.seq_len)
    train_clean = tokenize_examples(tokenizer, clean["train"], cfg.seq_len)
    examples = eval_examples(noisy["test"][:cfg.eval_problems])
    trainer = Trainer(base, cfg)

    if ("before fine-tuning", 0) in done:
        log(done[("before fine-tuning", 0)])
    else:
        t0 = time.perf_counter()
        before = run_eval(base, tokenizer, examples, cfg, 0, os.path.join(cfg.out_dir,
                                                                          "eval_before.jsonl"))
        log({"event": "eval", "method": "before fine-tuning", "seed": 0, **before,
             "seconds": round(time.perf_counter() - t0, 1)})
    methods = [m for m in cfg.methods
               if args.only is None or m.name in args.only.split(",")]
    teacher = None
    if any(m.teacher == "trained" for m in methods):
        teacher = get_teacher(trainer, tokenizer, train_clean, cfg, log)
        if ("teacher (clean SFT)", 0) in done:
            log(done[("teacher (clean SFT)", 0)])
        else:
            t0 = time.perf_counter()
            ev = run_eval(teacher, tokenizer, examples, cfg, 0,
                          os.path.join(cfg.out_dir, "eval_teacher.jsonl"))
            log({"event": "eval", "method": "teacher (clean SFT)", "seed": 0, **ev,
                 "seconds": round(time.perf_counter() - t0, 1)})
    # Seeds outside, methods inside: a run stopped early still has every method at the first
    # seeds. Each method's step is compiled at its first seed and reused afterwards.
    for seed in cfg.seeds:
        for m in methods:
            if (m.name, seed) in done:
                log({**done[(m.name, seed)], "resumed": True})
                continue
            t0 = time.perf_counter()
            teach = {"none": None, "trained": teacher, "initial": base}[m.teacher]
            model, losses, seen = trainer.train(m.name, m.target, train_noisy, seed=seed,
                                                steps=cfg.steps, lr=cfg.lr, teacher=teach)
            t_train = time.perf_counter() - t0
            ev = run_eval(model, tokenizer, examples, cfg, seed,
                          os.path.join(cfg.out_dir, f"eval_{m.name}_{seed}.jsonl"))
            log({"event": "eval", "method": m.name, "seed": seed, "target": m.target,
                 "teacher": m.teacher, **ev, "examples_seen": seen,
                 "train_loss_first": losses[0],
                 "train_loss_last": losses[-1], "train_s": round(t_train, 1),
                 "seconds": round(time.perf_counter() - t0, 1)})
    log({"event": "done", "wall_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main(sys.argv[1:])
