"""Prepare is reproducible: the stored order and the bytes depend on the files' content and order,
never on the folder they sit in or the process that wrote them."""
import filecmp
import hashlib
import json
import os
import pathlib
import subprocess
import sys

from data_helpers import chat_row, write_jsonl

from qtarget_jax.data import builder, records, sources

REPO = pathlib.Path(__file__).resolve().parents[2]
# Files the promise covers (docs/training.md#reproducibility); metadata.json records the
# absolute paths of the inputs and so differs between folders by design.
IDENTICAL = ("dataset_info.json", "features.json", "jsonl_sft-train.array_record-00000-of-00001",
             "jsonl_sft-test.array_record-00000-of-00001")


def _rows(n, tag):
    return [chat_row(f"{tag} question {i}?", f"{tag} answer {i}\n#### {i}") for i in range(n)]


def _write_inputs(folder):
    """Two train files (the second with a blank line: line numbers are the file's) and a test."""
    a = write_jsonl(folder / "part_a.jsonl", _rows(9, "a"))
    rows_b = [json.dumps(r) for r in _rows(6, "b")]
    b = write_jsonl(folder / "part_b.jsonl", rows_b[:3] + [""] + rows_b[3:])
    test = write_jsonl(folder / "test.jsonl", _rows(5, "t"))
    return a, b, test


def _prepare_cli(cwd, train, test):
    """`python -m qtarget_jax.data prepare` in its own process, as a user runs it."""
    cmd = [sys.executable, "-m", "qtarget_jax.data", "prepare", "--split", f"train={train[0]}",
           "--split", f"train={train[1]}", "--split", f"test={test}", "--out", "tfds",
           "--name", "rep", "--seq-len", "0"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pathlib.Path(cwd) / "tfds" / "jsonl_sft" / "rep" / "1.0.0"


def _stored(path, split):
    ds = sources.open_split(str(path), split)
    return [(rec["source"].decode(), records.row_to_conversation(rec, "x"))
            for rec in (ds[i] for i in range(len(ds)))]


def _expected_order(split, files):
    """Independent reference: tfds sorts a split by md5(split name + key), key "FILE:LINE"."""
    keyed = []
    for index, (label, path) in enumerate(files):
        with open(path) as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    digest = hashlib.md5(f"{split}{index}:{line}".encode()).hexdigest()
                    keyed.append((int(digest, 16), f"{label}:{line}",
                                  records.parse_jsonl_line(text, "ref")))
    return [(source, conv) for _, source, conv in sorted(keyed)]


def test_same_files_in_two_folders_give_identical_order_and_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "bb" / "deeper").mkdir(parents=True)
    a_train_a, a_train_b, a_test = _write_inputs(tmp_path / "a")
    b_train_a, b_train_b, b_test = _write_inputs(tmp_path / "bb" / "deeper")
    # Relative paths from one working folder, absolute from another: neither may matter.
    out_a = _prepare_cli(tmp_path / "a", ("part_a.jsonl", "part_b.jsonl"), "test.jsonl")
    out_b = _prepare_cli(tmp_path / "bb", (b_train_a, b_train_b), b_test)

    for name in IDENTICAL:
        assert filecmp.cmp(out_a / name, out_b / name, shallow=False), name
    assert sorted(p.name for p in out_a.iterdir()) == sorted(IDENTICAL + ("metadata.json",))
    meta_a = json.loads((out_a / "metadata.json").read_text())
    meta_b = json.loads((out_b / "metadata.json").read_text())
    assert meta_a["files"]["train"] == [a_train_a, a_train_b]
    assert meta_b["files"]["train"] == [b_train_a, b_train_b]

    train_files = [("part_a.jsonl", a_train_a), ("part_b.jsonl", a_train_b)]
    got = _stored(out_b, "train")
    assert got == _stored(out_a, "train")
    assert got == _expected_order("train", train_files)
    assert got != sorted(got, key=lambda r: (r[0].split(":")[0], int(r[0].split(":")[1])))
    assert _stored(out_a, "test") == _expected_order("test", [("test.jsonl", a_test)])


def test_file_order_is_part_of_the_content(tmp_path):
    """Listing the split's files in another order is another dataset (keys carry the index)."""
    a, b, _ = _write_inputs(tmp_path)
    ab, _ = builder.prepare_dataset({"train": [a, b]}, str(tmp_path / "ab"), "ab")
    ba, _ = builder.prepare_dataset({"train": [b, a]}, str(tmp_path / "ba"), "ba")
    got_ab, got_ba = _stored(ab, "train"), _stored(ba, "train")
    assert sorted(got_ab) == sorted(got_ba) and got_ab != got_ba
    assert got_ba == _expected_order("train", [("part_b.jsonl", b), ("part_a.jsonl", a)])


def test_source_labels_are_short_and_unique():
    assert builder.source_labels(["/x/y/a.jsonl", "/x/z/b.jsonl"]) == ["a.jsonl", "b.jsonl"]
    assert builder.source_labels(["/x/a/train.jsonl", "/y/b/train.jsonl", "/y/c.jsonl"]) == [
        "a/train.jsonl", "b/train.jsonl", "c.jsonl"]
    assert builder.source_labels(["/r/s/a/t.jsonl", "/r/q/a/t.jsonl"]) == [
        "s/a/t.jsonl", "q/a/t.jsonl"]
    # The same file twice stays one label; the keys (file index, line) still differ.
    assert builder.source_labels(["/x/t.jsonl", "/x/t.jsonl"]) == ["/x/t.jsonl"] * 2
