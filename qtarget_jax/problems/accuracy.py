"""`solve`: greedy exact-match accuracy and Average@k / pass@k of a model on `EvalExample`s,
with per-example JSONL. The training loop calls it on `eval.problems`; `evaluate_model` adds
the held-out loss to it.

    metrics = solve(model, tokenizer, examples, num_samples=4, out_path="eval.jsonl")
    metrics["eval/accuracy"], metrics["eval/avg@4"]
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from flax import nnx

from qtarget_jax.generate import SamplingConfig, generate_many
from qtarget_jax.problems.answers import score
from qtarget_jax.problems.examples import EvalExample


def solve(model: nnx.Module, tokenizer: Any, examples: Sequence[EvalExample], *,
          max_new_tokens: int = 128, batch_size: int = 32, num_samples: int = 0,
          temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
          out_path: str | None = None, prefix: str = "eval/") -> dict[str, float]:
    """Greedy exact-match accuracy and Average@k over `num_samples` sampled outputs.

    Args:
      model, tokenizer: the Decoder and its chat tokenizer.
      examples: from `load_examples`.
      max_new_tokens, batch_size: decoding length bound and prompts per decode call (each
        prompt is prefilled once and decoded 1 + num_samples times, so a call holds
        batch_size * (1 + num_samples) rows).
      num_samples: k sampled outputs per problem (temperature, top_p); 0 = greedy only.
      out_path: write one JSON object per example (outputs, parsed answers, correctness).
    Returns:
      flat dict of floats: `{prefix}accuracy`, `parse_errors`, `n`, and `avg@k`, `pass@k`
      when num_samples > 0. Unparsable outputs count as wrong.
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
    if out_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}
