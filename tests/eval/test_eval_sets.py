"""Evaluation sets as users have them: GSM8K / MATH-500 / NuminaMath-CoT rows in Parquet, JSONL
and JSONL.gz, gold answers from `#### N`, `\\boxed{}` or a bare answer column, and the CLI."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qtarget_jax.evaluate import load_examples
from qtarget_jax.evaluate.__main__ import main
from qtarget_jax.problems.answers import gold_answer, normalize_answer

GSM8K = [  # openai/gsm8k columns
    {"question": "Tom has 3 apples and buys 4 more. How many?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many in 3 boxes?",
     "answer": "3 * 12 = <<3*12=36>>36\n#### 36"},
]
MATH500 = [  # HuggingFaceH4/MATH-500 columns
    {"problem": "Compute $\\frac{7}{3} + \\frac{7}{3}$.", "answer": "\\frac{14}{3}",
     "solution": "Adding gives $\\boxed{\\frac{14}{3}}$.", "subject": "Algebra", "level": 1,
     "unique_id": "test/algebra/1.json"},
    {"problem": "What is $2^{10}$?", "answer": "1024",
     "solution": "$2^{10} = \\boxed{1024}$.", "subject": "Algebra", "level": 1,
     "unique_id": "test/algebra/2.json"},
]


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def _jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7\n#### 7", ("7", "hash")),
    ("#### 1,000", ("1,000", "hash")),
    ("thus $\\boxed{\\frac{1}{2}}$ and 9", ("\\frac{1}{2}", "boxed")),
    ("\\frac{14}{3}", ("\\frac{14}{3}", "plain")),      # bare answer: not its last number
    ("  42 ", ("42", "plain")),
    ("   ", (None, "none")),
])
def test_gold_answer(text, want):
    assert gold_answer(text) == want


def test_gsm8k_parquet_question_rows(tmp_path):
    ex = load_examples(_parquet(tmp_path / "test-00000-of-00001.parquet", GSM8K))
    assert [e.gold for e in ex] == ["7", "36"]
    assert ex[0].prompt == [{"role": "user", "content": GSM8K[0]["question"]}]
    assert ex[0].reference == GSM8K[0]["answer"]  # a worked solution: also the reference
    assert ex[1].id == f"{tmp_path}/test-00000-of-00001.parquet:row 1"


def test_math500_jsonl_bare_answer_and_solution_reference(tmp_path):
    ex = load_examples(_jsonl(tmp_path / "test.jsonl", MATH500))
    assert [e.id for e in ex] == ["test/algebra/1.json", "test/algebra/2.json"]
    assert [e.gold for e in ex] == ["\\frac{14}{3}", "1024"]
    assert normalize_answer(ex[0].gold) == "14/3"
    assert [e.reference for e in ex] == [r["solution"] for r in MATH500]
    assert ex[0].prompt[0]["content"] == MATH500[0]["problem"]
    # The gold from the solution's \boxed{} instead, with a system prompt:
    ex = load_examples(str(tmp_path / "test.jsonl"), answer_column="solution",
                       system_prompt="Put the answer in \\boxed{}.")
    assert [e.gold for e in ex] == ["\\frac{14}{3}", "1024"]
    assert [m["role"] for m in ex[0].prompt] == ["system", "user"]


def test_named_columns_without_reference(tmp_path):
    rows = [{"q": "2 + 2?", "a": "4"}, {"q": "3 + 3?", "a": 6}]
    path = _jsonl(tmp_path / "qa.jsonl.gz", rows, gz=True)
    ex = load_examples(path, question_column="q", answer_column="a")
    assert [(e.prompt[0]["content"], e.gold, e.reference) for e in ex] == [
        ("2 + 2?", "4", None), ("3 + 3?", "6", None)]
    with pytest.raises(ValueError, match=r"qa\.jsonl\.gz:1: row is neither a chat row"):
        load_examples(path)


def test_numina_chat_rows_glob_and_limit(tmp_path):
    rows = [{"source": "olympiads", "problem": f"{i} + 1?",
             "solution": f"It is $\\boxed{{{i + 1}}}$.",
             "messages": [{"role": "user", "content": f"{i} + 1?"},
                          {"role": "assistant", "content": f"It is $\\boxed{{{i + 1}}}$."}]}
            for i in range(6)]
    _parquet(tmp_path / "test-00000-of-00002.parquet", rows[:3])
    _parquet(tmp_path / "test-00001-of-00002.parquet", rows[3:])
    ex = load_examples(str(tmp_path / "test-*.parquet"))
    assert [e.gold for e in ex] == [str(i + 1) for i in range(6)]   # chat row: from \boxed
    assert ex[4].prompt == [{"role": "user", "content": "4 + 1?"}]
    assert ex[4].reference == "It is $\\boxed{5}$."
    assert len(load_examples(str(tmp_path), limit=4)) == 4            # a folder of shards


@pytest.mark.parametrize("rows,kwargs,match", [
    ([{"question": "q?", "answer": "  "}], {}, r"\.parquet:row 0: column 'answer' must be"),
    ([{"question": "q?", "answer": None}], {}, r"\.parquet:row 0: column 'answer' must be"),
    ([{"question": "q?", "answer": "4"}], {"answer_column": "gold"},
     r"\.parquet:row 0: row has no 'gold' column"),
    ([{"question": "q?"}], {}, r"\.parquet:row 0: row has no 'answer' column"),
])
def test_bad_eval_rows_name_file_and_row(tmp_path, rows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_examples(_parquet(tmp_path / "bad.parquet", rows), **kwargs)


def test_cli_gsm8k_parquet_and_math500_without_reference(tiny_model, tokenizer, tmp_path,
                                                         capsys):
    from qtarget_jax.models.export import export_hf

    export_hf(tiny_model, tiny_model.cfg, str(tmp_path / "hf"), tokenizer=tokenizer)
    data = _parquet(tmp_path / "gsm8k.parquet", GSM8K)
    out = main(["--model", str(tmp_path / "hf"), "--data", data, "--max-new-tokens", "4",
                "--seq-len", "96", "--out", str(tmp_path / "o.jsonl")])
    assert out["eval/n"] == 2 and "eval/loss" in out
    recs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in recs] == ["7", "36"]
    capsys.readouterr()
    math = _jsonl(tmp_path / "math.jsonl", [{k: r[k] for k in ("problem", "answer")}
                                            for r in MATH500])
    out = main(["--model", str(tmp_path / "hf"), "--data", math, "--max-new-tokens", "4"])
    assert out["eval/n"] == 2 and "eval/loss" not in out
    assert "2 of 2 examples have no reference response" in capsys.readouterr().err
