"""experiments/run.py and report.py: configs, the experiment's sets, and the whole pipeline
(stage 0 cached, methods x seeds through qtarget_jax.train, per-epoch probes, resume, report)
on a tiny random model."""
import json
import pathlib
import re
import sys

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from experiment_helpers import ROOT, load_script, write_tiny_train_job  # noqa: E402

run = load_script("run", "experiment")
report = load_script("report", "experiment")


@pytest.mark.parametrize("name", ["regime", "regime_full", "quick"])
def test_shipped_configs_load_and_their_sets_fill_whole_batches(name):
    exp = run.load_experiment(str(ROOT / "experiments" / f"{name}.yaml"), [])
    assert len(exp.seeds) >= 3 and exp.stage1.epochs >= 1
    from qtarget_jax.config import load_config
    for stage in (exp.stage1, exp.teacher) + ((exp.base,) if exp.base else ()):
        cfg = load_config(exp.train_job, stage.overrides).config
        assert not cfg.data.pack
    sets = run.make_sets(exp.data)
    batch = run.batch_size_of(exp, exp.stage1.overrides)
    assert run.steps_per_epoch(len(sets["b"]), batch, "b") >= 1


def test_regime_config_is_the_papers_regime():
    exp = run.load_experiment(str(ROOT / "experiments" / "regime.yaml"), [])
    names = {m.name: m for m in exp.methods}
    assert {"sft", "dft", "distill", "target_sft_eta0.5", "target_sft_eta1",
            "target_sft_eta0.5_b0"} <= set(names)
    assert names["target_sft_eta0.5_b0"].teacher == "B0" and names["distill"].teacher == "T"
    assert exp.stage1.epochs >= 3 and exp.eval.samples >= 4 and exp.eval.temperature == 1.0
    assert 100 / exp.data.n_test <= 2.5
    assert set(exp.data.a_templates).isdisjoint(exp.data.b_templates)


def test_config_errors_name_the_key(tmp_path):
    from qtarget_jax.config import ConfigError
    path = tmp_path / "x.yaml"
    path.write_text("out_dir: o\ncache_dir: c\ntrain_job: j\n"
                    "methods:\n  - {name: d, target: {preset: distill}}\n")
    with pytest.raises(ConfigError, match="method d: target .* and teacher='none' disagree"):
        run.load_experiment(str(path), [])
    ok = ["methods=[{name: s, target: {preset: sft}}, {name: t, target: {preset: dft}}]"]
    with pytest.raises(ConfigError, match=r"unknown key 'stepz'"):
        run.load_experiment(str(path), ["stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.n_trian'; did you mean 'data.n_a"):
        run.load_experiment(str(path), [*ok, "data.n_trian=3"])
    with pytest.raises(ConfigError, match=r"data.noise='lots': expected float"):
        run.load_experiment(str(path), [*ok, "data.noise=lots"])
    with pytest.raises(ConfigError, match=r"'seeds': expected key=value"):
        run.load_experiment(str(path), ["seeds"])
    with pytest.raises(ConfigError, match=r"methods\[0\].teacher='X': must be one of "
                                          r"\['none', 'T', 'B0'\]"):
        run.load_experiment(str(path), ["methods=[{name: s, target: {preset: sft}, "
                                        "teacher: X}]"])
    with pytest.raises(ConfigError, match=r"missing key\(s\) methods\[0\].name"):
        run.load_experiment(str(path), ["methods=[{target: {preset: sft}}]"])
    # Nested overrides reach any key, typed (int -> float), and tuples stay tuples.
    exp = run.load_experiment(str(path), [*ok, "data.noise=1", "data.b_templates=[2]",
                                          "base=null", "stage1.epochs=5"])
    assert exp.data.noise == 1.0 and isinstance(exp.data.noise, float)
    assert exp.data.b_templates == (2,) and exp.data.n_b == run.DataSpec().n_b
    assert exp.base is None and exp.stage1 == run.Stage(epochs=5)
    assert [m.name for m in run.select_methods(exp, "t")] == ["t"]
    with pytest.raises(ConfigError, match=r"--only 'tt': no such method; did you mean 't'"):
        run.select_methods(exp, "t,tt")


def test_stage0_caches_are_keyed_by_the_config_that_made_them(tmp_path):
    from qtarget_jax.config import ConfigError
    folder = str(tmp_path / "b0")
    key = {"train": {"optim": {"lr": 1e-4}}, "data": {"noise": 0.4}}
    assert run.claim(folder, key, done="hf") is False            # absent: make it (stamped)
    assert run.claim(folder, key, done="hf") is False            # stamped, not finished: redo
    (tmp_path / "b0" / "hf").mkdir()
    assert run.claim(folder, key, done="hf") is True             # finished: reuse
    with pytest.raises(ConfigError, match=r"b0 was made by another config \(data.noise: 0.4 "
                                          r"then, 0.2 now\): delete it"):
        run.claim(folder, {**key, "data": {"noise": 0.2}}, done="hf")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("")
    with pytest.raises(ConfigError, match="has no made_by.json"):
        run.claim(str(tmp_path / "old"), key)
    with pytest.raises(ValueError, match="do not fill batches of 4"):
        run.steps_per_epoch(10, 4, "runs/x")


def test_sets_are_disjoint_off_policy_and_corruptions_are_paired():
    spec = run.DataSpec(n_test=10, n_a=12, n_skill=4, n_skill_test=5, n_b=20, n_teacher=6,
                        noise=0.5)
    sets = run.make_sets(spec)
    assert [len(sets[k]) for k in ("test", "a", "b", "teacher", "skill_test")] == \
        [10, 16, 20, 6, 5]

    def question(r):
        return r["messages"][0]["content"]
    arith = {k: {question(r) for r in sets[k] if not r["id"].startswith("skill")}
             for k in ("test", "a", "b", "teacher")}
    keys = list(arith)
    for i, k in enumerate(keys):          # different problems, so different questions
        for other in keys[i + 1:]:
            assert arith[k].isdisjoint(arith[other]), (k, other)
    # Set A uses solution template 0 only (bare "N + b = M" lines); set B never does.
    bare = re.compile(r"^\d+ [-+*] \d+ = \d+$")
    a_lines = [r["messages"][1]["content"].splitlines()[1] for r in sets["a"]
               if r["id"].startswith("a-")]
    assert all(bare.match(line) for line in a_lines)
    b_lines = [r["messages"][1]["content"].splitlines()[1] for r in sets["b"]]
    assert not any(bare.match(line) for line in b_lines)
    noisy = [r for r in sets["b"] if r["noise"]]
    assert 5 <= len(noisy) <= 15 and all(r["clean"] != r["messages"][1]["content"]
                                         for r in noisy)
    for r in noisy:                       # same lines, only numbers differ
        shown, clean = r["messages"][1]["content"], r["clean"]
        strip = "".join(c for c in shown if not c.isdigit())
        assert strip == "".join(c for c in clean if not c.isdigit())
        assert clean.endswith(f"#### {r['answer']}")
    assert all(r["messages"][1]["content"].endswith(f"#### {r['answer']}")
               for r in sets["skill_test"])
    pairs = run.memorisation_pairs(sets["b"])
    assert [p[0] for p in pairs] == [r["id"] for r in noisy]


@pytest.mark.slow
def test_experiment_end_to_end_resumes_and_reports(tmp_path, tiny_folder):
    job = write_tiny_train_job(tmp_path / "train.yaml")
    out, cache = tmp_path / "out", tmp_path / "cache"
    config = dict(out_dir=str(out), cache_dir=str(cache), train_job=str(job),
                  base_source=tiny_folder,
                  data=dict(n_test=3, n_a=6, n_skill=2, n_skill_test=2, n_b=8, n_teacher=8,
                            noise=0.5, seed=1),
                  base={"epochs": 1}, teacher={"epochs": 1}, stage1={"epochs": 2},
                  seeds=[0, 1],
                  eval=dict(samples=2, max_new_tokens=3, batch_size=3, skill_max_new_tokens=2,
                            offtask_max_new_tokens=3),
                  methods=[{"name": "sft", "target": {"preset": "sft"}},
                           {"name": "tsft", "target": {"preset": "target_sft", "eta": 0.5},
                            "teacher": "T"},
                           {"name": "tsft_b0", "target": {"preset": "target_sft", "eta": 1.0},
                            "teacher": "B0"}])
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    run.main(["--config", str(path)])

    events = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "stage0", "stage0", "model", "model", "teacher_check"] + \
        ["run"] * 6 + ["done"]
    for name in ("b0", "teacher"):      # stage 0 exported through the training loop
        assert (cache / name / "hf" / "config.json").is_file()
        assert (cache / name / "metrics.jsonl").is_file()
    assert (cache / "data" / "tfds" / "jsonl_sft" / "regime_b" / "1.0.0").is_dir()
    b0 = next(e for e in events if e["event"] == "model" and e["name"] == "B0")
    # B0 against itself: no divergence.
    assert b0["per_epoch"]["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    runs = [e for e in events if e["event"] == "run"]
    assert [(e["name"], e["seed"]) for e in runs] == [
        ("sft", 0), ("tsft", 0), ("tsft_b0", 0), ("sft", 1), ("tsft", 1), ("tsft_b0", 1)]
    n_noisy = sum(1 for r in run.read_jsonl(str(cache / "data" / "b.jsonl")) if r["noise"])
    for e in runs:
        assert [x["epoch"] for x in e["epochs"]] == [0.0, 1.0, 2.0] and e["steps"] == 2
        assert e["epochs"][0]["kl_ref"] == b0["per_epoch"]["kl_ref"]   # every run starts at B0
        assert e["epochs"][-1]["kl_ref"] > 1e-4                          # and moves away
        assert e["memorisation_n"] == n_noisy
        recs = run.read_jsonl(str(out / f"eval_{e['name']}_{e['seed']}.jsonl"))
        assert len(recs) == 3 and all(len(r["samples"]) == 2 for r in recs)
        assert e["avg@2"] == pytest.approx(np.mean([np.mean(r["samples_correct"])
                                                    for r in recs]))
        assert len(run.read_jsonl(str(out / f"eval_{e['name']}_{e['seed']}_skill.jsonl"))) == 2
        metrics = run.read_jsonl(str(out / "runs" / f"{e['name']}_{e['seed']}" /
                                     "metrics.jsonl"))
        logged = [m for m in metrics if "memorisation" in m]
        assert [m["step"] for m in logged] == [1, 2]        # the loop logged the probes
        # checkpoint.every_steps=0: the loop saved nothing.
        assert not (out / "runs" / f"{e['name']}_{e['seed']}" / "checkpoints").exists()
        resolved = yaml.safe_load((out / "runs" / f"{e['name']}_{e['seed']}" /
                                   "config.yaml").read_text())
        assert resolved["data"]["seed"] == resolved["run"]["seed"] == e["seed"]
        assert resolved["model"]["teacher"] == {"T": str(cache / "teacher"), "B0": None,
                                                "none": None}[e["teacher"]]
        assert resolved["loss"]["target"] == e["target"]

    # Re-running the same command resumes: nothing is trained again.
    run.main(["--config", str(path)])
    events = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    second = events[len(kinds):]
    assert [e["event"] for e in second] == ["start", "model", "model", "teacher_check"] + \
        ["run"] * 6 + ["done"]
    assert second[0]["resumed"] == 8 and all(e.get("resumed") for e in second[4:10])

    table = report.main(str(out))
    lines = table.splitlines()
    assert lines[0].startswith("| method | teacher | seeds | greedy acc % | Average@2 %")
    assert any(line.startswith("| tsft | T | 2 |") for line in lines)
    assert any(line.startswith("| B0 | - | 1 |") for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and [r["name"] for r in summary["rows"]] == [
        "B0", "T", "sft", "tsft", "tsft_b0"]
    sft = summary["rows"][2]
    assert sft["curves"]["kl_ref"]["mean"][1] == pytest.approx(
        np.mean([e["epochs"][1]["kl_ref"] for e in runs if e["name"] == "sft"]))
    assert (out / "curves.png").stat().st_size > 1000

    # A changed data spec is refused in one line, not trained on stale sets and models.
    with pytest.raises(SystemExit, match=r"data was made by another config \(data.noise: 0.5 "
                                         r"then, 0.25 now\)"):
        run.main(["--config", str(path), "data.noise=0.25"])
