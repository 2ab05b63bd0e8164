"""Batched KV-cache decoding on the training model: greedy, temperature and top-p sampling.

    gens = generate(model, tokenizer, ["What is 2 + 3?"], SamplingConfig(max_new_tokens=64))
    gens[0].text, gens[0].finish_reason        # "2 + 3 = 5 ...", "eos" | "stop" | "length"
    greedy, sampled = SamplingConfig(max_new_tokens=64), SamplingConfig(64, temperature=0.7)
    groups = generate_many(model, tokenizer, prompts, [greedy] + [sampled] * 4)  # [P][5]

How it runs:
  1. Prompts (strings are wrapped as one user turn) are rendered with the chat template plus the
     generation prompt and tokenised like `data/chat.py` does it (text cut, then tokenised with
     add_special_tokens=False), so inference sees exactly the training prompt tokens.
  2. Rows are left-padded to a common width (rounded up to `pad_multiple` so few shapes compile):
     pad slots get segment_ids 0, real tokens 1 and positions 0, 1, ... per row, which is what
     `Decoder(..., cache=)` expects (docs/models.md, KV cache).
  3. One jitted function does the prefill (logits of the last prompt position only) and a
     `lax.while_loop` of one-token steps over the model's KVCache; a row is finished at an EOS
     id, the loop ends when all rows are finished or after `max_new_tokens`.
     `generate_many` decodes each prompt several times (greedy + k samples) from one prefill:
     the prompt's keys/values become a shared prefix of the cache (models/cache.py,
     SharedPrefix), read once per prompt per step, not copied per continuation.
  4. Stop strings are applied on the host to the decoded text (the text is cut before the first
     stop string, finish_reason "stop"); the device loop only knows EOS ids.

Sharding: with `mesh`, the batch is placed over LOGICAL_RULES["batch"] (("data", "fsdp")) and the
model's params keep whatever sharding they have; jit propagates it through the same forward code
as training.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qtarget_jax.generate.sampling import SamplingConfig, row_keys, sample_logits
from qtarget_jax.logical_axes import logical_to_spec
from qtarget_jax.models.cache import with_shared_prefix

Prompt = str | list[dict[str, str]]  # a user message, or a chat (list of role/content dicts)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One row's result: decoded text (stop string excluded), its token ids and why it ended."""

    text: str
    token_ids: list[int]   # generated ids, EOS excluded
    finish_reason: str     # "eos" | "stop" | "length"
    prompt_tokens: int


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Chat-rendered prompt ids, generation prompt included, as training tokenises prompts."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pads token lists to `width`.

    Returns:
      tokens [B, width] int32 (pad_id in pad slots), positions [B, width] int32 (0 in pad slots,
      then 0, 1, ... over the real tokens), segment_ids [B, width] int32 (0 pad, 1 real).
    """
    b = len(rows)
    tokens = np.full((b, width), pad_id, np.int32)
    positions = np.zeros((b, width), np.int32)
    segments = np.zeros((b, width), np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        if n == 0 or n > width:
            raise ValueError(f"left_pad: row {i} has {n} tokens; need 1..{width}")
        tokens[i, width - n:] = row
        positions[i, width - n:] = np.arange(n)
        segments[i, width - n:] = 1
    return tokens, positions, segments


def prefill(model: nnx.Module, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
            max_new_tokens: int, cache_dtype: str) -> tuple[jax.Array, Any]:
    """Runs the left-padded prompts [B, P] int32 through a new cache of P + max_new_tokens
    slots; returns (logits [B, V] float32 of the last prompt position, the KVCache)."""
    b, p = tokens.shape
    cache = model.init_cache(b, p + max_new_tokens, jnp.dtype(cache_dtype))
    hidden, cache = model(tokens, positions, segment_ids, return_hidden=True, cache=cache)
    return model.logits(hidden[:, -1]), cache


def forward_one(model: nnx.Module, tok: jax.Array, pos: jax.Array, cache: Any
                ) -> tuple[jax.Array, Any]:
    """One decode step: tokens [B] int32 at positions [B] int32 -> (logits [B, V] float32 of
    the next token, the updated cache)."""
    ones = jnp.ones((tok.shape[0], 1), jnp.int32)
    logits, cache = model(tok[:, None], pos[:, None], ones, cache=cache)
    return logits[:, -1], cache


def _repeat_rows(tree: Any, repeats: int, batch_axis: int) -> Any:
    return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=batch_axis), tree)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_ids",
                                             "temperatures", "top_p", "cache_dtype"))
def decode(graphdef: Any, state: Any, tokens: jax.Array, positions: jax.Array,
           segment_ids: jax.Array, keys: jax.Array, *, max_new_tokens: int,
           eos_ids: tuple[int, ...], temperatures: tuple[float, ...], top_p: float,
           cache_dtype: str) -> tuple[jax.Array, jax.Array]:
    """Prefill + token-by-token decoding over the model's KV cache, under one jit.

    Each prompt is prefilled once and decoded R = len(temperatures) times (for example one
    greedy and k sampled continuations): the prompts' cache becomes the shared prefix of a
    cache of B * R rows (`with_shared_prefix`) and the last logits are repeated R times, so
    output row i * R + r is prompt i decoded at temperatures[r].

    Args:
      graphdef, state: `nnx.split(model)` (graphdef static).
      tokens, positions, segment_ids: [B, P] int32 left-padded prompts (see `left_pad`).
      keys: [B*R] PRNG keys, one per output row (`sampling.row_keys`; unused when every
        temperature is 0): row k draws its token of step s from fold_in(keys[k], s).
      temperatures: R temperatures (0 = greedy), static.
    Returns:
      out [B*R, N] int32 generated ids (N = max_new_tokens; pad/EOS after a row's end is the
      EOS id it stopped on, repeated) and length [B*R] int32: generated tokens before the EOS
      (or N).
    """
    b = tokens.shape[0]
    reps = len(temperatures)
    # The prompts' cache (P slots) becomes the decode cache's shared prefix: each prompt's keys
    # are stored and read once for its R rows, which own only max_new_tokens slots each.
    logits, prompts = prefill(nnx.merge(graphdef, state), tokens, positions, segment_ids, 0,
                              cache_dtype)
    cache = with_shared_prefix(prompts, reps, max_new_tokens)
    next_pos = positions[:, -1] + 1                         # [B] per-row real length
    if len(set(temperatures)) == 1:
        temperature = float(temperatures[0])                # one static temperature
    else:                                                   # row i*R + r: temperatures[r]
        temperature = jnp.tile(jnp.asarray(temperatures, jnp.float32), b)
    if reps > 1:                                            # rows i*R + r share prompt i
        logits, next_pos = _repeat_rows((logits, next_pos), reps, 0)
        b = b * reps
    eos = jnp.asarray(eos_ids, jnp.int32)
    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    length = jnp.full((b,), max_new_tokens, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, last_logits, out, length, done, params = carry
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        tok = sample_logits(last_logits, step_keys, temperature, top_p)
        prev = jnp.where(step > 0, out[:, jnp.maximum(step - 1, 0)], tok)
        tok = jnp.where(done, prev, tok)                   # a finished row repeats its EOS
        out = out.at[:, step].set(tok)
        hit = jnp.any(tok[:, None] == eos[None, :], axis=-1) & ~done
        length = jnp.where(hit, step, length)
        done = done | hit
        # The params ride in the carry and the model is merged inside the body: nnx.scan
        # (scan_layers) refuses modules or arrays from the outer trace level.
        logits, cache = forward_one(nnx.merge(graphdef, params), tok, next_pos + step, cache)
        return step + 1, cache, logits, out, length, done, params

    carry = (jnp.zeros((), jnp.int32), cache, logits, out, length, done, state)
    _, _, _, out, length, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, length


def check_context(name: str, prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """Raises ValueError naming the prompt when its tokens + max_new_tokens exceed the context."""
    if prompt_tokens + max_new_tokens > context:
        raise ValueError(f"generate: {name}: prompt has {prompt_tokens} tokens + max_new_tokens "
                         f"{max_new_tokens} > context length {context}")


def prompt_width(longest: int, config: SamplingConfig, context: int) -> int:
    """The left-padded prompt width: `longest` rounded up to config.pad_multiple, within the
    context left after max_new_tokens."""
    width = -(-longest // config.pad_multiple) * config.pad_multiple
    return min(width, context - config.max_new_tokens)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def eos_ids_of(tokenizer: Any, eos_ids: Sequence[int] | None) -> tuple[int, ...]:
    if eos_ids is not None:
        ids = tuple(int(i) for i in eos_ids)
    else:
        ids = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
    if not ids:
        raise ValueError("generate: the tokenizer has no eos_token_id; pass eos_ids=[...]")
    return ids


def generate(model: nnx.Module, tokenizer: Any, prompts: Sequence[Prompt],
             config: SamplingConfig = SamplingConfig(), *, seed: int = 0,
             batch_size: int | None = None, eos_ids: Sequence[int] | None = None,
             names: Sequence[str] | None = None, mesh: Mesh | None = None,
             max_len: int | None = None) -> list[Generation]:
    """Decodes every prompt; returns one Generation per prompt, in order.

    Args:
      model: a Decoder (any params sharding). tokenizer: with a chat template.
      prompts: user-message strings or chats (lists of {"role", "content"}).
      config: SamplingConfig. seed: sampling seed; each row has its own key (prompt index,
        continuation index: `sampling.row_keys`), so a sample does not depend on the batching.
      batch_size: rows per decode call (default all); the last batch is filled with copies of
        its first prompt so every call has the same shape.
      eos_ids: token ids that end a row (default tokenizer.eos_token_id).
      names: one name per prompt for error messages (default "prompt[i]").
      mesh: place each batch over the "batch" rule's axes (LOGICAL_RULES) of this mesh.
      max_len: the context length (default model.cfg.max_position_embeddings).
    Raises:
      ValueError: a prompt whose tokens plus max_new_tokens exceed the context, naming it.
    """
    groups = generate_many(model, tokenizer, prompts, [config], seed=seed, batch_size=batch_size,
                           eos_ids=eos_ids, names=names, mesh=mesh, max_len=max_len)
    return [g[0] for g in groups]


def generate_many(model: nnx.Module, tokenizer: Any, prompts: Sequence[Prompt],
                  configs: Sequence[SamplingConfig], *, seed: int = 0,
                  batch_size: int | None = None, eos_ids: Sequence[int] | None = None,
                  names: Sequence[str] | None = None, mesh: Mesh | None = None,
                  max_len: int | None = None) -> list[list[Generation]]:
    """Decodes every prompt once per config, prefilling each prompt once.

    For evaluation: `configs = [greedy] + [sampled] * k` gives the greedy answer and k samples
    of each prompt from one prefill (the cache is copied R = len(configs) times).

    Args:
      configs: R SamplingConfigs that differ at most in `temperature` (one decode loop runs
        them all, so max_new_tokens, top_p, stop_strings and cache_dtype must agree).
      batch_size: prompts per decode call (default all); a call decodes batch_size * R rows.
      The rest: as in `generate`.
    Returns:
      one list per prompt, in order, of R Generations (in `configs` order).
    Raises:
      ValueError: configs that differ in more than temperature; a prompt whose tokens plus
        max_new_tokens exceed the context, naming it.
    """
    if not prompts:
        return []
    if not configs:
        raise ValueError("generate_many: no configs")
    first = configs[0]
    for c in configs[1:]:
        if dataclasses.replace(c, temperature=first.temperature) != first:
            raise ValueError(f"generate_many: configs may differ only in temperature; got "
                             f"{first} and {c}")
    names = list(names) if names is not None else [f"prompt[{i}]" for i in range(len(prompts))]
    if len(names) != len(prompts):
        raise ValueError(f"generate: {len(names)} names for {len(prompts)} prompts")
    context = max_len or model.cfg.max_position_embeddings
    eos = eos_ids_of(tokenizer, eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    for name, row in zip(names, ids):
        check_context(name, len(row), first.max_new_tokens, context)
    temperatures = tuple(float(c.temperature) for c in configs)
    reps = len(configs)
    bsz = batch_size or len(ids)
    graphdef, state = nnx.split(model)
    results: list[list[Generation]] = []
    for start in range(0, len(ids), bsz):
        chunk = ids[start:start + bsz]
        rows = chunk + [chunk[0]] * (bsz - len(chunk))
        arrays = left_pad(rows, pad_id, prompt_width(max(len(r) for r in rows), first, context))
        if mesh is not None:
            sharding = NamedSharding(mesh, logical_to_spec(("batch",)))
            arrays = tuple(jax.device_put(a, sharding) for a in arrays)
        prompt_index = np.repeat(np.arange(start, start + bsz, dtype=np.int32), reps)
        sample_index = np.tile(np.arange(reps, dtype=np.int32), bsz)
        keys = row_keys(seed, prompt_index, sample_index)
        out, length = decode(graphdef, state, *arrays, keys,
                             max_new_tokens=first.max_new_tokens, eos_ids=eos,
                             temperatures=temperatures, top_p=float(first.top_p),
                             cache_dtype=first.cache_dtype)
        out, length = np.asarray(out), np.asarray(length)
        for i, row in enumerate(chunk):
            group = []
            for r in range(reps):
                k = i * reps + r
                gen = [int(t) for t in out[k, :length[k]]]
                reason = "eos" if length[k] < first.max_new_tokens else "length"
                text, stopped = _cut_at_stop(tokenizer.decode(gen, skip_special_tokens=True),
                                             first.stop_strings)
                group.append(Generation(text=text, token_ids=gen,
                                        finish_reason="stop" if stopped else reason,
                                        prompt_tokens=len(row)))
            results.append(group)
    return results
