"""evaluate: examples, accuracy bookkeeping, unparsable outputs, held-out loss vs numpy, CLI,
and loading a training run's checkpoint."""
import json

import jax
import numpy as np
import pytest

from qtarget_jax.evaluate import evaluate_model, heldout_loss, load_examples, score
from qtarget_jax.evaluate.__main__ import main

ROWS = [
    {"id": "a", "answer": 7, "messages": [{"role": "user", "content": "3 + 4?"},
                                          {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]},
    {"id": "b", "prompt": "half of 3?", "response": "It is \\boxed{1.5}"},
    {"id": "c", "prompt": "ab ab", "response": "so 12 then 13"},
]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    return str(path)


def test_load_examples(data_file, tmp_path):
    ex = load_examples(data_file)
    assert [(e.id, e.gold) for e in ex] == [("a", "7"), ("b", "1.5"), ("c", "13")]
    assert ex[1].prompt == [{"role": "user", "content": "half of 3?"}]
    assert len(load_examples(data_file, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "no answer here"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no gold answer"):
        load_examples(str(bad))


def test_metrics_and_records_agree(tiny_model, tokenizer, data_file, tmp_path):
    out = tmp_path / "out.jsonl"
    m = evaluate_model(tiny_model, tokenizer, load_examples(data_file), max_new_tokens=6,
                       num_samples=2, loss_seq_len=64, out_path=str(out))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["a", "b", "c"]
    for r in recs:  # random-model outputs: unparsable ones are wrong and reported, no crash
        s = score(r["output"], r["gold"])
        assert r["correct"] == s.correct and r["parse_error"] == s.parse_error
        assert len(r["samples"]) == 2
    assert m["eval/accuracy"] == pytest.approx(np.mean([r["correct"] for r in recs]))
    assert m["eval/parse_errors"] == sum(r["parse_error"] is not None for r in recs)
    assert m["eval/avg@2"] == pytest.approx(np.mean([np.mean(r["samples_correct"])
                                                     for r in recs]))
    assert m["eval/ppl"] == pytest.approx(np.exp(m["eval/loss"]))


def test_heldout_loss_matches_numpy(tiny_model, tokenizer, data_file):
    from qtarget_jax.data.chat import tokenize_conversation, to_training_example
    from qtarget_jax.data.records import Message

    examples = load_examples(data_file)
    got = heldout_loss(tiny_model, tokenizer, examples, seq_len=64, batch_size=2)
    total, count = 0.0, 0
    for e in examples:
        conv = [Message(**m) for m in e.prompt] + [Message("assistant", e.reference)]
        ex = to_training_example(*tokenize_conversation(tokenizer, conv, e.id), 64,
                                 truncate=False, where=e.id)
        z = np.asarray(tiny_model(ex.tokens[None].astype(np.int32)))[0].astype(np.float64)
        logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - z.max(-1, keepdims=True)
        sup = ex.labels != -100
        total -= logp[sup, ex.labels[sup]].sum()
        count += sup.sum()
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)


def test_too_long_examples_are_errors_naming_them(tiny_model, tokenizer, data_file):
    examples = load_examples(data_file)
    with pytest.raises(ValueError, match="a: too_long"):
        heldout_loss(tiny_model, tokenizer, examples, seq_len=8)
    with pytest.raises(ValueError, match="b: prompt has"):
        from qtarget_jax.generate import SamplingConfig, generate
        generate(tiny_model, tokenizer, [e.prompt for e in examples],  # a: 20 tokens, b: 24
                 SamplingConfig(max_new_tokens=8), names=[e.id for e in examples], max_len=30)


def test_cli_on_hf_folder(tiny_model, tokenizer, data_file, tmp_path, capsys):
    from qtarget_jax.models.export import export_hf

    export_hf(tiny_model, tiny_model.cfg, str(tmp_path / "hf"), tokenizer=tokenizer)
    out = main(["--model", str(tmp_path / "hf"), "--data", data_file, "--limit", "2",
                "--max-new-tokens", "4", "--seq-len", "64", "--out", str(tmp_path / "o.jsonl")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["eval/n"] == 2 and printed["eval/accuracy"] == out["eval/accuracy"]
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


def test_load_checkpoint_of_a_training_run(tokenizer, tmp_path):
    """Train the tiny job 4 steps, then restore steps 2 and 4 through the evaluate loader."""
    from qtarget_jax.config import load_config
    from qtarget_jax.data import prepare_dataset, synthetic
    from qtarget_jax.evaluate.loading import load_checkpoint
    from qtarget_jax.train.loop import run

    rows = synthetic.generate(8, 4, seed=0)
    files = {}
    for split, split_rows in rows.items():
        files[split] = [str(tmp_path / f"{split}.jsonl")]
        synthetic.write_jsonl(split_rows, files[split][0])
    data, _ = prepare_dataset(files, str(tmp_path / "tfds"), "synth")
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    run_dir = tmp_path / "run"
    run(load_config("configs/tiny_test.yaml", (
        f"data.path={data}", f"model.tokenizer={tmp_path / 'tok'}", f"run.dir={run_dir}",
        "run.steps=4", "checkpoint.every_steps=2", "checkpoint.async_save=false",
        "logging.tensorboard=false", "logging.plot=false", "data.seq_len=192",
        "data.batch_size=8")))
    model4, tok, step4 = load_checkpoint(str(run_dir))
    model2, _, step2 = load_checkpoint(str(run_dir), step=2)
    assert (step4, step2, len(tok)) == (4, 2, 128)
    e4, e2 = model4.embedder.embedding[...], model2.embedder.embedding[...]
    assert np.isfinite(np.asarray(e4)).all() and not np.allclose(e4, e2)
    assert jax.tree.structure(model4) == jax.tree.structure(model2)
