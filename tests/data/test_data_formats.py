"""Real-world inputs: Parquet / JSONL.gz shards, globs and folders, chat / ShareGPT / mapped
columns, kept metadata columns, and every kind of bad input named (or counted under skip)."""
import gzip
import json
import os

import pytest
from data_helpers import chat_row, numina_rows, write_jsonl, write_parquet

from qtarget_jax.data import builder, readers, records, sources
from qtarget_jax.data.__main__ import main

M = records.Message


def write_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_all(path, fmt=None, policy="error"):
    pol = records.Policy(policy)
    return list(readers.read_rows(str(path), pol, fmt)), pol


# ---------------------------------------------------------------- formats, without flags


def test_parquet_messages_recognised_streamed_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 4)   # several record batches and row groups
    rows = numina_rows(11)
    path = write_parquet(tmp_path / "train.parquet", rows, row_group_size=3)
    got, _ = read_all(path)
    assert [r.index for r in got] == list(range(11))
    assert [r.where for r in got] == [f"{path}:row {i}" for i in range(11)]
    for r, row in zip(got, rows):
        assert r.conversation == (M("user", row["problem"]), M("assistant", row["solution"]))
        assert r.metadata is None


def test_sharegpt_and_prompt_response_recognised(tmp_path):
    share = {"id": "x", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"}, {"from": "human", "value": "and 3+3?"},
        {"from": "gpt", "value": "6"}]}
    path = write_gz(tmp_path / "mix.jsonl.gz", [share, {"prompt": "p", "response": "r"}])
    got, _ = read_all(path)
    assert [(r.index, r.where) for r in got] == [(1, f"{path}:1"), (2, f"{path}:2")]
    assert got[0].conversation == (M("system", "Be brief."), M("user", "2+2?"),
                                   M("assistant", "4"), M("user", "and 3+3?"),
                                   M("assistant", "6"))
    assert got[1].conversation == (M("user", "p"), M("assistant", "r"))


def test_messages_win_over_other_columns(tmp_path):
    # ultrachat_200k-like: a `prompt` column next to `messages`; the messages are the chat.
    row = {"prompt": "first", **chat_row("first", "answer")}
    got, _ = read_all(write_jsonl(tmp_path / "u.jsonl", [row]))
    assert got[0].conversation == (M("user", "first"), M("assistant", "answer"))


def test_column_mapping_and_system_prompt(tmp_path):
    rows = numina_rows(3)
    for r in rows:
        r["sys"] = "You are a careful solver."
    path = write_parquet(tmp_path / "t.parquet", rows)
    fmt = records.RowFormat(prompt="problem", response="solution", system_prompt="Think.")
    got, _ = read_all(path, fmt)
    assert got[2].conversation == (M("system", "Think."), M("user", rows[2]["problem"]),
                                   M("assistant", rows[2]["solution"]))
    fmt = records.RowFormat(prompt="problem", response="solution", system="sys",
                            system_prompt="unused: the row has a system turn")
    got, _ = read_all(path, fmt)
    assert got[0].conversation[0] == M("system", "You are a careful solver.")
    fmt = records.RowFormat(messages="messages", system_prompt="S")
    got, _ = read_all(path, fmt)
    assert [m.role for m in got[0].conversation] == ["system", "user", "assistant"]


@pytest.mark.parametrize("kwargs", [{"prompt": "a"}, {"response": "b"},
                                    {"messages": "m", "prompt": "a", "response": "b"},
                                    {"system": "s"}])
def test_inconsistent_row_format_rejected(kwargs):
    with pytest.raises(ValueError, match="row format|system column"):
        records.RowFormat(**kwargs)


def test_expand_paths_files_globs_folders(tmp_path):
    d = tmp_path / "data"
    a = write_parquet(d / "train-00000-of-00002.parquet", numina_rows(2))
    b = write_parquet(d / "train-00001-of-00002.parquet", numina_rows(2))
    t = write_parquet(d / "test-00000-of-00001.parquet", numina_rows(1))
    g = write_gz(d / "extra.jsonl.gz", [{"prompt": "p", "response": "r"}])
    (d / "README.md").write_text("not data")
    os.makedirs(d / "sub")
    write_jsonl(d / "sub" / "nested.jsonl", [chat_row("a", "b")])
    assert readers.expand_paths(str(d)) == [g, t, a, b]              # sorted, not recursive
    assert readers.expand_paths(f"{d}/train-*.parquet") == [a, b]
    assert readers.expand_paths(f"{t},{d}/train-*") == [t, a, b]
    with pytest.raises(FileNotFoundError, match="no such file"):
        readers.expand_paths(str(d / "missing.parquet"))
    with pytest.raises(FileNotFoundError, match="matches no"):
        readers.expand_paths(f"{d}/valid-*.parquet")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="has no"):
        readers.expand_paths(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unsupported file type"):
        readers.expand_paths(str(d / "README.md"))
    with pytest.raises(ValueError, match="named twice"):
        readers.expand_paths([a, f"{d}/train-*.parquet"])


def test_prepare_mixed_shards_with_kept_columns(tmp_path):
    """Parquet shards by glob + a JSONL.gz file in one split; `source` and `answer` kept."""
    rows = numina_rows(7)
    for i, r in enumerate(rows):
        r["answer"] = i + 1 if i != 3 else None              # ints and a null, kept as JSON
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", rows[:4])
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", rows[4:])
    gz = write_gz(tmp_path / "more.jsonl.gz",
                  [{**chat_row("q", "a"), "source": "mine", "answer": [1, 2]}])
    fmt = records.RowFormat(keep=("source", "answer"))
    out, pol = builder.prepare_dataset(
        {"train": [f"{tmp_path}/data/train-*.parquet", gz]}, str(tmp_path / "tfds"), "mix",
        row_format=fmt)
    ds = sources.open_split(out, "train")
    assert len(ds) == 8 and not pol.counts
    by_source = {}
    for i in range(len(ds)):
        rec = ds[i]
        by_source[rec["source"].decode()] = (json.loads(rec["metadata"]),
                                             records.row_to_conversation(rec, "r"))
    shard0 = "train-00000-of-00002.parquet"  # source names a file by its name (builder.source_labels)
    assert by_source[f"{shard0}:row 3"][0] == {"source": "olympiads", "answer": None}
    assert by_source[f"{shard0}:row 0"][0] == {"source": "cn_k12", "answer": 1}
    assert by_source[f"{os.path.basename(gz)}:1"] == ({"source": "mine", "answer": [1, 2]},
                                    (M("user", "q"), M("assistant", "a")))
    with open(os.path.join(out, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["row_format"] == {"keep": ["source", "answer"]}
    assert len(meta["files"]["train"]) == 3


def test_prepare_without_kept_columns_has_no_metadata_feature(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", numina_rows(2))
    out, _ = builder.prepare_dataset({"train": [path]}, str(tmp_path / "tfds"), "plain")
    assert set(sources.open_split(out, "train")[0]) == {"messages", "source"}


# ---------------------------------------------------------------- bad input


def _error_and_skip(tmp_path, files, match, reason, skipped, kept, fmt=None):
    """Under "error" prepare stops with ``match``; under "skip" it counts ``skipped``."""
    with pytest.raises(records.BadRow, match=match):
        builder.prepare_dataset({"train": files}, str(tmp_path / "e"), "e", row_format=fmt)
    out, pol = builder.prepare_dataset({"train": files}, str(tmp_path / "s"), "s",
                                       policy="skip", row_format=fmt)
    assert dict(pol.counts) == {reason: skipped}
    assert len(sources.open_split(out, "train")) == kept


def test_parquet_missing_column(tmp_path):
    good = write_parquet(tmp_path / "a.parquet", numina_rows(3))
    rows = [{k: v for k, v in r.items() if k != "solution"} for r in numina_rows(5)]
    bad = write_parquet(tmp_path / "b.parquet", rows)
    fmt = records.RowFormat(prompt="problem", response="solution")
    _error_and_skip(tmp_path, [good, bad],
                    rf"b\.parquet:row 0: bad_fields: no column \['solution'\] \(the file has",
                    "bad_fields", 5, 3, fmt)
    # Without flags: a shard with none of the recognised columns.
    other = write_parquet(tmp_path / "c.parquet", [{"text": "x"}] * 2)
    with pytest.raises(records.BadRow, match=r"c\.parquet:row 0: bad_fields: no 'messages', "
                       r"'conversations' or 'prompt'\+'response' column"):
        list(readers.read_rows(other, records.Policy("error")))


def test_parquet_kept_column_missing(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", numina_rows(2))
    with pytest.raises(records.BadRow, match=r"no column \['answer'\] to keep"):
        builder.prepare_dataset({"train": [path]}, str(tmp_path / "o"), "k",
                                row_format=records.RowFormat(keep=("answer",)))


def test_parquet_null_in_messages(tmp_path):
    rows = numina_rows(6)
    rows[1]["messages"] = None
    rows[2]["messages"] = [rows[2]["messages"][0], None]
    rows[4]["messages"][1]["content"] = None
    path = write_parquet(tmp_path / "n.parquet", rows)
    _error_and_skip(tmp_path, [path],
                    r"n\.parquet:row 1: bad_fields: 'messages' must be a list, got NoneType",
                    "bad_fields", 3, 3)
    pol = records.Policy("skip")
    list(readers.read_rows(path, pol))
    assert pol.examples["bad_fields"].startswith(f"{path}:row 1")
    with pytest.raises(records.BadRow, match=r"row 2: bad_fields: messages\[1\] must be an "
                       r"object, got NoneType"):
        records.row_to_conversation(rows[2], f"{path}:row 2")
    with pytest.raises(records.BadRow, match=r"row 4: bad_fields: messages\[1\] field "
                       r"'content' must be a string, got NoneType"):
        records.row_to_conversation(rows[4], f"{path}:row 4")


def test_wrong_role(tmp_path):
    rows = numina_rows(4)
    rows[2]["messages"][1]["role"] = "bot"
    path = write_parquet(tmp_path / "r.parquet", rows)
    _error_and_skip(tmp_path, [path],
                    r"r\.parquet:row 2: unknown_role: messages\[1\]\.role='bot'",
                    "unknown_role", 1, 3)
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "x"}]}
    gz = write_gz(tmp_path / "s.jsonl.gz", [share])
    with pytest.raises(records.BadRow, match=r"s\.jsonl\.gz:1: unknown_role: "
                       r"conversations\[1\]\.from='bing'"):
        list(readers.read_rows(gz, records.Policy("error")))


def test_truncated_parquet_shard_is_an_error_under_both_policies(tmp_path):
    good = write_parquet(tmp_path / "a.parquet", numina_rows(3))
    data = open(write_parquet(tmp_path / "b.parquet", numina_rows(50)), "rb").read()
    bad = tmp_path / "b.parquet"
    bad.write_bytes(data[: len(data) // 2])
    for policy in ("error", "skip"):
        with pytest.raises(records.BadFile, match=rf"{bad}: cannot read as Parquet \(truncated"):
            builder.prepare_dataset({"train": [good, str(bad)]}, str(tmp_path / policy), "t",
                                    policy=policy)
        assert not os.path.exists(tmp_path / policy / "jsonl_sft" / "t" / "1.0.0")


def test_truncated_gzip_shard_names_file_and_last_line(tmp_path):
    path = write_gz(tmp_path / "t.jsonl.gz", [chat_row(f"q{i}", "a" * 50) for i in range(200)])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 40])
    with pytest.raises(records.BadFile, match=r"t\.jsonl\.gz: truncated or corrupt after line "
                       r"\d+: EOFError"):
        list(readers.read_rows(path, records.Policy("skip")))


def test_non_utf8_jsonl_line(tmp_path):
    path = tmp_path / "enc.jsonl"
    lines = [json.dumps(chat_row("a", "b")).encode(),
             '{"prompt": "caf\u00e9", "response": "ok"}'.encode("latin-1"),
             json.dumps(chat_row("c", "d")).encode()]
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")     # a BOM is fine
    _error_and_skip(tmp_path, [str(path)],
                    r"enc\.jsonl:2: bad_encoding: not UTF-8: byte 0xe9 at column 16",
                    "bad_encoding", 1, 2)
    with pytest.raises(records.BadRow, match=r"enc\.jsonl:2: bad_encoding"):
        list(records.read_jsonl(str(path), records.Policy("error")))


def test_split_with_no_valid_rows(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", '{"prompt": "x"}'])
    with pytest.raises(ValueError, match=r"no valid rows; skipped 2 rows"):
        builder.prepare_dataset({"train": [path]}, str(tmp_path / "o"), "none", policy="skip")


# ---------------------------------------------------------------- command line


def test_cli_prepare_parquet_with_column_flags(tmp_path, tiny_tokenizer_dir, capsys):
    d = tmp_path / "data"
    write_parquet(d / "train-00000-of-00002.parquet", numina_rows(4))
    write_parquet(d / "train-00001-of-00002.parquet", numina_rows(4, start=4))
    test = write_parquet(d / "test-00000-of-00001.parquet", numina_rows(2, start=100))
    argv = ["prepare", "--split", f"train={d}/train-*.parquet", "--split", f"test={test}",
            "--out", str(tmp_path / "tfds"), "--name", "numina", "--prompt-column", "problem",
            "--response-column", "solution", "--system-prompt", "Reason step by step.",
            "--keep-columns", "source", "--tokenizer", tiny_tokenizer_dir, "--seq-len", "256",
            "--json"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rows: train=8 test=2 (10 in" in printed and "rows/s)" in printed
    assert "skipped 0 rows" in printed
    stats = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert [(s["split"], s["records"], s["examples"]) for s in stats] == [
        ("train", 8, 8), ("test", 2, 2)]
    rec = sources.open_split(str(tmp_path / "tfds/jsonl_sft/numina/1.0.0"), "test")[0]
    assert records.row_to_conversation(rec, "r")[0] == M("system", "Reason step by step.")
    assert json.loads(rec["metadata"])["source"] in ("olympiads", "cn_k12")


def test_cli_names_file_and_row(tmp_path, capsys):
    rows = numina_rows(3)
    rows[1]["messages"][0]["role"] = "narrator"
    path = write_parquet(tmp_path / "bad.parquet", rows)
    argv = ["prepare", "--split", f"train={path}", "--out", str(tmp_path / "o"), "--name",
            "b", "--seq-len", "0"]
    assert main(argv) == 1
    assert f"error: {path}:row 1: unknown_role" in capsys.readouterr().err
    assert main(argv + ["--policy", "skip"]) == 0
    assert "skipped 1 rows:\n  unknown_role=1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(argv + ["--prompt-column", "problem"])   # a prompt column needs a response column
