"""`evaluate_model`: exact-match accuracy (greedy and Average@k, `problems.solve`), held-out
loss / perplexity and per-example JSONL, for any Decoder + tokenizer. The CLI
(`python -m qtarget_jax.evaluate`) calls it on a checkpoint or a Hugging Face folder.

The held-out loss is the training loop's own: `train.step.make_eval_step` with the "sft" target
(the NLL of the reference response), so evaluation and training score loss by one code path.

    examples = load_examples("data/synth/test.jsonl", limit=50)
    metrics = evaluate_model(model, tokenizer, examples, num_samples=4, out_path="eval.jsonl")
    metrics["eval/accuracy"], metrics["eval/avg@4"], metrics["eval/ppl"]
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from qtarget_jax.data.chat import tokenize_conversation, to_training_example
from qtarget_jax.data.records import Message
from qtarget_jax.problems import EvalExample, solve
from qtarget_jax.train.state import TrainState
from qtarget_jax.train.step import make_eval_step, make_loss_fn


def _replicated_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """A sharding that holds a whole array on the devices of `sharding` (batch and metrics)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    raise ValueError(f"heldout_loss: model params placed by {type(sharding).__name__}; "
                     "expected a NamedSharding or one device")


def heldout_loss(model: nnx.Module, tokenizer: Any, examples: Sequence[EvalExample], *,
                 seq_len: int = 256, batch_size: int = 16) -> dict[str, float]:
    """Token-mean NLL of the reference responses (assistant tokens only, as in training) and
    its perplexity: {"loss", "ppl", "tokens"} floats. Each example is one row of a
    [batch_size, seq_len] int32 batch scored by the training loop's eval step (fused "sft"
    loss, no [B, T, V] logits). An example longer than seq_len is an error naming it (no
    truncation), and so is one without a reference response."""
    rows = []
    for ex in examples:
        if ex.reference is None:
            raise ValueError(f"{ex.id}: no reference response for the held-out loss (pass a "
                             "response column, or skip the loss)")
        conv = [Message(m["role"], m["content"]) for m in ex.prompt]
        conv.append(Message("assistant", ex.reference))
        ids, mask = tokenize_conversation(tokenizer, conv, ex.id)
        rows.append(to_training_example(ids, mask, seq_len, truncate=False, where=ex.id))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                       rng=jnp.zeros((2,), jnp.uint32), rest=rest)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    rep = _replicated_like(jax.tree.leaves(state_shardings.params)[0])
    eval_step = make_eval_step(state_shardings, rep, rep, graphdef=graphdef,
                               loss_fn=make_loss_fn("sft", "token", fused=True))
    batch_size = min(batch_size, len(rows))       # no all-padding rows for a small set
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))
    total, count = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        tokens = np.zeros((batch_size, seq_len), np.int32)
        labels = np.full((batch_size, seq_len), -100, np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)
        for i, r in enumerate(rows[start:start + batch_size]):
            tokens[i, :len(r)], labels[i, :len(r)], segments[i, :len(r)] = r.tokens, r.labels, 1
        batch = {"tokens": tokens, "positions": positions, "segment_ids": segments,
                 "labels": labels, "loss_mask": labels != -100}
        sums = jax.device_get(eval_step(state, batch))
        total, count = total + float(sums["loss_sum"]), count + float(sums["denominator"])
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
      max_new_tokens, batch_size, num_samples, temperature, top_p, seed, out_path: as
        `problems.solve` (which writes the per-example JSONL).
      loss_seq_len: seq_len for the held-out loss; None skips the loss.
    Returns:
      flat dict: `{prefix}accuracy`, `parse_errors`, `n`, `avg@k` and `pass@k` (num_samples >
      0), `loss`, `ppl` (loss_seq_len set). Unparsable outputs count as wrong.
    """
    metrics = solve(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, num_samples=num_samples, temperature=temperature,
                    top_p=top_p, seed=seed, out_path=out_path, prefix=prefix)
    if loss_seq_len is not None:
        loss = heldout_loss(model, tokenizer, examples, seq_len=loss_seq_len)
        metrics.update({f"{prefix}loss": float(loss["loss"]), f"{prefix}ppl": float(loss["ppl"])})
    return metrics
