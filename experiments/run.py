"""Does Target-SFT protect a competent model from noisy, off-policy demonstrations?

    .venv/bin/python experiments/run.py --config experiments/regime.yaml   # docs/results.md
    .venv/bin/python experiments/report.py experiments/runs/regime

Stage 0 (cached under `cache_dir`, each folder beside the config that made it in
`made_by.json`; another config's folder is refused, see `claim`): the synthetic sets (JSONL,
then tfds folders written by the data package's `prepare`), the base B0 = `base_source` after
clean SFT on set A (one solution template, plus a second skill), the teacher T = B0 after
further clean SFT, and B0's own answers to off-task prompts. Stage 1: every method x seed
fine-tunes B0 for `stage1.epochs` epochs on set B (disjoint problems, other templates, a
fraction corrupted).

The experiment config is read by `qtarget_jax.config.load_dataclass` (dotted overrides,
types, unknown keys). Every training run is `qtarget_jax.train.loop.run` on a `TrainConfig`
from `qtarget_jax.config.load_config(train_job, overrides)`: the data pipeline, step,
optimizer and teacher handling are the library's; runs of the same shapes share one compiled
step in this process. The per-epoch metrics are `probes` passed to the loop
(`qtarget_jax.problems.probes`); accuracy and Average@k are `qtarget_jax.problems.solve`.

Outputs (`out_dir`): `runs.jsonl` (one `model` line per stage-0 model, one `run` line per
(method, seed) with per-epoch metrics, final metrics and timings), `runs/<method>_<seed>/` (the
loop's config.yaml and metrics.jsonl), `eval_<name>.jsonl` per-problem outputs. Re-running the
same command resumes: finished runs of the same config are kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Literal


from qtarget_jax.data import synthetic
from qtarget_jax.libtpu_env import quiet_without_tpu

SETS = ("a", "b", "teacher", "test", "skill_test")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The synthetic sets (all problems distinct, drawn from one stream of `seed`)."""
    seed: int = 0
    n_test: int = 40           # held-out problems (clean); one problem = 100 / n_test points
    n_a: int = 96              # stage 0 arithmetic problems (a_templates)
    n_skill: int = 32          # stage 0 second-skill rows ("largest number")
    n_skill_test: int = 40     # second-skill held-out rows
    n_b: int = 24              # stage 1 problems (b_templates), a fraction `noise` corrupted
    n_teacher: int = 96        # extra clean problems for the teacher (t_templates)
    noise: float = 0.4
    a_templates: tuple[int, ...] = (0,)
    b_templates: tuple[int, ...] = (1, 2)
    t_templates: tuple[int, ...] = (0,)


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
    return exp


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


def make_sets(spec: DataSpec) -> dict[str, list[dict]]:
    """The experiment's rows: `a` (stage 0: arithmetic in a_templates + the second skill),
    `b` (stage 1: noisy, b_templates; corrupted rows carry `clean`), `teacher` (clean,
    t_templates), `test` (held-out arithmetic, clean), `skill_test` (held-out second skill)."""
    sizes = (spec.n_test, spec.n_a, spec.n_b, spec.n_teacher)
    problems = synthetic.draw_problems(sum(sizes), spec.seed)
    cut = [sum(sizes[:k]) for k in range(5)]
    test, a, b, teacher = (problems[cut[k]:cut[k + 1]] for k in range(4))
    return {
        "test": synthetic.write_problems(test, "test", spec.seed),
        "a": (synthetic.write_problems(a, "a", spec.seed, templates=spec.a_templates)
              + synthetic.largest_rows(spec.n_skill, "skill", spec.seed)),
        "b": synthetic.write_problems(b, "b", spec.seed, noise=spec.noise,
                                      templates=spec.b_templates),
        "teacher": synthetic.write_problems(teacher, "teacher", spec.seed,
                                            templates=spec.t_templates),
        "skill_test": synthetic.largest_rows(spec.n_skill_test, "skill_test", spec.seed),
    }


def prepare_sets(spec: DataSpec, folder: str) -> dict[str, str]:
    """Writes the sets as JSONL under `folder` and the training sets as tfds datasets
    (`regime_<set>`, splits train and test) with the data package's `prepare`; reuses them when
    present. Returns {name: path}: JSONL files and `tfds_<set>` dataset folders."""
    from qtarget_jax.data.builder import prepare_dataset
    sets = make_sets(spec)
    paths = {name: os.path.join(folder, f"{name}.jsonl") for name in SETS}
    for name, rows in sets.items():
        if not os.path.isfile(paths[name]):
            synthetic.write_jsonl(rows, paths[name])
    for name in ("a", "b", "teacher"):
        if not sets[name]:      # no stage-0 set when base is null
            continue
        tfds_dir = os.path.join(folder, "tfds")
        version = os.path.join(tfds_dir, "jsonl_sft", f"regime_{name}", "1.0.0")
        if not os.path.isdir(version):
            version, _ = prepare_dataset({"train": [paths[name]], "test": [paths["test"]]},
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


def first_difference(old, new, where: str = "") -> str:
    """The first dotted key at which two JSON-like values differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                return first_difference(old.get(k), new.get(k), f"{where}{k}.")
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
    B0's answers to off-task prompts; at the end (generation, `problems.solve`): held-out
    greedy accuracy and Average@k at the experiment's temperature, second-skill accuracy."""

    def __init__(self, exp: Experiment, paths: dict[str, str], tokenizer, b0_model):
        from qtarget_jax.generate import SamplingConfig, generate
        from qtarget_jax.problems import probes
        self.exp, self.tokenizer = exp, tokenizer
        self.test = eval_examples(read_jsonl(paths["test"]))
        self.skill = eval_examples(read_jsonl(paths["skill_test"]))
        self.pairs = memorisation_pairs(read_jsonl(paths["b"]))
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
        # The three probes' rows tokenised and packed once, run as one forward per epoch.
        self.probes = probes.EpochProbes(tokenizer, self.test, self.pairs or None,
                                         self.reference)

    def per_epoch(self, model) -> dict[str, float]:
        """answer-token accuracy, memorisation (when set B has corrupted rows) and KL from
        B0 of `model` (`problems.probes.EpochProbes`: the values of answer_token_accuracy,
        memorisation and kl_from_reference, in one packed forward)."""
        return self.probes(model)

    def final(self, model, seed: int, out_prefix: str | None) -> dict[str, float]:
        from qtarget_jax.problems import solve
        e = self.exp.eval
        out = solve(model, self.tokenizer, self.test, max_new_tokens=e.max_new_tokens,
                    batch_size=e.batch_size, num_samples=e.samples, temperature=e.temperature,
                    seed=seed, out_path=out_prefix and f"{out_prefix}.jsonl", prefix="")
        skill = solve(model, self.tokenizer, self.skill, max_new_tokens=e.skill_max_new_tokens,
                      batch_size=e.batch_size, seed=seed,
                      out_path=out_prefix and f"{out_prefix}_skill.jsonl", prefix="")
        out["skill_accuracy"] = skill["accuracy"]
        return out


def epoch_probes(evaluator: Evaluator, spe: int, steps: int, seed: int, out_prefix: str,
                 record: list, at_zero: dict | None):
    """The `probes` callback of a stage-1 run: per-epoch metrics at every evaluation (step 0:
    `at_zero`, B0's, when given, as every run starts from B0), generation metrics at the end;
    each result also appended to `record` as {"epoch", "step", ...}."""
    def probes(model, step: int) -> dict[str, float]:
        if step == 0 and at_zero is not None:
            out = dict(at_zero)
        else:
            out = evaluator.per_epoch(model)
            if step == steps:
                t0 = time.perf_counter()
                out.update(evaluator.final(model, seed, out_prefix))
                out["final_eval_s"] = time.perf_counter() - t0
        record.append({"epoch": step / spe, "step": step, **out})
        return out
    return probes


def finished(runs_path: str, exp: Experiment) -> dict[tuple[str, int], dict]:
    """(name, seed) -> record of the runs already in `runs_path` under this same config."""
    if not os.path.isfile(runs_path):
        return {}
    want, same, done = json.loads(json.dumps(dataclasses.asdict(exp))), False, {}
    for rec in read_jsonl(runs_path):
        if rec["event"] == "start":
            same = rec["config"] == want
        elif rec["event"] in ("model", "run") and same:
            done[(rec["name"], rec["seed"])] = rec
    return done


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

    # Stage 0: data, B0, T, B0's off-task answers, each cached under cache_dir beside the
    # config that made it (`claim`): a changed config is refused, never served stale.
    data_key = {"data": json.loads(json.dumps(dataclasses.asdict(exp.data)))}
    data_dir = os.path.join(exp.cache_dir, "data")
    try:
        claim(data_dir, data_key)
        paths = prepare_sets(exp.data, data_dir)
        n = {k: len(read_jsonl(paths[k])) for k in ("a", "b", "teacher")}
        b0_dir, b0_key = exp.base_source, {"source": exp.base_source}
        stage0 = []
        if exp.base is not None:
            b0_dir = os.path.join(exp.cache_dir, "b0")
            loaded, steps = stage_config(exp, exp.base, exp.base_source, paths["tfds_a"],
                                         n["a"], b0_dir, ["checkpoint.export_hf=true"])
            b0_key = made_by(loaded, source=exp.base_source, data=data_key)
            stage0.append(("B0", loaded, steps, b0_key))
        uses_t = any(m.teacher == "T" for m in exp.methods)
        t_dir = os.path.join(exp.cache_dir, "teacher")
        if uses_t:
            loaded, steps = stage_config(exp, exp.teacher, b0_dir, paths["tfds_teacher"],
                                         n["teacher"], t_dir, ["checkpoint.export_hf=true"])
            stage0.append(("T", loaded, steps, made_by(loaded, b0=b0_key, data=data_key)))
        for name, loaded, steps, key in stage0:
            if claim(loaded.config.run.dir, key, done=os.path.join("hf", "config.json")):
                continue
            t0 = time.perf_counter()  # a killed attempt restarts from step 1, records too
            summary = finetune(loaded, steps)
            log({"event": "stage0", "name": name, "steps": steps, "last": summary["last"],
                 "seconds": round(time.perf_counter() - t0, 1)})
    except ConfigError as e:
        sys.exit(f"config error: {e}")

    from qtarget_jax.evaluate import load_source
    from qtarget_jax.train.build import resolve_source
    b0, tokenizer = load_source(resolve_source(b0_dir))
    evaluator = Evaluator(exp, paths, tokenizer, b0)
    with open(os.path.join(exp.out_dir, "offtask_b0.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in evaluator.offtask)
    models = {}
    for name, source in (("B0", None), ("T", t_dir if uses_t else None)):
        if name == "T" and source is None:
            continue
        if (name, 0) in done:
            rec = done[(name, 0)]
        else:
            model = b0 if source is None else load_source(resolve_source(source))[0]
            t1 = time.perf_counter()
            rec = {"event": "model", "name": name, "seed": 0,
                   "per_epoch": evaluator.per_epoch(model),
                   **evaluator.final(model, 0, os.path.join(exp.out_dir, f"eval_{name}")),
                   "seconds": round(time.perf_counter() - t1, 1)}
        log(rec)
        models[name] = rec
    del b0
    key = f"avg@{exp.eval.samples}" if exp.eval.samples else "accuracy"
    if uses_t:  # a teacher weaker than the base tests nothing: say so before stage 1
        log({"event": "teacher_check", "metric": key, "B0": models["B0"][key],
             "T": models["T"][key], "teacher_beats_b0": models["T"][key] > models["B0"][key]})

    # Stage 1: seeds outer, methods inner (a run cut short has every method at early seeds).
    spe = steps_per_epoch(n["b"], batch_size_of(exp, exp.stage1.overrides), "stage1")
    for seed in exp.seeds:
        for m in methods:
            if (m.name, seed) in done:
                log({**done[(m.name, seed)], "resumed": True})
                continue
            run_dir = os.path.join(exp.out_dir, "runs", f"{m.name}_{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)   # a cut run starts over
            record: list[dict] = []
            probes = epoch_probes(evaluator, spe, exp.stage1.epochs * spe, seed,
                                  os.path.join(exp.out_dir, f"eval_{m.name}_{seed}"), record,
                                  models["B0"]["per_epoch"])
            teacher = {"none": "null", "B0": "null", "T": t_dir}[m.teacher]
            t0 = time.perf_counter()
            loaded, steps = stage_config(
                exp, exp.stage1, b0_dir, paths["tfds_b"], n["b"], run_dir,
                [f"loss.target={json.dumps(m.target)}", f"model.teacher={teacher}",
                 f"data.seed={seed}", f"run.seed={seed}", "checkpoint.every_steps=0"])
            summary = finetune(loaded, steps, probes)
            seconds = time.perf_counter() - t0
            final = record[-1]
            log({"event": "run", "name": m.name, "seed": seed, "target": m.target,
                 "teacher": m.teacher, "steps": steps, "epochs": record,
                 **{k: v for k, v in final.items() if k not in ("epoch", "step")},
                 "train_loss_last": summary["last"].get("loss"),
                 "compiles": summary["compiles"], "compile_s": round(summary["compile_s"], 1),
                 "seconds": round(seconds, 1),
                 "eval_s": round(final.get("final_eval_s", 0.0), 1)})
    log({"event": "done", "wall_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main(sys.argv[1:])
