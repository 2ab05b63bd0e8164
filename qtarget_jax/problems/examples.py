"""Evaluation problems: `EvalExample` (prompt turns, reference response, gold answer) read
from JSONL, JSONL.gz or Parquet by `load_examples`, for the evaluate CLI and for the accuracy
the training loop measures on `eval.problems`.

    examples = load_examples("data/synth/test.jsonl", limit=50)
    examples[0].prompt, examples[0].reference, examples[0].gold
"""
from __future__ import annotations

import dataclasses

from qtarget_jax.data import readers
from qtarget_jax.data.records import Policy, conversation_to_dicts, row_to_conversation
from qtarget_jax.problems.answers import extract_answer, gold_answer


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One held-out problem: the prompt turns, the reference answer turn and the gold answer."""

    id: str
    prompt: list[dict[str, str]]     # messages before the last assistant turn
    reference: str | None            # reference response (held-out loss); None: none given
    gold: str                        # final answer compared by exact match


_QUESTION_KEYS = ("question", "problem", "prompt")   # GSM8K, MATH / MATH-500, others


def _is_chat_row(row: dict) -> bool:
    return ("messages" in row or "conversations" in row
            or ("prompt" in row and "response" in row))


def _text(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise ValueError(f"{where}: row has no {key!r} column (it has {sorted(row)})")
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: column {key!r} must be non-empty text, got {value!r:.60}")
    return value


def _question_example(row: dict, where: str, question: str, answer: str | None,
                      response: str | None, system_prompt: str | None) -> EvalExample:
    """A GSM8K / MATH-style row: question column, answer column, optional reference column."""
    if answer is None:
        answer = next((k for k in ("answer", "solution") if k in row), "answer")
    gold, method = gold_answer(_text(row, answer, where))
    if gold is None:
        raise ValueError(f"{where}: empty gold answer in column {answer!r}")
    if response is not None:
        reference = _text(row, response, where)
    elif answer != "solution" and isinstance(row.get("solution"), str):
        reference = row["solution"]             # MATH-500: answer + worked solution
    elif method in ("hash", "boxed"):
        reference = _text(row, answer, where)   # GSM8K: the answer is a worked solution
    else:
        reference = None
    prompt = [{"role": "user", "content": _text(row, question, where)}]
    if system_prompt is not None:
        prompt.insert(0, {"role": "system", "content": system_prompt})
    return EvalExample(_row_id(row, where), prompt, reference, gold)


def _row_id(row: dict, where: str) -> str:
    for key in ("id", "unique_id"):
        if row.get(key) is not None:
            return str(row[key])
    return where


def load_examples(path: str, limit: int | None = None, *, question_column: str | None = None,
                  answer_column: str | None = None, response_column: str | None = None,
                  system_prompt: str | None = None) -> list[EvalExample]:
    """Reads an evaluation set from JSONL, JSONL.gz or Parquet (a file, glob, folder of shards
    or comma-separated list; see `qtarget_jax.data.readers`), streaming up to ``limit`` rows.

    Two kinds of rows:
    - chat rows (``messages``, ShareGPT ``conversations``, ``prompt`` + ``response``; e.g.
      NuminaMath-CoT): the prompt is every turn before the last assistant turn, whose content
      is the reference. Gold: the ``answer_column`` (default ``answer``) when the row has it,
      else the answer in the reference (``#### N``, ``\\boxed{}``, last number).
    - question rows (GSM8K ``question``/``answer``, MATH-500 ``problem``/``solution``/``answer``):
      ``question_column`` (default ``question``, else ``problem``, else ``prompt``, for rows
      that are not chat rows) is the user turn, after ``system_prompt`` if given. Gold: `answers.gold_answer` of
      ``answer_column`` (default ``answer``, else ``solution``): its ``#### N``, its
      ``\\boxed{X}``, else its whole text. Reference (for the held-out loss):
      ``response_column``; else a ``solution`` column; else the answer text when it is a worked
      solution (it has ``####`` or ``\\boxed{}``); else none.
    Raises:
      ValueError: naming ``file:LINE`` / ``file:row N`` for a bad row or one without a gold
        answer; `records.BadFile` for an unreadable file.
    """
    out: list[EvalExample] = []
    policy = Policy("error")
    for file in readers.expand_paths(path):
        for _, where, row in readers.read_dicts(file, policy):
            if limit is not None and len(out) >= limit:
                break
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a row must be an object, got {type(row).__name__}")
            question = question_column
            if question is None and not _is_chat_row(row):
                question = next((k for k in _QUESTION_KEYS if k in row), None)
                if question is None:
                    raise ValueError(
                        f"{where}: row is neither a chat row (messages, conversations, "
                        f"prompt+response) nor a question row ({', '.join(_QUESTION_KEYS)}); "
                        f"it has {sorted(row)}: pass --question-column and --answer-column")
            if question is not None:
                out.append(_question_example(row, where, question, answer_column,
                                             response_column, system_prompt))
                continue
            messages = conversation_to_dicts(row_to_conversation(row, where))
            if system_prompt is not None and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            reference = messages[last]["content"]
            key = answer_column or "answer"
            if row.get(key) is not None:
                gold, _ = gold_answer(str(row[key]))
            elif answer_column is not None:
                raise ValueError(f"{where}: row has no {key!r} column (it has {sorted(row)})")
            else:
                gold, _ = extract_answer(reference)
            if gold is None or not str(gold).strip():
                raise ValueError(f"{where}: no gold answer: no {key!r} column and none "
                                 f"parsable from the reference response {reference[-60:]!r}")
            out.append(EvalExample(_row_id(row, where), messages[:last], reference, str(gold)))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no examples read")
    return out
