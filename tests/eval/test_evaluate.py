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


# Outputs of a stand-in decoder, per example: (greedy, sample 1, sample 2), and by hand:
#   a (gold 7):   greedy right ("#### 7");     samples right, wrong (#### 8)
#   b (gold 1.5): greedy wrong (boxed 2);      samples right (boxed 1.50), no answer
#   c (gold 13):  greedy has no number at all; samples 12, 14: both wrong
SCRIPTED = {"a": ("so 3 + 4 = 7\n#### 7", "#### 7", "#### 8"),
            "b": ("It is \\boxed{2}", "\\boxed{1.50}", "I do not know"),
            "c": ("no idea", "12", "it is 14")}


def _scripted_generate_many(model, tokenizer, prompts, configs, *, names, **kwargs):
    from qtarget_jax.generate import Generation

    assert [c.temperature for c in configs] == [0.0, 0.7, 0.7]
    return [[Generation(text, [], "eos", 0) for text in SCRIPTED[name]] for name in names]


def test_accuracy_counts_match_a_hand_count(tiny_model, tokenizer, data_file, tmp_path,
                                            monkeypatch):
    """Metrics and records of known outputs against the counts made by hand above."""
    from qtarget_jax.problems import accuracy

    monkeypatch.setattr(accuracy, "generate_many", _scripted_generate_many)
    out = tmp_path / "out.jsonl"
    m = evaluate_model(tiny_model, tokenizer, load_examples(data_file), num_samples=2,
                       loss_seq_len=None, out_path=str(out))
    assert m == {"eval/accuracy": 1 / 3, "eval/parse_errors": 1.0, "eval/n": 3.0,
                 "eval/avg@2": (1 / 2 + 1 / 2 + 0) / 3, "eval/pass@2": 2 / 3}
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["correct"], r["samples_correct"]) for r in recs] == [
        ("a", True, [True, False]), ("b", False, [True, False]), ("c", False, [False, False])]
    assert [r["output"] for r in recs] == [SCRIPTED[k][0] for k in "abc"]
    assert [r["samples"] for r in recs] == [list(SCRIPTED[k][1:]) for k in "abc"]
    assert [r["parse_error"] is not None for r in recs] == [False, False, True]
    assert [(r["extracted"], r["method"]) for r in recs] == [
        ("7", "hash"), ("2", "boxed"), (None, "none")]


def test_random_model_end_to_end(tiny_model, tokenizer, data_file, tmp_path):
    """The real decoder: records hold its greedy outputs (== `generate` alone), metrics hold
    the held-out loss of `heldout_loss`, and unparsable outputs are reported, not raised."""
    from qtarget_jax.generate import SamplingConfig, generate

    examples = load_examples(data_file)
    out = tmp_path / "out.jsonl"
    m = evaluate_model(tiny_model, tokenizer, examples, max_new_tokens=6, num_samples=2,
                       loss_seq_len=64, out_path=str(out))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    greedy = generate(tiny_model, tokenizer, [e.prompt for e in examples],
                      SamplingConfig(max_new_tokens=6))
    assert [r["output"] for r in recs] == [g.text for g in greedy]
    assert all(len(r["samples"]) == 2 for r in recs)
    want = [score(g.text, e.gold) for g, e in zip(greedy, examples)]
    assert m["eval/accuracy"] == sum(s.correct for s in want) / 3
    assert m["eval/parse_errors"] == sum(s.parse_error is not None for s in want)
    loss = heldout_loss(tiny_model, tokenizer, examples, seq_len=64)["loss"]
    assert m["eval/loss"] == loss and m["eval/ppl"] == pytest.approx(np.exp(loss), rel=1e-12)


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


def test_heldout_loss_of_a_sharded_model_equals_one_device(tiny_model, tokenizer, data_file):
    """The eval step runs where the params are: data=2, fsdp=2, tensor=2 == one device."""
    from flax import nnx

    from qtarget_jax.models.sharding import shard_model
    from qtarget_jax.train.mesh import make_mesh

    examples = load_examples(data_file)
    want = heldout_loss(tiny_model, tokenizer, examples, seq_len=64, batch_size=2)
    sharded = nnx.clone(tiny_model)
    shard_model(sharded, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    placed = jax.tree.leaves(nnx.state(sharded, nnx.Param))
    assert all(len(x.sharding.device_set) == 8 for x in placed)
    assert any(not x.sharding.is_fully_replicated for x in placed)
    got = heldout_loss(sharded, tokenizer, examples, seq_len=64, batch_size=2)
    assert got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


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
    saved4, saved2 = (_saved_params(run_dir / "checkpoints" / str(s) / "state") for s in (4, 2))
    got4, got2 = _flat_params(model4), _flat_params(model2)
    assert sorted(got4) == sorted(saved4) == sorted(saved2) and len(got4) == 20, sorted(got4)
    for key in got4:  # bit for bit what the run saved at each step
        np.testing.assert_array_equal(got4[key], saved4[key], err_msg=key)
        np.testing.assert_array_equal(got2[key], saved2[key], err_msg=key)
    assert all(not np.array_equal(saved4[k], saved2[k]) for k in saved4)  # 2 steps apart


def _flat_params(model) -> dict[str, np.ndarray]:
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in flat}


def _saved_params(state_dir) -> dict[str, np.ndarray]:
    """The params item of an Orbax checkpoint read straight from disk as numpy."""
    import orbax.checkpoint as ocp

    ck = ocp.PyTreeCheckpointer()
    tree = ck.metadata(str(state_dir)).item_metadata.tree
    restored = ck.restore(str(state_dir), restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    flat = jax.tree_util.tree_flatten_with_path(restored["params"])[0]
    return {"/".join(str(getattr(p, "key", p)) for p in path): v for path, v in flat}
