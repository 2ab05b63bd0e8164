"""Does Target-SFT protect a competent model from noisy, off-policy demonstrations
(regime.yaml), and does it make it better when the demonstrations carry a skill it lacks
(learn.yaml)?

    .venv/bin/python experiments/run.py --config experiments/regime.yaml   # docs/results.md
    .venv/bin/python experiments/report.py experiments/runs/regime
    .venv/bin/python experiments/run.py --config experiments/learn.yaml    # experiments/README.md

Stage 0 (cached under `cache_dir`, each folder beside the config that made it in
`made_by.json`; another config's folder is refused, see `claim`): the synthetic sets (JSONL,
then tfds folders written by the data package's `prepare`), the base B0 = `base_source` after
clean SFT on set A (one solution template, plus a second skill), the teacher T = B0 after
further clean SFT, and B0's own answers to off-task prompts. Stage 1: every method x seed
fine-tunes B0 for `stage1.epochs` epochs on set B (disjoint problems, other templates, a
fraction corrupted). With `data.new` (learn.yaml), set B and the teacher's set are problems
of a skill B0 lacks (more operations), drawn from a stream of their own, and held-out problems
of that skill are scored too. With `conditions`, stage 1 runs once per condition (its own
`noise` on the same problems of set B) after one shared stage 0; with `teacher_margin`, a
teacher that does not beat B0 by that many points stops the run before stage 1.

The experiment config is read by `qtarget_jax.config.load_dataclass` (dotted overrides,
types, unknown keys). Every training run is `qtarget_jax.train.loop.run` on a `TrainConfig`
from `qtarget_jax.config.load_config(train_job, overrides)`: the data pipeline, step,
optimizer and teacher handling are the library's; runs of the same shapes share one compiled
step in this process. The per-epoch metrics are `probes` passed to the loop
(`qtarget_jax.problems.probes`); accuracy and Average@k are `qtarget_jax.problems.solve`.

Outputs (`out_dir`): `runs.jsonl` (one `model` line per stage-0 model, one `run` line per
(condition, method, seed) with per-epoch metrics, final metrics and timings),
`runs/[<condition>/]<method>_<seed>/` (the loop's config.yaml and metrics.jsonl),
`eval_<name>.jsonl` per-problem outputs. Re-running the same command resumes: finished runs of
the same config are kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import hashlib
import os
import re
import shutil
import sys
import time
from typing import Literal


from qtarget_jax.data import synthetic
from qtarget_jax.libtpu_env import quiet_without_tpu

TRAINING_SETS = ("a", "b", "teacher")   # written as tfds datasets too


@dataclasses.dataclass(frozen=True)
class NewSkill:
    """A skill B0 lacks: problems of `ops` (fewest, most) operations, drawn from a stream of
    their own, `Random(f"{seed}-new")`, held-out first, then set B, then the teacher's (so
    neither training set changes the held-out problems). 2-3-op sets never hold them (another
    number of operations is another problem)."""
    ops: tuple[int, ...] = (4, 5)
    n_test: int = 80           # held-out problems of the new skill (clean, all templates)
    n_b: int = 48              # stage 1 problems (b_templates)
    n_teacher: int = 512       # the teacher's clean problems (t_templates)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The synthetic sets (all problems distinct, drawn from one stream of `seed`; with `new`,
    set B and the teacher's set from the new skill's stream instead)."""
    seed: int = 0
    n_test: int = 40           # held-out problems (clean); one problem = 100 / n_test points
    n_a: int = 96              # stage 0 arithmetic problems (a_templates)
    n_skill: int = 32          # stage 0 second-skill rows ("largest number")
    n_skill_test: int = 40     # second-skill held-out rows
    n_b: int = 24              # stage 1 problems (b_templates), a fraction `noise` corrupted
    n_teacher: int = 96        # extra clean problems for the teacher (t_templates)
    noise: float | None = 0.4  # share of set B corrupted; null when `conditions` set it
    a_templates: tuple[int, ...] = (0,)
    b_templates: tuple[int, ...] = (1, 2)
    t_templates: tuple[int, ...] = (0,)
    new: NewSkill | None = None  # set: set B and the teacher's set are of this skill (n_b and
                                 # n_teacher above must be 0)


@dataclasses.dataclass(frozen=True)
class Condition:
    """One arm of stage 1: the same problems of set B, a share `noise` of them corrupted."""
    name: str                  # in run folders, eval files and records ("condition")
    noise: float


@dataclasses.dataclass(frozen=True)
class Stage:
    """A fine-tuning stage: `epochs` over its set; `overrides` are load_config key=value."""
    epochs: int = 1
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    target: dict
    teacher: Literal["none", "T", "B0"] = "none"  # T: the clean teacher; B0: the frozen base


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    samples: int = 4                 # Average@k at `temperature`
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 40             # prompts per decode call
    skill_max_new_tokens: int = 24
    offtask_max_new_tokens: int = 48


@dataclasses.dataclass(frozen=True)
class Experiment:
    out_dir: str
    cache_dir: str
    train_job: str                   # TrainConfig job file every run starts from
    base_source: str = "smollm2"     # model.source of stage 0
    data: DataSpec = DataSpec()
    base: Stage | None = Stage(2)    # null: B0 is base_source itself (no stage-0 SFT)
    teacher: Stage = Stage(1)
    stage1: Stage = Stage(3)
    seeds: tuple[int, ...] = (0, 1, 2)
    eval: EvalSpec = EvalSpec()
    offtask_prompts: str = "experiments/offtask_prompts.jsonl"
    methods: tuple[Method, ...] = ()
    conditions: tuple[Condition, ...] = ()  # none: one arm with data.noise
    teacher_margin: float | None = None     # points of Average@k (of the new skill with
                                            # data.new) T must gain over B0, else stop


def load_experiment(path: str, overrides: list[str]) -> Experiment:
    """The experiment YAML with dotted `key=value` overrides (`data.noise=0.2`), loaded and
    checked by `qtarget_jax.config.load_dataclass` (unknown keys with a did-you-mean, types);
    then each method's target and teacher must agree. Errors are ConfigError, one line."""
    from qtarget_jax.config import ConfigError, load_dataclass
    from qtarget_jax.targets import spec_from_dict
    exp = load_dataclass(Experiment, path, tuple(overrides))
    if not exp.methods:
        raise ConfigError(f"{path}: no methods")
    names = [m.name for m in exp.methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: methods: a name is used twice in {names}")
    for m in exp.methods:
        try:
            needs = spec_from_dict(dict(m.target)).needs_teacher
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{path}: method {m.name}: target={m.target!r}: {e}") from None
        if needs != (m.teacher != "none"):
            raise ConfigError(f"{path}: method {m.name}: target {m.target} and teacher="
                              f"{m.teacher!r} disagree on needing a teacher")
    check_design(exp, path)
    return exp


def check_design(exp: Experiment, path: str) -> None:
    """Conditions, the new skill and the teacher margin agree with the rest; ConfigError."""
    from qtarget_jax.config import ConfigError
    d, names = exp.data, [c.name for c in exp.conditions]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: conditions: a name is used twice in {names}")
    for c in exp.conditions:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", c.name) or not 0.0 <= c.noise <= 1.0:
            raise ConfigError(f"{path}: condition {c.name!r}: the name must be letters, digits, "
                              f"'_.-' and noise in [0, 1] (got {c.noise})")
    if exp.conditions and d.noise is not None:
        raise ConfigError(f"{path}: data.noise={d.noise} with conditions: each condition sets "
                          "its noise; set data.noise to null")
    if not exp.conditions and d.noise is None:
        raise ConfigError(f"{path}: data.noise is null: set it, or give conditions")
    if d.new is not None:
        try:
            synthetic.check_ops(d.new.ops)
        except ValueError as e:
            raise ConfigError(f"{path}: data.new.ops: {e}") from None
        if d.n_b or d.n_teacher:
            raise ConfigError(f"{path}: data.new draws set B and the teacher's set: set "
                              f"data.n_b and data.n_teacher to 0 (got {d.n_b}, {d.n_teacher})")
    if exp.teacher_margin is not None and not any(m.teacher == "T" for m in exp.methods):
        raise ConfigError(f"{path}: teacher_margin is set but no method uses the teacher T")


def conditions_of(exp: Experiment) -> list[tuple[str | None, DataSpec]]:
    """(condition name, its data spec) per arm of stage 1; [(None, data)] without conditions."""
    if not exp.conditions:
        return [(None, exp.data)]
    return [(c.name, dataclasses.replace(exp.data, noise=c.noise)) for c in exp.conditions]


def select_methods(exp: Experiment, only: str | None) -> list[Method]:
    """The methods named in `--only` (comma-separated; None: all); an unknown name is a
    ConfigError naming the closest method."""
    from qtarget_jax.config import ConfigError, suggest
    if only is None:
        return list(exp.methods)
    known = [m.name for m in exp.methods]
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    for name in wanted:
        if name not in known:
            raise ConfigError(f"--only {name!r}: no such method" + suggest(name, known))
    return [m for m in exp.methods if m.name in wanted]


# ----------------------------------------------------------------------------- data


def draw_sets(spec: DataSpec) -> dict[str, list]:
    """The problems of each arithmetic set: `test`, `a`, `b`, `teacher` in that order from one
    stream of `seed` (a longer draw extends a shorter one, so test and a do not depend on the
    later sizes); with `new`, `new_test`, `b` and `teacher` from the new skill's stream."""
    sizes = (spec.n_test, spec.n_a, spec.n_b, spec.n_teacher)
    problems = synthetic.draw_problems(sum(sizes), spec.seed)
    cut = [sum(sizes[:k]) for k in range(5)]
    out = {name: problems[cut[k]:cut[k + 1]]
           for k, name in enumerate(("test", "a", "b", "teacher"))}
    if spec.new is not None:
        n = spec.new
        new = synthetic.draw_problems(n.n_test + n.n_b + n.n_teacher, f"{spec.seed}-new", n.ops)
        out["new_test"], out["b"], out["teacher"] = (
            new[:n.n_test], new[n.n_test:n.n_test + n.n_b], new[n.n_test + n.n_b:])
    return out


def make_sets(spec: DataSpec) -> dict[str, list[dict]]:
    """The experiment's rows: `a` (stage 0: arithmetic in a_templates + the second skill),
    `b` (stage 1: noisy, b_templates; corrupted rows carry `clean`; only when spec.noise is
    set), `teacher` (clean, t_templates), `test` (held-out arithmetic, clean), `skill_test`
    (held-out second skill), `new_test` (held-out new skill, clean; with `new`)."""
    problems, seed = draw_sets(spec), spec.seed
    sets = {
        "test": synthetic.write_problems(problems["test"], "test", seed),
        "a": (synthetic.write_problems(problems["a"], "a", seed, templates=spec.a_templates)
              + synthetic.largest_rows(spec.n_skill, "skill", seed)),
        "teacher": synthetic.write_problems(problems["teacher"], "teacher", seed,
                                            templates=spec.t_templates),
        "skill_test": synthetic.largest_rows(spec.n_skill_test, "skill_test", seed),
    }
    if "new_test" in problems:
        sets["new_test"] = synthetic.write_problems(problems["new_test"], "new_test", seed)
    if spec.noise is not None:
        sets["b"] = synthetic.write_problems(problems["b"], "b", seed, noise=spec.noise,
                                             templates=spec.b_templates)
    return sets


def prepare_sets(sets: dict[str, list[dict]], folder: str, test: str) -> dict[str, str]:
    """Writes `sets` as JSONL under `folder` and its non-empty training sets as tfds datasets
    (`regime_<set>`, splits train and test = the JSONL `test`) with the data package's
    `prepare`; reuses them when present. Returns {name: path}: JSONL files and `tfds_<set>`
    dataset folders."""
    from qtarget_jax.data.builder import prepare_dataset
    paths = {name: os.path.join(folder, f"{name}.jsonl") for name in sets}
    for name, rows in sets.items():
        if not os.path.isfile(paths[name]):
            synthetic.write_jsonl(rows, paths[name])
    for name in TRAINING_SETS:
        if not sets.get(name):      # no stage-0 set when base is null
            continue
        tfds_dir = os.path.join(folder, "tfds")
        version = os.path.join(tfds_dir, "jsonl_sft", f"regime_{name}", "1.0.0")
        if not os.path.isdir(version):
            version, _ = prepare_dataset({"train": [paths[name]], "test": [test]},
                                         tfds_dir, f"regime_{name}")
        paths[f"tfds_{name}"] = version
    return paths


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_examples(rows: list[dict]):
    from qtarget_jax.problems import EvalExample
    return [EvalExample(r["id"], r["messages"][:-1], r["messages"][-1]["content"],
                        str(r["answer"])) for r in rows]


def memorisation_pairs(rows: list[dict]) -> list[tuple]:
    """(id, prompt messages, shown response, clean response) of the corrupted rows."""
    return [(r["id"], r["messages"][:-1], r["messages"][-1]["content"], r["clean"])
            for r in rows if r.get("noise")]


# ----------------------------------------------------------------------------- runs


def steps_per_epoch(n_rows: int, batch_size: int, where: str) -> int:
    """Optimizer steps of one epoch; rows must fill whole batches so epochs stay aligned
    (data.pack=false: one example per row)."""
    if n_rows % batch_size:
        raise ValueError(f"{where}: {n_rows} rows do not fill batches of {batch_size}: "
                         "choose sizes so every epoch ends on a step")
    return n_rows // batch_size


def batch_size_of(exp: Experiment, overrides: tuple[str, ...]) -> int:
    from qtarget_jax.config import load_config
    cfg = load_config(exp.train_job, tuple(overrides)).config
    if cfg.data.pack:
        raise ValueError(f"{exp.train_job}: data.pack must be false (epochs are counted in "
                         "examples)")
    return cfg.data.batch_size


def stage_config(exp: Experiment, stage: Stage, source: str, data: str, n_rows: int,
                 run_dir: str, extra: list[str]):
    """(LoadedConfig, steps) of fine-tuning `source` on the tfds folder `data` for
    `stage.epochs` epochs, evaluated (probes) once per epoch."""
    from qtarget_jax.config import load_config
    spe = steps_per_epoch(n_rows, batch_size_of(exp, stage.overrides), run_dir)
    steps = stage.epochs * spe
    loaded = load_config(exp.train_job, (*stage.overrides, f"model.source={source}",
                                         f"data.path={data}", f"run.dir={run_dir}",
                                         f"run.steps={steps}", f"eval.every_steps={spe}",
                                         *extra))
    return loaded, steps


def finetune(loaded, steps: int, probes=None) -> dict:
    """`qtarget_jax.train.loop.run(loaded)`, which must reach `steps`; returns its summary."""
    from qtarget_jax.train.loop import run
    summary = run(loaded, probes=probes)
    if summary["final_step"] != steps:
        raise RuntimeError(f"{loaded.config.run.dir}: stopped at step {summary['final_step']} "
                           f"of {steps}")
    return summary


# ----------------------------------------------------------------------------- stage-0 caches

STAMP = "made_by.json"  # beside each stage-0 product: the config that made it


def data_key(spec: DataSpec) -> dict:
    """The cache key of sets made from `spec`: its fields, less those that are null (`noise`
    of the shared sets, `new` without a new skill: regime.yaml's key is unchanged by them)."""
    fields = json.loads(json.dumps(dataclasses.asdict(spec)))
    return {"data": {k: v for k, v in fields.items() if v is not None}}


def files_key(paths: dict[str, str], names: tuple[str, ...]) -> dict:
    """{file name: sha256} of the JSONL sets `names`: the key of a model trained on them, so a
    model depends on the rows it saw, not on the spec of sets it never read."""
    out = {}
    for name in names:
        with open(paths[name], "rb") as f:
            out[os.path.basename(paths[name])] = hashlib.sha256(f.read()).hexdigest()
    return out


def made_by(loaded, **upstream) -> dict:
    """The cache key of a stage-0 model: its resolved TrainConfig less the paths (run.dir,
    data.path, model.source and teacher, which live under cache_dir), plus the keys of the
    products those paths hold (`upstream`)."""
    from qtarget_jax.config import to_dict
    cfg = to_dict(loaded.config)
    cfg["run"].pop("dir")
    cfg["data"].pop("path")
    for key in ("source", "teacher"):
        cfg["model"].pop(key)
    return json.loads(json.dumps({"train": cfg, **upstream}))


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def first_difference(old, new, where: str = "") -> str:
    """The first dotted key at which two JSON-like values differ, with both values (`absent`
    for a key one of them lacks)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            a, b = old.get(k, ABSENT), new.get(k, ABSENT)
            if a != b:
                return first_difference(a, b, f"{where}{k}.")
    return f"{where.rstrip('.') or '<root>'}: {old!r} then, {new!r} now"


def claim(folder: str, key: dict, done: str | None = None) -> bool:
    """Whether `folder` holds a finished product (`done`, a path inside it) of the config
    `key`. A folder made by another config, or by one not recorded, is a ConfigError in one
    line (stale sets or models are never reused); an absent folder is created and stamped,
    and False returned (make it)."""
    from qtarget_jax.config import ConfigError
    stamp = os.path.join(folder, STAMP)
    if os.path.isdir(folder) and os.listdir(folder):
        old = read_json(stamp) if os.path.isfile(stamp) else None
        if old != key:
            why = ("has no " + STAMP + " (made before caches were keyed)" if old is None
                   else "was made by another config (" + first_difference(old, key) + ")")
            raise ConfigError(f"{folder} {why}: delete it to remake it, or set another "
                              "cache_dir")
        return done is None or os.path.exists(os.path.join(folder, done))
    os.makedirs(folder, exist_ok=True)
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(key, f, indent=1, sort_keys=True)
    return False


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Evaluator:
    """The experiment's metrics of one model, all through the library:
    per epoch (cheap, teacher-forced, `problems.probes`): answer-token accuracy on held-out
    references, memorisation share at the corrupted positions of set B, KL(B0 || model) on
    B0's answers to off-task prompts; with a new skill also its answer-token accuracy and,
    per method, where the method's Q-target puts its mass on those tokens (gamma, p_y, Q(y),
    the teacher's p(y): `probes.target_mass`); at the end (generation, `problems.solve`):
    held-out greedy accuracy and Average@k at the experiment's temperature (of the new skill
    with one, the old skill greedy only), second-skill accuracy."""

    def __init__(self, exp: Experiment, paths: dict[str, str], tokenizer, b0_model):
        from qtarget_jax.generate import SamplingConfig, generate
        from qtarget_jax.problems import probes
        self.exp, self.tokenizer = exp, tokenizer
        self.test = eval_examples(read_jsonl(paths["test"]))
        self.skill = eval_examples(read_jsonl(paths["skill_test"]))
        self.new = (eval_examples(read_jsonl(paths["new_test"])) if "new_test" in paths
                    else None)
        self.new_batches = (None if self.new is None else probes.answer_batches(
            tokenizer, self.new, batch_size=exp.eval.batch_size))
        self.answer_logits: dict[str, list] = {}   # teacher name -> logits at new answers
        offtask = read_jsonl(exp.offtask_prompts)
        prompts = [r["messages"] for r in offtask]
        answers = generate(b0_model, tokenizer, prompts,
                           SamplingConfig(max_new_tokens=exp.eval.offtask_max_new_tokens),
                           names=[r["id"] for r in offtask])
        self.offtask = [{"id": r["id"], "prompt": p, "b0_answer": g.text}
                        for r, p, g in zip(offtask, prompts, answers)]
        self.reference = probes.reference_logprobs(b0_model, tokenizer, prompts,
                                                   [g.text for g in answers],
                                                   batch_size=exp.eval.batch_size)
        # Per set of corrupted rows (one per condition): the three probes' rows tokenised and
        # packed once, run as one forward per epoch.
        self.epoch_probes: dict[tuple[str, ...], probes.EpochProbes] = {}

    def add_teacher(self, name: str, model) -> None:
        """Keeps `model`'s logits at the new skill's answer tokens (frozen: computed once)."""
        from qtarget_jax.problems import probes
        if self.new_batches:
            self.answer_logits[name] = probes.answer_logits(model, self.new_batches)

    def memorisation(self, model, pairs: list[tuple]) -> dict[str, float]:
        from qtarget_jax.problems import probes
        if not pairs:
            return {}
        return probes.memorisation(model, self.tokenizer, pairs,
                                   batch_size=self.exp.eval.batch_size)

    def per_epoch(self, model, pairs: list[tuple], method: Method | None = None
                  ) -> dict[str, float]:
        """answer-token accuracy, memorisation of `pairs` (when any) and KL from B0 of
        `model` (`problems.probes.EpochProbes`: the values of answer_token_accuracy,
        memorisation and kl_from_reference, in one packed forward); with a new skill also its
        answer-token accuracy (`new_`) and `method`'s target mass there."""
        from qtarget_jax.problems import probes
        key = tuple(p[0] for p in pairs)
        if key not in self.epoch_probes:
            self.epoch_probes[key] = probes.EpochProbes(self.tokenizer, self.test,
                                                        list(pairs) or None, self.reference)
        out = self.epoch_probes[key](model)
        if self.new_batches:
            logits = probes.answer_logits(model, self.new_batches)
            out.update({f"new_{k}": v for k, v in
                        probes.answer_hits(self.new_batches, logits).items()})
            if method is not None:
                out.update(self.mass(logits, method))
        return out

    def mass(self, logits: list, method: Method) -> dict[str, float]:
        """`probes.target_mass` of `method` at the new skill's answer tokens, `new_`-named."""
        from qtarget_jax.problems import probes
        from qtarget_jax.targets import spec_from_dict
        got = probes.target_mass(self.new_batches, logits, spec_from_dict(dict(method.target)),
                                 self.answer_logits.get(method.teacher))
        got["residual_y"] = got["q_y"] - got["gamma"]    # (1 - gamma) pi_tilde(y)
        return {f"new_{k}": v for k, v in got.items()}

    def final(self, model, seed: int, out_prefix: str | None) -> dict[str, float]:
        from qtarget_jax.problems import solve
        e = self.exp.eval
        path = lambda suffix: out_prefix and f"{out_prefix}{suffix}.jsonl"
        sampled, prefix = (self.test, "") if self.new is None else (self.new, "new_")
        out = solve(model, self.tokenizer, sampled, max_new_tokens=e.max_new_tokens,
                    batch_size=e.batch_size, num_samples=e.samples, temperature=e.temperature,
                    seed=seed, out_path=path(""), prefix=prefix)
        if self.new is not None:      # the old skill: greedy only
            out.update(solve(model, self.tokenizer, self.test, max_new_tokens=e.max_new_tokens,
                             batch_size=e.batch_size, seed=seed, out_path=path("_old"),
                             prefix=""))
        skill = solve(model, self.tokenizer, self.skill, max_new_tokens=e.skill_max_new_tokens,
                      batch_size=e.batch_size, seed=seed, out_path=path("_skill"), prefix="")
        out["skill_accuracy"] = skill["accuracy"]
        return out


def epoch_probes(evaluator: Evaluator, spe: int, steps: int, seed: int, out_prefix: str,
                 record: list, at_zero: dict | None, pairs: list[tuple], method: Method):
    """The `probes` callback of a stage-1 run: per-epoch metrics at every evaluation (step 0:
    `at_zero`, B0's, when given, as every run starts from B0, plus the method's target mass at
    B0's logits), generation metrics at the end; each result also appended to `record` as
    {"epoch", "step", ...}."""
    def probes(model, step: int) -> dict[str, float]:
        if step == 0 and at_zero is not None:
            out = dict(at_zero)
            if "B0" in evaluator.answer_logits:
                out.update(evaluator.mass(evaluator.answer_logits["B0"], method))
        else:
            out = evaluator.per_epoch(model, pairs, method)
            if step == steps:
                t0 = time.perf_counter()
                out.update(evaluator.final(model, seed, out_prefix))
                out["final_eval_s"] = time.perf_counter() - t0
        record.append({"epoch": step / spe, "step": step, **out})
        return out
    return probes


def finished(runs_path: str, exp: Experiment) -> dict[tuple, dict]:
    """(condition, name, seed) -> record of the runs already in `runs_path` under this same
    config (condition None for stage-0 models and without conditions)."""
    if not os.path.isfile(runs_path):
        return {}
    want, same, done = json.loads(json.dumps(dataclasses.asdict(exp))), False, {}
    for rec in read_jsonl(runs_path):
        if rec["event"] == "start":
            same = rec["config"] == want
        elif rec["event"] in ("model", "run") and same:
            done[(rec.get("condition"), rec["name"], rec["seed"])] = rec
    return done


# ----------------------------------------------------------------------------- the stages


@dataclasses.dataclass
class Stage0:
    """What stage 0 made: the shared sets' paths, per condition its set B's paths, B0's and
    T's sources (T's None when no method uses it)."""
    paths: dict[str, str]
    arms: dict[str | None, dict[str, str]]
    b0: str
    teacher: str | None


def stage0(exp: Experiment, log) -> Stage0:
    """The sets, B0 and T, each cached under cache_dir beside the key of what made it
    (`claim`): a changed config is refused, never served stale. The shared sets (`data/`)
    are keyed by the data spec (less the noise when conditions set it), a condition's set B
    (`data_<condition>/`; in `data/` without conditions) by its spec with its noise, and a
    model by its TrainConfig and the rows it was trained on (`files_key`), so a new condition
    or noise never retrains B0 or T."""
    arms = conditions_of(exp)
    data_dir = os.path.join(exp.cache_dir, "data")
    shared_spec = exp.data if arms[0][0] is None else dataclasses.replace(exp.data, noise=None)
    claim(data_dir, data_key(shared_spec))
    paths = prepare_sets(make_sets(shared_spec), data_dir, os.path.join(data_dir, "test.jsonl"))
    arm_paths = {}
    for name, spec in arms:
        if name is None:
            arm_paths[name] = paths
            continue
        folder = os.path.join(exp.cache_dir, f"data_{name}")
        claim(folder, data_key(spec))
        arm_paths[name] = prepare_sets({"b": make_sets(spec)["b"]}, folder, paths["test"])
    b0_dir, b0_key, todo = exp.base_source, {"source": exp.base_source}, []
    if exp.base is not None:
        b0_dir = os.path.join(exp.cache_dir, "b0")
        loaded, steps = stage_config(exp, exp.base, exp.base_source, paths["tfds_a"],
                                     len(read_jsonl(paths["a"])), b0_dir,
                                     ["checkpoint.export_hf=true"])
        b0_key = made_by(loaded, source=exp.base_source, data=files_key(paths, ("a", "test")))
        todo.append(("B0", loaded, steps, b0_key))
    t_dir = None
    if any(m.teacher == "T" for m in exp.methods):
        t_dir = os.path.join(exp.cache_dir, "teacher")
        loaded, steps = stage_config(exp, exp.teacher, b0_dir, paths["tfds_teacher"],
                                     len(read_jsonl(paths["teacher"])), t_dir,
                                     ["checkpoint.export_hf=true"])
        todo.append(("T", loaded, steps,
                     made_by(loaded, b0=b0_key, data=files_key(paths, ("teacher", "test")))))
    for name, loaded, steps, key in todo:
        if claim(loaded.config.run.dir, key, done=os.path.join("hf", "config.json")):
            continue
        t0 = time.perf_counter()  # a killed attempt restarts from step 1, records too
        summary = finetune(loaded, steps)
        log({"event": "stage0", "name": name, "steps": steps, "last": summary["last"],
             "seconds": round(time.perf_counter() - t0, 1)})
    return Stage0(paths, arm_paths, b0_dir, t_dir)


def evaluate_models(exp: Experiment, made: Stage0, done: dict, log) -> tuple[Evaluator, dict]:
    """The Evaluator (B0's off-task answers: `offtask_b0.jsonl`) and the `model` records of B0
    and T (resumed from `done` when there); with conditions, each model's memorisation per
    condition is in its record's `by_condition`."""
    from qtarget_jax.evaluate import load_source
    from qtarget_jax.train.build import resolve_source
    b0, tokenizer = load_source(resolve_source(made.b0))
    evaluator = Evaluator(exp, made.paths, tokenizer, b0)
    with open(os.path.join(exp.out_dir, "offtask_b0.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in evaluator.offtask)
    pairs = {name: memorisation_pairs(read_jsonl(p["b"])) for name, p in made.arms.items()}
    models = {}
    for name, source in (("B0", None), ("T", made.teacher)):
        if name == "T" and source is None:
            continue
        rec, model = done.get((None, name, 0)), None
        if rec is None or evaluator.new_batches:     # a teacher's logits are kept once
            model = b0 if source is None else load_source(resolve_source(source))[0]
            evaluator.add_teacher(name, model)
        if rec is None:
            t1 = time.perf_counter()
            rec = {"event": "model", "name": name, "seed": 0,
                   "per_epoch": evaluator.per_epoch(model, pairs.get(None, [])),
                   **evaluator.final(model, 0, os.path.join(exp.out_dir, f"eval_{name}"))}
            if exp.conditions:
                rec["by_condition"] = {c: evaluator.memorisation(model, p)
                                       for c, p in pairs.items()}
            rec["seconds"] = round(time.perf_counter() - t1, 1)
        log(rec)
        models[name] = rec
        del model
    return evaluator, models


def teacher_check(exp: Experiment, models: dict) -> dict:
    """The `teacher_check` record: T against B0 on held-out Average@k (of the new skill with
    one), and with `teacher_margin` whether T gains that many points."""
    k = exp.eval.samples
    key = ("new_" if exp.data.new else "") + (f"avg@{k}" if k else "accuracy")
    rec = {"event": "teacher_check", "metric": key, "B0": models["B0"][key],
           "T": models["T"][key], "teacher_beats_b0": models["T"][key] > models["B0"][key]}
    if exp.teacher_margin is not None:
        rec["margin"] = exp.teacher_margin
        rec["passed"] = 100 * (rec["T"] - rec["B0"]) >= exp.teacher_margin
    return rec


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--only", default=None, help="comma-separated method names to run")
    p.add_argument("overrides", nargs="*",
                   help="dotted key=value, YAML values (data.noise=0.2, seeds=[0])")
    args = p.parse_args(argv)
    quiet_without_tpu()  # libtpu installed, no TPU here: no libtpu errors
    from qtarget_jax.config import ConfigError
    try:
        exp = load_experiment(args.config, args.overrides)
        methods = select_methods(exp, args.only)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    os.makedirs(exp.out_dir, exist_ok=True)
    runs_path = os.path.join(exp.out_dir, "runs.jsonl")
    start = time.perf_counter()
    done = finished(runs_path, exp)

    def log(rec: dict) -> None:
        rec = {**rec, "elapsed_s": round(time.perf_counter() - start, 1)}
        print(json.dumps(rec), flush=True)
        with open(runs_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    import jax
    from qtarget_jax.train.compile_cache import enable_persistent_cache
    # Runs of the same shapes share their jitted steps in this process (train/setup.py); the
    # persistent cache keeps compiled programs across processes.
    enable_persistent_cache()
    log({"event": "start", "config": dataclasses.asdict(exp), "devices": str(jax.devices()),
         "resumed": len(done)})
    try:
        made = stage0(exp, log)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    evaluator, models = evaluate_models(exp, made, done, log)
    if made.teacher is not None:  # a teacher weaker than the base tests nothing: say so
        check = teacher_check(exp, models)
        log(check)
        if check.get("passed") is False:
            sys.exit(f"teacher check failed: T's {check['metric']} {100 * check['T']:.1f}% is "
                     f"{100 * (check['T'] - check['B0']):.1f} points above B0's "
                     f"{100 * check['B0']:.1f}%, teacher_margin asks for {check['margin']:g}: "
                     "a weak teacher tests nothing (train it longer, or on more problems)")
    stage1(exp, methods, made, evaluator, models["B0"], done, log)
    log({"event": "done", "wall_s": round(time.perf_counter() - start, 1)})


def stage1(exp: Experiment, methods: list[Method], made: Stage0, evaluator: Evaluator,
           b0: dict, done: dict, log) -> None:
    """Every (seed, condition, method) run from B0 on its condition's set B. Seeds outer,
    methods inner: a run cut short has every condition and method at early seeds."""
    for seed in exp.seeds:
        for cond, paths in made.arms.items():
            n_b = len(read_jsonl(paths["b"]))
            spe = steps_per_epoch(n_b, batch_size_of(exp, exp.stage1.overrides), "stage1")
            pairs = memorisation_pairs(read_jsonl(paths["b"]))
            at_zero = {**b0["per_epoch"], **b0.get("by_condition", {}).get(cond, {})}
            tag = {} if cond is None else {"condition": cond}
            for m in methods:
                if (cond, m.name, seed) in done:
                    log({**done[(cond, m.name, seed)], "resumed": True})
                    continue
                where = f"{m.name}_{seed}" if cond is None else os.path.join(cond,
                                                                             f"{m.name}_{seed}")
                run_dir = os.path.join(exp.out_dir, "runs", where)
                shutil.rmtree(run_dir, ignore_errors=True)   # a cut run starts over
                record: list[dict] = []
                prefix = os.path.join(exp.out_dir, "eval_" + where.replace(os.sep, "_"))
                probes = epoch_probes(evaluator, spe, exp.stage1.epochs * spe, seed, prefix,
                                      record, at_zero, pairs, m)
                teacher = {"none": "null", "B0": "null", "T": made.teacher}[m.teacher]
                t0 = time.perf_counter()
                loaded, steps = stage_config(
                    exp, exp.stage1, made.b0, paths["tfds_b"], n_b, run_dir,
                    [f"loss.target={json.dumps(m.target)}", f"model.teacher={teacher}",
                     f"data.seed={seed}", f"run.seed={seed}", "checkpoint.every_steps=0"])
                summary = finetune(loaded, steps, probes)
                seconds = time.perf_counter() - t0
                final = record[-1]
                log({"event": "run", **tag, "name": m.name, "seed": seed, "target": m.target,
                     "teacher": m.teacher, "steps": steps, "epochs": record,
                     **{k: v for k, v in final.items() if k not in ("epoch", "step")},
                     "train_loss_last": summary["last"].get("loss"),
                     "compiles": summary["compiles"],
                     "compile_s": round(summary["compile_s"], 1),
                     "seconds": round(seconds, 1),
                     "eval_s": round(final.get("final_eval_s", 0.0), 1)})


if __name__ == "__main__":
    main(sys.argv[1:])
