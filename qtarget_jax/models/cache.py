"""KV cache for generation: a plain pytree, threaded through `Decoder.__call__(..., cache=)`.

Slots [0, S) per row; all rows write the same slots at each call (left-pad prompts so they end
together), and `segment_ids` marks which slots hold real tokens (0 = empty or padding).

Layout, chosen for a decode step on CPU (docs/performance.md, decode): one array per layer, not
one [L, ...] array, and head-major [B, K, S, Dh]. Each layer writes its new keys into its own
array and then attends over that same array, so inside a `lax.while_loop` XLA updates the cache
in place and the attention reads each head's slots as one contiguous block: no per-step copy of
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
class KVCache:
    """Keys/values of every layer plus the slot bookkeeping shared by all layers."""

    k: tuple[jax.Array, ...]  # L arrays [B, K, S, Dh]: keys after RoPE (and q/k norm)
    v: tuple[jax.Array, ...]  # L arrays [B, K, S, Dh]: values
    segment_ids: jax.Array  # [B, S] int32, segment of the token in each slot; 0 = empty/padding
    index: jax.Array        # int32[], next slot to write

    @property
    def max_len(self) -> int:
        """S, the number of slots."""
        return self.k[0].shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int,
               dtype: jnp.dtype | str = jnp.float32) -> KVCache:
    """An empty cache for `batch` rows and `max_len` slots, storing k/v in `dtype`."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be > 0")
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))  # noqa: E731
    return KVCache(k=zeros(), v=zeros(),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


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
