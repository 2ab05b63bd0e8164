"""`evaluate_model`: exact-match accuracy (greedy and Average@k), held-out loss / perplexity and
per-example JSONL, for any Decoder + tokenizer. The training loop calls it every N steps; the
CLI (`python -m qtarget_jax.evaluate`) calls it on a checkpoint or a Hugging Face folder.

    examples = load_examples("data/synth/test.jsonl", limit=50)
    metrics = evaluate_model(model, tokenizer, examples, num_samples=4, out_path="eval.jsonl")
    metrics["eval/accuracy"], metrics["eval/avg@4"], metrics["eval/ppl"]
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget_jax.evaluate.answers import extract_answer, gold_answer, score
from qtarget_jax.generate import SamplingConfig, generate_many


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
    from qtarget_jax.data import readers
    from qtarget_jax.data.records import Policy, conversation_to_dicts, row_to_conversation

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


def _batch_nll(graphdef, state, tokens, labels, segment_ids):
    from qtarget_jax.targets import qtarget_loss_sums

    model = nnx.merge(graphdef, state)
    logits = model(tokens, None, segment_ids)
    loss_sum, denom, _ = qtarget_loss_sums(logits, labels, labels != -100, "sft")
    return loss_sum, denom


_jit_batch_nll = jax.jit(_batch_nll, static_argnums=0)


def heldout_loss(model: nnx.Module, tokenizer: Any, examples: Sequence[EvalExample], *,
                 seq_len: int = 256, batch_size: int = 16) -> dict[str, float]:
    """Token-mean NLL of the reference responses (assistant tokens only, as in training) and
    its perplexity. An example longer than seq_len is an error naming it (no truncation), and
    so is one without a reference response."""
    from qtarget_jax.data.chat import tokenize_conversation, to_training_example
    from qtarget_jax.data.records import Message

    rows = []
    for ex in examples:
        if ex.reference is None:
            raise ValueError(f"{ex.id}: no reference response for the held-out loss (pass a "
                             "response column, or skip the loss)")
        conv = [Message(m["role"], m["content"]) for m in ex.prompt]
        conv.append(Message("assistant", ex.reference))
        ids, mask = tokenize_conversation(tokenizer, conv, ex.id)
        rows.append(to_training_example(ids, mask, seq_len, truncate=False, where=ex.id))
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, len(rows))       # no all-padding rows for a small set
    total, count = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = np.zeros((batch_size, seq_len), np.int32)
        labels = np.full((batch_size, seq_len), -100, np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)
        for i, r in enumerate(chunk):
            tokens[i, :len(r)], labels[i, :len(r)], segments[i, :len(r)] = r.tokens, r.labels, 1
        s, d = _jit_batch_nll(graphdef, state, jnp.asarray(tokens), jnp.asarray(labels),
                              jnp.asarray(segments))
        total, count = total + float(s), count + float(d)
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}


def evaluate_model(model: nnx.Module, tokenizer: Any, examples: Sequence[EvalExample], *,
                   max_new_tokens: int = 128, batch_size: int = 32, num_samples: int = 0,
                   temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
                   loss_seq_len: int | None = 256, out_path: str | None = None,
                   prefix: str = "eval/") -> dict[str, float]:
    """Greedy exact-match accuracy, Average@k over `num_samples` sampled outputs, held-out loss.

    Args:
      model, tokenizer: the Decoder and its chat tokenizer.
      examples: from `load_examples`.
      max_new_tokens, batch_size: decoding length bound and prompts per decode call (each
        prompt is prefilled once and decoded 1 + num_samples times, so a call holds
        batch_size * (1 + num_samples) rows).
      num_samples: k sampled outputs per problem (temperature, top_p); 0 = greedy only.
      loss_seq_len: seq_len for the held-out loss; None skips the loss.
      out_path: write one JSON object per example (outputs, parsed answers, correctness).
    Returns:
      flat dict: `{prefix}accuracy`, `parse_errors`, `n`, `avg@k` and `pass@k` (num_samples >
      0), `loss`, `ppl` (loss_seq_len set). Unparsable outputs count as wrong.
    """
    prompts = [ex.prompt for ex in examples]
    names = [ex.id for ex in examples]
    configs = [SamplingConfig(max_new_tokens=max_new_tokens)]
    configs += [SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p)] * num_samples
    # One prefill per prompt serves the greedy decode and all k samples.
    groups = generate_many(model, tokenizer, prompts, configs, seed=seed,
                           batch_size=min(batch_size, len(prompts)), names=names)
    records = []
    for ex, (gen, *samples) in zip(examples, groups):
        s = score(gen.text, ex.gold)
        rec = {"id": ex.id, "gold": ex.gold, "output": gen.text,
               "finish_reason": gen.finish_reason, "extracted": s.extracted,
               "normalized": s.normalized, "method": s.method, "correct": s.correct,
               "parse_error": s.parse_error}
        if num_samples > 0:
            rec["samples"] = [g.text for g in samples]
            rec["samples_correct"] = [score(g.text, ex.gold).correct for g in samples]
        records.append(rec)
    n = len(examples)
    metrics = {"accuracy": sum(r["correct"] for r in records) / n,
               "parse_errors": float(sum(r["parse_error"] is not None for r in records)),
               "n": float(n)}
    if num_samples > 0:
        per_problem = [np.mean(r["samples_correct"]) for r in records]
        metrics[f"avg@{num_samples}"] = float(np.mean(per_problem))
        metrics[f"pass@{num_samples}"] = float(np.mean([any(r["samples_correct"])
                                                        for r in records]))
    if loss_seq_len is not None:
        loss = heldout_loss(model, tokenizer, examples, seq_len=loss_seq_len)
        metrics.update(loss=loss["loss"], ppl=loss["ppl"])
    if out_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}
