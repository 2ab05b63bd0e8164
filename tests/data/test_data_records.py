"""Row validation: each kind of bad input, its reason, and the file:line in the error."""
import json

import pytest
from data_helpers import chat_row, write_jsonl

from qtarget_jax.data import records

BAD_LINES = [  # (line, reason)
    ('{"prompt": "a", "response": "b"', "malformed_json"),
    ("[1, 2]", "malformed_json"),
    ('{"prompt": "a"}', "bad_fields"),
    ('{"prompt": "a", "response": 7}', "bad_fields"),
    ('{"messages": [{"role": "user"}]}', "bad_fields"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', "bad_fields"),
    ('{"messages": "hi"}', "bad_fields"),
    ('{"messages": []}', "bad_fields"),
    ('{"text": "only text"}', "bad_fields"),
    ('{"messages": [], "prompt": "a", "response": "b"}', "bad_fields"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     "unknown_role"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no_assistant_turn"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}',
     "no_assistant_turn"),
    ('{"prompt": "a", "response": ""}', "empty_response"),
    ('{"prompt": "a", "response": "  \\n"}', "empty_response"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_reason(line, reason):
    with pytest.raises(records.BadRow) as e:
        records.parse_jsonl_line(line, "f.jsonl:3")
    assert e.value.reason == reason
    assert str(e.value).startswith("f.jsonl:3: " + reason)


def test_good_formats_normalise():
    conv = records.parse_jsonl_line('{"prompt": "p", "response": "r", "id": 1}', "x:1")
    assert conv == (records.Message("user", "p"), records.Message("assistant", "r"))
    row = chat_row("u", "a", system="s")
    conv = records.parse_jsonl_line(json.dumps(row), "x:1")
    assert [m.role for m in conv] == ["system", "user", "assistant"]
    # tfds records: text as bytes, messages as parallel arrays.
    rec = {"messages": {"role": [b"user", b"assistant"], "content": [b"q", b"a"]}}
    assert records.row_to_conversation(rec, "ds[0]") == (
        records.Message("user", "q"), records.Message("assistant", "a"))


def test_read_jsonl_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat_row("a", "b"), "", "{not json"])
    with pytest.raises(records.BadRow, match=r"d\.jsonl:3: malformed_json"):
        list(records.read_jsonl(path, records.Policy("error")))


def test_skip_policy_counts_by_reason(tmp_path):
    rows = [chat_row("a", "b")] + [line for line, _ in BAD_LINES]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    pol = records.Policy("skip")
    kept = list(records.read_jsonl(path, pol))
    assert [w for w, _ in kept] == [f"{path}:1"]
    expected = {}
    for _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(pol.counts) == expected
    summary = pol.summary()
    assert summary.startswith(f"skipped {len(BAD_LINES)} rows")
    assert f"first: {path}:2: malformed_json" in summary


def test_unknown_policy_rejected():
    with pytest.raises(ValueError, match="'drop'"):
        records.Policy("drop")
