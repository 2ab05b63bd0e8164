"""experiments/run.py and report.py: config errors, packed batches, and the whole experiment
(teacher, methods x seeds, resume, report) end to end on a tiny random model."""
import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest
import yaml
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "models"))

from io_helpers import make_tokenizer  # noqa: E402

from qtarget_jax.data.synthetic import generate as synth_generate  # noqa: E402
from qtarget_jax.models import Decoder, ModelConfig  # noqa: E402
from qtarget_jax.models.export import export_hf  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}",
                                                  ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


run = _load("run")
report = _load("report")

TINY = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            max_position_embeddings=512, tie_word_embeddings=True)


def test_quick_and_full_configs_load():
    for name in ("quick", "full"):
        cfg = run.load_experiment(str(ROOT / "experiments" / f"{name}.yaml"), [])
        assert len(cfg.seeds) >= 3
        names = {m.name for m in cfg.methods}
        assert {"sft", "label_smoothing", "dft", "distill", "kl_anchor", "target_sft_eta0.25",
                "target_sft_eta0.5", "target_sft_eta1", "target_sft_eta0.5_init"} <= names


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("steps: 2\nmethods:\n  - {name: d, target: {preset: distill}}\n")
    with pytest.raises(ValueError, match="method d: target .* and teacher='none' disagree"):
        run.load_experiment(str(path), [])
    with pytest.raises(ValueError, match=r"unknown keys \['stepz'\]"):
        run.load_experiment(str(path), ["stepz=3"])
    with pytest.raises(ValueError, match="'steps' is not key=value"):
        run.load_experiment(str(path), ["steps"])
    path.write_text("methods:\n  - {name: s, target: {preset: sft}}\n")
    cfg = run.load_experiment(str(path), ["steps=7", "seeds=[4, 5]"])
    assert (cfg.steps, cfg.seeds) == (7, (4, 5))


def test_batches_pack_each_example_once_per_epoch():
    tok = make_tokenizer()
    rows = synth_generate(9, 0, seed=0, phrasings=1)["train"]
    examples = run.tokenize_examples(tok, rows, 480)
    lengths = np.array([len(e) for e in examples])
    order = np.random.default_rng([3, 0]).permutation(len(examples))
    epoch = len(run.pack_bins(lengths, order, 480))
    assert epoch < len(examples)                   # several examples share a row
    seen, total = [], 0
    for batch, n in run.batches(examples, 1, 480, epoch, seed=3):
        total += n
        seg, pos = batch["segment_ids"][0], batch["positions"][0]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            seen.append(tuple(batch["tokens"][0, where]))
        np.testing.assert_array_equal(batch["loss_mask"], batch["labels"] != -100)
    assert total == len(examples)
    assert sorted(seen) == sorted(tuple(e.tokens) for e in examples)
    a = [b for b, _ in run.batches(examples, 2, 480, 3, seed=1)]
    b = [b for b, _ in run.batches(examples, 2, 480, 3, seed=1)]
    c = [b for b, _ in run.batches(examples, 2, 480, 3, seed=2)]
    assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, b))
    assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, c))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_hf")
    model = Decoder(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    export_hf(model, model.cfg, str(folder), tokenizer=make_tokenizer())
    return str(folder)


@pytest.mark.slow
def test_experiment_end_to_end_resumes_and_reports(tmp_path, tiny_folder):
    out, teacher = tmp_path / "out", tmp_path / "teacher"
    config = dict(model=tiny_folder, n_train=6, n_test=3, phrasings=1, noise=0.5, seq_len=480,
                  batch_size=1, steps=3, lr=1e-2, warmup_steps=1, seeds=[0, 1],
                  teacher_steps=2, teacher_lr=1e-2, teacher_dir=str(teacher), eval_problems=2,
                  eval_seq_len=320, max_new_tokens=3, eval_batch=2, samples=2,
                  out_dir=str(out),
                  methods=[{"name": "sft", "target": {"preset": "sft"}},
                           {"name": "tsft", "target": {"preset": "target_sft", "eta": 0.5},
                            "teacher": "trained"},
                           {"name": "kl", "target": {"preset": "kl_anchor", "kl_weight": 0.1},
                            "teacher": "initial"}])
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    run.main(["--config", str(path)])

    events = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "eval", "teacher_trained", "eval"] + ["eval"] * 6 + ["done"]
    assert (teacher / "config.json").is_file()
    evals = [e for e in events if e["event"] == "eval"]
    assert [(e["method"], e["seed"]) for e in evals] == [
        ("before fine-tuning", 0), ("teacher (clean SFT)", 0), ("sft", 0), ("tsft", 0),
        ("kl", 0), ("sft", 1), ("tsft", 1), ("kl", 1)]
    for e in evals[2:]:
        assert e["examples_seen"] >= 3 and np.isfinite(e["eval/loss"])
        assert e["train_loss_last"] != e["train_loss_first"]
        recs = [json.loads(x) for x in
                (out / f"eval_{e['method']}_{e['seed']}.jsonl").read_text().splitlines()]
        assert len(recs) == 2 and all(len(r["samples"]) == 2 for r in recs)
        assert e["eval/avg@2"] == pytest.approx(np.mean([np.mean(r["samples_correct"])
                                                         for r in recs]))
    # The same method trains the same way whatever ran before it: seeds differ, runs repeat.
    assert evals[2]["train_loss_first"] != evals[5]["train_loss_first"]

    # Re-running the same command resumes: nothing is trained again, the teacher is loaded.
    run.main(["--config", str(path)])
    events = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    second = events[len(kinds):]
    assert [e["event"] for e in second] == ["start", "eval", "teacher_loaded", "eval"] + \
        ["eval"] * 6 + ["done"]
    assert second[0]["resumed_runs"] == 8
    assert all(e.get("resumed") for e in second[4:10])

    table = report.main(str(out))
    lines = table.splitlines()
    assert lines[0].startswith("| method | teacher | seeds | greedy acc %")
    assert any(line.startswith("| tsft | trained | 2 |") for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and [m["method"] for m in summary["methods"]] == [
        "before fine-tuning", "teacher (clean SFT)", "sft", "tsft", "kl"]
    assert (out / "accuracy.png").stat().st_size > 1000
