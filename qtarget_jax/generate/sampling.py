"""How the next token is drawn: `SamplingConfig`, per-row PRNG keys and `sample_logits`.

Sampling draws ONE uniform number per row and inverts the cumulative distribution in two levels
(blocks of `_BLOCK` tokens, then the chosen block), instead of `jax.random.categorical`'s Gumbel
noise over the whole vocabulary: on CPU the Gumbel draw of a [200, 49152] batch cost about as
much as the model's forward (docs/performance.md, decode). The distribution is the same.

Keys are per row: row (prompt p, continuation r) draws from fold_in(fold_in(key(seed), p), r)
at step s folded in, so a row's sample does not depend on which rows share its batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_BLOCK = 256   # tokens per block of the two-level inverse CDF


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode. temperature 0 means greedy (argmax), whatever top_p says."""

    max_new_tokens: int = 128        # upper bound on generated tokens per row
    temperature: float = 0.0         # 0 = greedy; > 0 divides the logits before sampling
    top_p: float = 1.0               # nucleus sampling: keep the smallest set with mass >= top_p
    stop_strings: tuple[str, ...] = ()  # cut the text before the first of these (host side)
    cache_dtype: str = "float32"     # dtype of the KV cache (float32 | bfloat16)
    pad_multiple: int = 16           # prompt width rounded up to this, to bound recompiles

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1]")
        if self.cache_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"SamplingConfig.cache_dtype={self.cache_dtype!r}: expected "
                             "float32 or bfloat16")
        if self.pad_multiple < 1:
            raise ValueError(f"SamplingConfig.pad_multiple={self.pad_multiple} must be >= 1")
        if isinstance(self.stop_strings, str):
            raise TypeError("SamplingConfig.stop_strings must be a tuple of strings, got a str")


def row_keys(seed: int, prompt_index: jax.Array, sample_index: jax.Array) -> jax.Array:
    """[B] PRNG keys, one per row: fold_in(fold_in(key(seed), prompt_index), sample_index).

    prompt_index, sample_index: [B] int32 (the prompt's index in the whole call, the
    continuation's index among the configs).
    """
    base = jax.random.key(seed)
    fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
    return jax.vmap(jax.random.fold_in)(fold(base, prompt_index), sample_index)


def _last_positive(w: jax.Array) -> jax.Array:
    """Index of the last entry > 0 along the last axis of w [..., n] (0 when none)."""
    n = w.shape[-1]
    return n - 1 - jnp.argmax(jnp.flip(w > 0, axis=-1), axis=-1)


def _blocks(x_BV: jax.Array, fill: float) -> jax.Array:
    """x [B, V] -> [B, n, blk] (blk = min(_BLOCK, V), n = ceil(V / blk)), padded with `fill`."""
    b, v = x_BV.shape
    blk = min(_BLOCK, v)
    n = -(-v // blk)
    return jnp.pad(x_BV, ((0, 0), (0, n * blk - v)), constant_values=fill).reshape(b, n, blk)


def argmax_last(x_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index [B] int32 of the first maximum along the last axis, the maximum [B]) of x [B, V].

    For x without NaN (logits; NaN is not handled as jnp.argmax does) the index equals
    `jnp.argmax(x, axis=-1)` (ties: the first),
    computed in two levels: the maximum of each block of `_BLOCK` entries (one plain max
    reduction over [B, V]), the first block holding the row maximum, then the first maximum
    inside that block. XLA CPU runs the one-level argmax over [200, 49152] (a variadic
    value-and-index reduction) about 6x slower than a max reduction (docs/performance.md).
    """
    w = _blocks(x_BV, -jnp.inf)                                     # [B, n, blk]
    block_max = w.max(axis=-1)                                      # [B, n]
    j = jnp.argmax(block_max, axis=-1)                              # first block with the max
    inner = jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0]  # [B, blk]
    i = jnp.argmax(inner, axis=-1)
    return (j * w.shape[-1] + i).astype(jnp.int32), block_max.max(axis=-1)


def inverse_cdf(weights_BV: jax.Array, u_B: jax.Array) -> jax.Array:
    """Index [B] int32 of the first token whose cumulative weight exceeds u * total.

    weights [B, V] >= 0 (unnormalised, at least one > 0 per row); u [B] in [0, 1). A token of
    weight 0 is never returned. Two levels: block sums [B, V / _BLOCK], then one block.
    """
    w = _blocks(weights_BV, 0.0)                                    # [B, n, blk]
    blk = w.shape[-1]
    sums = w.sum(axis=-1)                                           # [B, n]
    cum = jnp.cumsum(sums, axis=-1)
    target = u_B * cum[:, -1]
    j = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), _last_positive(sums))
    before = jnp.where(j > 0, jnp.take_along_axis(cum, jnp.maximum(j - 1, 0)[:, None], 1)[:, 0],
                       0.0)
    inner = jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0]  # [B, blk]
    icum = before[:, None] + jnp.cumsum(inner, axis=-1)
    i = jnp.minimum(jnp.sum(icum <= target[:, None], axis=-1), _last_positive(inner))
    return (j * blk + i).astype(jnp.int32)


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: float | jax.Array,
                  top_p: float) -> jax.Array:
    """Next token ids [B] int32 from logits [B, V] float32.

    temperature 0: argmax. Otherwise softmax(logits / temperature) restricted to the smallest
    set of tokens whose mass reaches top_p (the most likely token is always kept), renormalised.
    `temperature` is a Python float (all rows) or a [B] float32 array, per row; rows whose
    temperature is 0 take the argmax. `rng` is one key (split into one per row) or [B] keys.
    """
    greedy, row_max = argmax_last(logits_BV)
    per_row = not isinstance(temperature, (int, float))
    if not per_row and temperature == 0.0:
        return greedy
    b = logits_BV.shape[0]
    keys = rng if rng.ndim == 1 else jax.random.split(rng, b)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)        # [B]
    # max(logits / t) == max(logits) / t exactly for t > 0 (rounding is monotonic): one max pass.
    if per_row:
        t = jnp.asarray(temperature, jnp.float32)
        scale = jnp.where(t > 0, t, 1.0)[:, None]
    else:
        scale = jnp.float32(temperature)
    z = logits_BV.astype(jnp.float32) / scale - row_max.astype(jnp.float32)[:, None] / scale
    if top_p < 1.0:
        order = jnp.argsort(-z, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(z, order, axis=-1), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        pick = inverse_cdf(jnp.where(mass_before < top_p, probs, 0.0), u)
        drawn = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
        drawn = inverse_cdf(jnp.exp(z), u)
    return jnp.where(t > 0, drawn, greedy) if per_row else drawn
