"""Token streaming for one prompt: a jitted prefill, then a jitted one-token step per token, and
the text each new token adds, yielded as soon as it is made.

    for delta in stream(model, tokenizer, "What is 7 + 5?", SamplingConfig(max_new_tokens=64)):
        print(delta, end="", flush=True)

The prompt is rendered, padded and prefilled exactly as `generate` does it (same width, same
functions), and the step draws its token as `generate`'s row 0 does (key per row: prompt 0,
continuation 0), so greedy output, and sampled output at the same seed, equal
`generate(model, tokenizer, [prompt], config, seed=seed)[0]` (tests/eval/test_chat_cli.py).
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget_jax.generate.decode import (Prompt, check_context, eos_ids_of, forward_one,
                                         left_pad, prefill, prompt_ids, prompt_width)
from qtarget_jax.generate.sampling import SamplingConfig, row_keys, sample_logits


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_dtype"))
def _prefill(graphdef: Any, state: Any, tokens, positions, segment_ids, *, max_new_tokens: int,
             cache_dtype: str):
    return prefill(nnx.merge(graphdef, state), tokens, positions, segment_ids, max_new_tokens,
                   cache_dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_p"),
                   donate_argnames=("cache",))
def _step(graphdef: Any, state: Any, cache: Any, logits: jax.Array, key: jax.Array,
          step: jax.Array, pos: jax.Array, *, temperature: float, top_p: float):
    """Draws the token of `step` from logits [1, V] and runs it: (token [1] int32, the next
    logits [1, V], the updated cache). The cache is donated: updated in place."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, step)
    tok = sample_logits(logits, keys, temperature, top_p)
    logits, cache = forward_one(nnx.merge(graphdef, state), tok, pos + step, cache)
    return tok, logits, cache


def stream(model: nnx.Module, tokenizer: Any, prompt: Prompt,
           config: SamplingConfig = SamplingConfig(), *, seed: int = 0,
           eos_ids: Sequence[int] | None = None, max_len: int | None = None) -> Iterator[str]:
    """Yields the text of the answer to `prompt` piece by piece, one piece per new token (an
    empty piece while a multi-byte character is incomplete, then one more at the end if the
    text still ends in an undecodable byte). Stops at an EOS id, a stop string
    (its text is not yielded) or after config.max_new_tokens.

    Raises:
      ValueError: a prompt whose tokens + max_new_tokens exceed the context (default
        model.cfg.max_position_embeddings).
    """
    context = max_len or model.cfg.max_position_embeddings
    eos = eos_ids_of(tokenizer, eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids = prompt_ids(tokenizer, prompt)
    check_context("prompt", len(ids), config.max_new_tokens, context)
    tokens, positions, segments = left_pad([ids], pad_id, prompt_width(len(ids), config, context))
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, tokens, positions, segments,
                             max_new_tokens=config.max_new_tokens,
                             cache_dtype=config.cache_dtype)
    key = row_keys(seed, np.zeros(1, np.int32), np.zeros(1, np.int32))
    pos = jnp.asarray(positions[:, -1] + 1)
    out: list[int] = []
    shown = text = ""
    for step in range(config.max_new_tokens):
        tok, logits, cache = _step(graphdef, state, cache, logits, key, jnp.int32(step), pos,
                                   temperature=float(config.temperature),
                                   top_p=float(config.top_p))
        tok = int(tok[0])
        if tok in eos:
            break
        out.append(tok)
        text = tokenizer.decode(out, skip_special_tokens=True)
        cut = [text.find(s) for s in config.stop_strings if s and s in text]
        if cut:
            yield text[len(shown):min(cut)]
            return
        if text.endswith("\ufffd"):          # maybe an incomplete multi-byte character: wait
            yield ""
            continue
        yield text[len(shown):]
        shown = text
    if len(text) > len(shown):               # what was held back, as decoded in the end
        yield text[len(shown):]
