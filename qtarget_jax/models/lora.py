"""Low-rank adapters (LoRA) on the Decoder's projections: add, freeze, view the base, merge.

For a projection y = x W with W [*in, *out] (e.g. q_proj [D, H, Dh], o_proj [H, Dh, D]):

    y = x W + (alpha / r) dropout(x) A B,    A [*in, r], B [r, *out]

A starts as PEFT starts it (kaiming-uniform, bound 1/sqrt(fan_in)), B at zeros, so a fresh
adapter leaves the model unchanged. A and B are `nnx.LoRAParam`s (the only trainable
variables of an adapted model); they carry the logical axis names of W's in / out dims and an
unsharded rank axis (None), so they shard by the same rules (models/sharding.py). With
scan_layers they carry W's leading [layers] axis too.

    add_lora(model, LoraConfig(rank=16, alpha=32, targets=("q", "v")), seed=0)
    base = base_view(model)          # the same base arrays, no adapters (the initial model)
    merged = merge_lora(model)       # a plain Decoder with W + (alpha/r) A B, for export

Dropout is applied only in the train step, which seeds it with `seed_dropout(model, key)`;
evaluation, generation and the teacher see no dropout.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget_jax.config import LORA_TARGETS, check_lora

# target name -> (sub-module of Block, kernel attribute, number of leading input dims of W)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attn", "q_proj", 1), "k": ("attn", "k_proj", 1), "v": ("attn", "v_proj", 1),
    "o": ("attn", "o_proj", 2),
    "gate": ("mlp", "gate_proj", 1), "up": ("mlp", "up_proj", 1), "down": ("mlp", "down_proj", 1),
}
assert tuple(TARGETS) == LORA_TARGETS
SUFFIX = "_lora"  # the adapter of `q_proj` is the attribute `q_proj_lora` of the same module


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r > 0; alpha: scale alpha / r; dropout in [0, 1) on the adapter's input;
    targets: a subset of TARGETS."""
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        problem = check_lora(self.rank, self.alpha, self.dropout, self.targets)
        if problem:
            raise ValueError(f"LoraConfig: {problem[0]}={problem[1]!r}: {problem[2]}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class DropoutKey(nnx.Variable):
    """Raw PRNG key data u32[2] (u32[L, 2] stacked) for an adapter's dropout; not trained."""


class Adapter(nnx.Module):
    """A [*in, r] and B [r, *out] of one projection; __call__(x [B, T, *in]) -> [B, T, *out]."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
                 in_axes: Sequence[str | None], out_axes: Sequence[str | None], cfg: LoraConfig,
                 key: jax.Array, *, param_dtype: Any, layers: int | None = None):
        r = cfg.rank
        lead = () if layers is None else (layers,)
        lead_axes = () if layers is None else ("layers",)
        fan_in = math.prod(in_shape)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), as PEFT and torch Linear
        a = jax.random.uniform(key, (*lead, *in_shape, r), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a.astype(param_dtype), eager_sharding=False,
                               out_sharding=(*lead_axes, *in_axes, None))
        self.b = nnx.LoRAParam(jnp.zeros((*lead, r, *out_shape), param_dtype),
                               eager_sharding=False, out_sharding=(*lead_axes, None, *out_axes))
        self.key = DropoutKey(jnp.zeros((*lead, 2), jnp.uint32), eager_sharding=False,
                              out_sharding=(*lead_axes, None))
        self.n_in, self.scale, self.dropout = len(in_shape), cfg.scale, cfg.dropout
        self.alpha = cfg.alpha
        self.dropout_on = False  # set by seed_dropout (the train step) only

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


def _blocks(model: nnx.Module) -> tuple[list[nnx.Module], int | None]:
    """(the Block modules, L when they are one stacked Block (scan_layers) else None)."""
    if model.cfg.scan_layers:
        return [model.layers], model.cfg.num_layers
    return list(model.layers), None


def add_lora(model: nnx.Module, cfg: LoraConfig, seed: int = 0,
             param_dtype: Any = None) -> nnx.Module:
    """Adds an Adapter to each targeted projection of every layer of a Decoder, in place.

    A and B are created in `param_dtype` (None: the kernel's dtype), e.g. float32 adapters on
    a bfloat16 base; returns `model`.
    """
    if has_lora(model):
        raise ValueError("add_lora: the model already has adapters")
    blocks, layers = _blocks(model)
    key = jax.random.PRNGKey(seed)
    for i, block in enumerate(blocks):
        for name in cfg.targets:
            sub, kernel, n_in = TARGETS[name]
            owner = getattr(block, sub)
            w = getattr(owner, kernel)
            axes = w.get_metadata()["out_sharding"]
            shape, axes = (w.shape[1:], axes[1:]) if layers is not None else (w.shape, axes)
            key, sub_key = jax.random.split(key)
            setattr(owner, kernel + SUFFIX, Adapter(
                shape[:n_in], shape[n_in:], axes[:n_in], axes[n_in:], cfg, sub_key,
                param_dtype=w.dtype if param_dtype is None else param_dtype, layers=layers))
    return model


def adapters(model: nnx.Module) -> list[tuple[nnx.Module, str, Adapter]]:
    """(owner module, kernel name, adapter) for every adapter of `model`, in layer order."""
    if not (hasattr(model, "layers") and hasattr(model, "cfg")):
        return []  # not a Decoder
    blocks, _ = _blocks(model)
    out = []
    for block in blocks:
        for sub, kernel, _ in TARGETS.values():
            owner = getattr(block, sub)
            ad = getattr(owner, kernel + SUFFIX, None)
            if ad is not None:
                out.append((owner, kernel, ad))
    return out


def has_lora(model: nnx.Module) -> bool:
    """True when `model` carries adapters (its trainable params are then only A and B)."""
    return bool(adapters(model))


def trainable_filter(model: nnx.Module) -> Any:
    """The nnx filter of what the optimizer trains: LoRAParam for an adapted model (the base
    weights are frozen), every Param otherwise."""
    return nnx.LoRAParam if has_lora(model) else nnx.Param


def seed_dropout(model: nnx.Module, key_data: jax.Array) -> None:
    """Turns dropout on for this model instance with fresh keys from `key_data` (u32[2]),
    one per adapter (and per layer when stacked). Called by the train step only."""
    key = jax.random.wrap_key_data(key_data)
    for i, (_, _, ad) in enumerate(adapters(model)):
        if ad.dropout == 0:
            continue
        shape = ad.key.shape[:-1]
        k = jax.random.fold_in(key, i)
        ad.key.set_value(jax.random.key_data(jax.random.split(k, shape[0]) if shape else k))
        ad.dropout_on = True


def base_graphdef(model: nnx.Module) -> Any:
    """The graphdef of `model` without its adapters (a plain Decoder), for `base_view`."""
    return nnx.split(nnx.eval_shape(lambda: _strip(model)))[0]


def _strip(model: nnx.Module) -> nnx.Module:
    from qtarget_jax.models.decoder import Decoder
    return Decoder(model.cfg, rngs=nnx.Rngs(0))


def drop_adapters(tree: dict) -> dict:
    """A pure state dict without the adapter subtrees (keys ending in `_lora`)."""
    return {k: drop_adapters(v) if isinstance(v, dict) else v
            for k, v in tree.items() if not str(k).endswith(SUFFIX)}


def base_view(graphdef: Any, base_state: dict) -> nnx.Module:
    """The frozen base model (adapters off) from `base_graphdef(model)` and the adapted
    model's non-trainable state: the same arrays, no copy."""
    return nnx.merge(graphdef, drop_adapters(base_state))


@dataclasses.dataclass(frozen=True)
class BaseTeacher:
    """The teacher graph of a LoRA student whose teacher is its initial model: the base
    (`base_graphdef`) merged with the student's frozen state, adapters off, no copy."""
    graphdef: Any

    def view(self, base_state: dict) -> nnx.Module:
        return base_view(self.graphdef, base_state)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A plain Decoder (no adapters) whose targeted kernels are W + (alpha/r) A B, computed in
    float32 and stored in W's dtype; `model` itself when it has no adapters. `model` is left
    unchanged."""
    from qtarget_jax.models.decoder import Decoder
    if not has_lora(model):
        return model
    merged = nnx.eval_shape(lambda: Decoder(model.cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(merged)
    state = drop_adapters(nnx.state(model).to_pure_dict())
    merged = nnx.merge(graphdef, state)
    blocks, layers = _blocks(model)
    new_blocks, _ = _blocks(merged)
    for block, new_block in zip(blocks, new_blocks):
        for sub, kernel, _ in TARGETS.values():
            ad = getattr(getattr(block, sub), kernel + SUFFIX, None)
            if ad is None:
                continue
            w = getattr(getattr(new_block, sub), kernel)
            a = jnp.asarray(ad.a[...], jnp.float32)
            b = jnp.asarray(ad.b[...], jnp.float32)
            if layers is None:
                delta = jnp.tensordot(a, b, axes=1)
            else:  # [L, *in, r] x [L, r, *out] -> [L, *in, *out]
                delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)
            w.set_value((jnp.asarray(w[...], jnp.float32) + ad.scale * delta).astype(w.dtype))
    return merged


def adapter_bytes(model: nnx.Module) -> int:
    """Bytes of every A and B of `model`."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
