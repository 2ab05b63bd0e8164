"""KV cache for generation: a plain pytree, threaded through `Decoder.__call__(..., cache=)`.

Slots [0, S) per row; all rows write the same slots at each call (left-pad prompts so they end
together), and `segment_ids` marks which slots hold real tokens (0 = empty or padding).

Layout, chosen for a decode step on CPU (docs/performance.md, decode): one array per layer, not
one [L, ...] array, head-major, keys transposed: k [B, K, Dh, S], v [B, K, S, Dh]. Both attention
matmuls then contract the row axis of the cache operand (q [G, Dh] x k [Dh, S], then
p [G, S] x v [S, Dh]): XLA CPU's dot ran the scores 3x faster so than against [S, Dh] keys.
Each layer writes its new keys into its own array and then attends over that same array, so
inside a `lax.while_loop` XLA updates the cache in place and the attention reads each head's
slots as one contiguous block: no per-step copy of
the cache (a stacked [L, B, S, K, Dh] cache was copied whole twice per step, plus a transpose
and a slice per layer: 3/4 of a 200-row step of SmolLM2).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qtarget_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedPrefix:
    """Keys/values of P prompts that R consecutive cache rows each continue (P * R rows).

    Row i * R + r of the cache attends over prompt i's slots here, then over its own slots:
    the prompt's keys are stored and read once per prompt instead of once per row (decode's
    greedy + k samples of each prompt: R = 1 + k). Slots are before every slot of the rows.
    """

    k: tuple[jax.Array, ...]  # L arrays [P, K, Dh, Sp]: keys after RoPE, transposed
    v: tuple[jax.Array, ...]  # L arrays [P, K, Sp, Dh]: values
    segment_ids: jax.Array  # [P, Sp] int32; 0 = empty/padding

    @property
    def max_len(self) -> int:
        """Sp, the number of prefix slots."""
        return self.segment_ids.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer plus the slot bookkeeping shared by all layers; optionally a
    `SharedPrefix` that groups of R consecutive rows attend over before their own slots."""

    k: tuple[jax.Array, ...]  # L arrays [B, K, Dh, S]: keys after RoPE (and q/k norm), transposed
    v: tuple[jax.Array, ...]  # L arrays [B, K, S, Dh]: values
    segment_ids: jax.Array  # [B, S] int32, segment of the token in each slot; 0 = empty/padding
    index: jax.Array        # int32[], next slot to write
    prefix: SharedPrefix | None = None  # P = B / R prompts' slots (see SharedPrefix)

    @property
    def max_len(self) -> int:
        """S, the number of slots."""
        return self.segment_ids.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int,
               dtype: jnp.dtype | str = jnp.float32) -> KVCache:
    """An empty cache for `batch` rows and `max_len` slots, storing k/v in `dtype`."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be > 0")
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    zeros = lambda shape: tuple(jnp.zeros(shape, dtype)  # noqa: E731
                                for _ in range(cfg.num_layers))
    return KVCache(k=zeros(k_shape), v=zeros(v_shape),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


def with_shared_prefix(prompts: KVCache, reps: int, max_len: int) -> KVCache:
    """An empty cache of P * reps rows and `max_len` own slots (the dtype of `prompts`) whose row
    i * reps + r continues prompt i of `prompts` (P rows, already filled: a prefill's cache,
    without a prefix of its own): its slots become the SharedPrefix, not copied per row."""
    if prompts.prefix is not None:
        raise ValueError("with_shared_prefix: the prompts' cache already has a prefix")
    if reps <= 0 or max_len <= 0:
        raise ValueError(f"with_shared_prefix: reps ({reps}) and max_len ({max_len}) must be > 0")
    b, kh, dh, _ = prompts.k[0].shape
    rows = b * reps
    zeros = lambda shape: tuple(jnp.zeros(shape, prompts.k[0].dtype)  # noqa: E731
                                for _ in prompts.k)
    return KVCache(k=zeros((rows, kh, dh, max_len)), v=zeros((rows, kh, max_len, dh)),
                   segment_ids=jnp.zeros((rows, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32),
                   prefix=SharedPrefix(k=prompts.k, v=prompts.v,
                                       segment_ids=prompts.segment_ids))


def check_fits(cache: KVCache, num_new: int) -> None:
    """Raises if `num_new` tokens do not fit; only when `index` is concrete (outside jit).

    Under jit the caller (the sampler) owns this bound: dynamic_update_slice would clamp.
    """
    if isinstance(cache.index, jax.core.Tracer):
        return
    end = int(cache.index) + num_new
    if end > cache.max_len:
        raise ValueError(f"KVCache overflow: index {int(cache.index)} + {num_new} new tokens "
                         f"> max_len {cache.max_len}")
