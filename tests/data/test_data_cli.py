"""`python -m qtarget_jax.data`: synth -> prepare (with statistics) -> stats; bad input exits 1."""
import json
import os
import subprocess
import sys

from data_helpers import chat_row, write_jsonl

from qtarget_jax.data.__main__ import main


def test_synth_prepare_stats(tmp_path, tiny_tokenizer_dir, capsys):
    out = str(tmp_path / "synth")
    assert main(["synth", "--out", out, "--n-train", "30", "--n-test", "5", "--noise", "0.2",
                 "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 60 rows" in printed and "wrote 5 rows (0 noisy)" in printed
    assert main(["prepare", "--split", f"train={out}/train.jsonl", "--split",
                 f"test={out}/test.jsonl", "--out", str(tmp_path / "tfds"), "--name", "synth",
                 "--tokenizer", tiny_tokenizer_dir, "--seq-len", "512", "--json"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 0 rows" in printed
    stats = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert [s["split"] for s in stats] == ["train", "test"]
    train = stats[0]
    assert train["records"] == train["examples"] == 60 and train["skipped"] == {}
    assert 0 < train["supervised"] < train["tokens"]
    assert train["packing_efficiency"] > train["padded_efficiency"]
    assert "[train] packed_rows=" in printed and "packing_efficiency=" in printed
    # The same numbers through the catalog name.
    assert main(["stats", "--source", "jsonl_sft/synth", "--data-dir", str(tmp_path / "tfds"),
                 "--split", "train", "--tokenizer", tiny_tokenizer_dir, "--seq-len", "512",
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert again == train


def test_bad_input_error_and_skip(tmp_path, tiny_tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [chat_row("hi", "hello"), "{broken",
                                              '{"prompt": "p", "response": ""}'])
    argv = ["prepare", "--split", f"train={path}", "--out", str(tmp_path / "a"), "--name", "d",
            "--seq-len", "0"]
    assert main(argv) == 1
    assert f"error: {path}:2: malformed_json" in capsys.readouterr().err
    argv = ["prepare", "--split", f"train={path}", "--out", str(tmp_path / "b"), "--name", "d",
            "--policy", "skip", "--tokenizer", tiny_tokenizer_dir, "--seq-len", "128"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 rows:" in printed
    assert f"empty_response=1 (first: {path}:3" in printed
    assert f"malformed_json=1 (first: {path}:2" in printed
    assert "[train] records=1 examples=1" in printed


def test_module_entry_point_runs(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "qtarget_jax.data", "synth", "--out",
                          str(tmp_path), "--n-train", "3", "--n-test", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert os.path.exists(tmp_path / "train.jsonl") and os.path.exists(tmp_path / "test.jsonl")


def test_synth_ops_flag(tmp_path, capsys):
    out = str(tmp_path / "one")
    assert main(["synth", "--out", out, "--n-train", "20", "--n-test", "5", "--ops", "1"]) == 0
    rows = [json.loads(line) for line in open(f"{out}/train.jsonl")]
    assert {len(r["messages"][1]["content"].splitlines()) for r in rows} == {3}  # start, 1, ####
    for bad in ("3-1", "x", "0", "1-2-3"):
        assert main(["synth", "--out", str(tmp_path / "bad"), "--ops", bad]) == 1
        assert (f"error: --ops takes N or MIN-MAX with 1 <= MIN <= MAX, got {bad!r}"
                in capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "bad")
