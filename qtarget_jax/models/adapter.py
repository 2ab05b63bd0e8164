"""One low-rank adapter (LoRA) of one projection, and the hook the layers call: `adapt`.

For a projection y = x W with W [*in, *out] (e.g. q_proj [D, H, Dh], o_proj [H, Dh, D]):

    y = x W + (alpha / r) dropout(x) A B,    A [*in, r], B [r, *out]

The adapter of kernel `q_proj` is the attribute `q_proj_lora` of the module that holds
`q_proj` (SUFFIX). This module knows nothing of the Decoder: models/lora.py adds adapters to a
model, finds them, merges them; layers.py only calls `adapt`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

SUFFIX = "_lora"  # the adapter of `q_proj` is the attribute `q_proj_lora` of the same module


class DropoutKey(nnx.Variable):
    """Raw PRNG key data u32[2] (u32[L, 2] stacked) for an adapter's dropout; not trained."""


class Adapter(nnx.Module):
    """A [*in, r] and B [r, *out] of one projection; __call__(x [B, T, *in]) -> [B, T, *out].

    A starts as PEFT starts it (kaiming-uniform, bound 1/sqrt(fan_in)), B at zeros, so a fresh
    adapter changes nothing. A and B are `nnx.LoRAParam`s carrying W's logical axis names
    (`in_axes`, `out_axes`) and an unsharded rank axis; `layers` = L adds W's leading stacked
    [L] axis (scan_layers).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
                 in_axes: Sequence[str | None], out_axes: Sequence[str | None], *, rank: int,
                 alpha: float, dropout: float, key: jax.Array, param_dtype: Any,
                 layers: int | None = None):
        lead = () if layers is None else (layers,)
        lead_axes = () if layers is None else ("layers",)
        bound = 1.0 / math.sqrt(math.prod(in_shape))  # kaiming_uniform(a=sqrt(5)), as PEFT
        a = jax.random.uniform(key, (*lead, *in_shape, rank), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a.astype(param_dtype), eager_sharding=False,
                               out_sharding=(*lead_axes, *in_axes, None))
        self.b = nnx.LoRAParam(jnp.zeros((*lead, rank, *out_shape), param_dtype),
                               eager_sharding=False, out_sharding=(*lead_axes, None, *out_axes))
        self.key = DropoutKey(jnp.zeros((*lead, 2), jnp.uint32), eager_sharding=False,
                              out_sharding=(*lead_axes, None))
        self.n_in, self.scale, self.dropout = len(in_shape), alpha / rank, dropout
        self.alpha = alpha
        self.dropout_on = False  # set by lora.seed_dropout (the train step) only

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x [B, T, *in] (compute dtype) -> (alpha / r) dropout(x) A B [B, T, *out] in `dtype`."""
        if self.dropout_on and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.key[...]),
                                        1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
        axes = list(range(x.ndim - self.n_in, x.ndim))
        low = jnp.tensordot(x, a, axes=(axes, list(range(self.n_in))))     # [B, T, r]
        return jnp.tensordot(low, b * jnp.asarray(self.scale, dtype), axes=1)


def adapt(module: nnx.Module, kernel: str, x: jax.Array, y: jax.Array, dtype: Any) -> jax.Array:
    """y + the adapter of `module.<kernel>` applied to x, or y when that kernel has none."""
    adapter = getattr(module, kernel + SUFFIX, None)
    return y if adapter is None else y + adapter(x, dtype)
