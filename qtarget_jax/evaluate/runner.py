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

from qtarget_jax.evaluate.answers import extract_answer, score
from qtarget_jax.generate import SamplingConfig, generate_many


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One held-out problem: the prompt turns, the reference answer turn and the gold answer."""

    id: str
    prompt: list[dict[str, str]]     # messages before the last assistant turn
    reference: str                   # content of the last assistant turn
    gold: str                        # final answer compared by exact match


def load_examples(path: str, limit: int | None = None) -> list[EvalExample]:
    """Reads a JSONL of chat rows (`messages` or `prompt`/`response`, the data formats).

    The gold answer is the row's `answer` key when present, else the answer parsed from the
    reference response (`#### N`, `\\boxed{}`, last number). Raises ValueError naming file:line
    for a bad row or a row without a readable gold answer.
    """
    from qtarget_jax.data.records import conversation_to_dicts, row_to_conversation

    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON: {e}") from None
            messages = conversation_to_dicts(row_to_conversation(row, where))
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            reference = messages[last]["content"]
            gold = row.get("answer") if isinstance(row, dict) else None
            if gold is None:
                gold, _ = extract_answer(reference)
            if gold is None or not str(gold).strip():
                raise ValueError(f"{where}: no gold answer: no 'answer' key and none parsable "
                                 f"from the reference response {reference[-60:]!r}")
            out.append(EvalExample(str(row.get("id", where)), messages[:last], reference,
                                   str(gold)))
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
    its perplexity. An example longer than seq_len is an error naming it (no truncation)."""
    from qtarget_jax.data.chat import tokenize_conversation, to_training_example
    from qtarget_jax.data.records import Message

    rows = []
    for ex in examples:
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
