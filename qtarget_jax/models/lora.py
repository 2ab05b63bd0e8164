"""LoRA on a Decoder: add adapters, find them, seed their dropout, view the base, merge.

The adapter itself (A [*in, r], B [r, *out], y = x W + (alpha / r) dropout(x) A B) is
models/adapter.py. Here, the targets are the Decoder's projections as params.RULES names them:
each rule `model.layers.{i}.<module>.<x>_proj.weight` is target `x` (q, k, v, o, gate, up,
down), so the HF / PEFT name of every adapter comes from the same table as the weights.

Adapters are found one way: `adapters(model)` walks the model graph for `Adapter` nodes and
names each one's layer and target from its path; an adapter at a path the Decoder layout does
not have is an error, and so is adding adapters to a model that is not a Decoder.

    add_lora(model, LoraConfig(rank=16, alpha=32, targets=("q", "v")), seed=0)
    base = base_view(base_graphdef(model), rest)   # the same base arrays, no adapters
    merged = merge_lora(model)       # a plain Decoder with W + (alpha/r) A B, for export

Dropout is applied only in the train step, which seeds it with `seed_dropout(model, key)`;
evaluation, generation and the teacher see no dropout.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qtarget_jax.config import LORA_TARGETS, check_lora
from qtarget_jax.models.adapter import SUFFIX, Adapter
from qtarget_jax.models.decoder import Decoder
from qtarget_jax.models.params import RULES, Rule

_PROJECTION = re.compile(r"model\.layers\.\{i\}\.\w+\.(\w+)_proj\.weight")


@dataclasses.dataclass(frozen=True)
class Target:
    """A projection an adapter can wrap, read off its `params.RULES` entry.

    E.g. q: rule "model.layers.{i}.self_attn.q_proj.weight" -> "layers.{i}.attn.q_proj", so
    sub "attn", kernel "q_proj", n_in 1 (W [D, H, Dh]); o: W [H, Dh, D], n_in 2.
    """
    name: str
    rule: Rule

    @property
    def sub(self) -> str:
        """The Block attribute holding the kernel ("attn" / "mlp")."""
        return self.rule.ours.split(".")[2]

    @property
    def kernel(self) -> str:
        """The kernel's attribute name ("q_proj"); its adapter is `kernel + SUFFIX`."""
        return self.rule.ours.split(".")[3]

    @property
    def n_in(self) -> int:
        """How many leading dims of our W are the HF input dim (W_hf [out, in])."""
        shape, (out, inp) = self.rule.our_shape, self.rule.hf_shape
        return 1 if shape[0] == inp else len(shape) - 1

    def peft_module(self, layer: int) -> str:
        """PEFT's name of this projection in `layer`: base_model.model.<HF module path>."""
        return "base_model.model." + self.rule.hf.format(i=layer).removesuffix(".weight")


TARGETS: dict[str, Target] = {m.group(1): Target(m.group(1), rule) for rule in RULES
                              if (m := _PROJECTION.fullmatch(rule.hf))}
assert tuple(TARGETS) == LORA_TARGETS, (tuple(TARGETS), LORA_TARGETS)
_BY_ATTRIBUTE = {(t.sub, t.kernel + SUFFIX): t for t in TARGETS.values()}


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


@dataclasses.dataclass(frozen=True)
class Site:
    """Where an adapter sits: `layer` (None: one stacked adapter over all layers, scan_layers,
    whose row i is layer i), its `target`, the module `owner` of the kernel, the `adapter`."""
    layer: int | None
    target: Target
    owner: nnx.Module
    adapter: Adapter


def _check_decoder(model: Any, caller: str) -> None:
    if not isinstance(model, Decoder):
        raise TypeError(f"{caller}: LoRA knows the Decoder's layout (params.RULES) only; got a "
                        f"{type(model).__name__}")


def _blocks(model: Decoder) -> tuple[list[nnx.Module], int | None]:
    """(the Block modules, L when they are one stacked Block (scan_layers) else None)."""
    if model.cfg.scan_layers:
        return [model.layers], model.cfg.num_layers
    return list(model.layers), None


def add_lora(model: Decoder, cfg: LoraConfig, seed: int = 0,
             param_dtype: Any = None) -> Decoder:
    """Adds an Adapter to each targeted projection of every layer of a Decoder, in place.

    A and B are created in `param_dtype` (None: the kernel's dtype), e.g. float32 adapters on
    a bfloat16 base; returns `model`.
    """
    _check_decoder(model, "add_lora")
    if has_lora(model):
        raise ValueError("add_lora: the model already has adapters")
    blocks, layers = _blocks(model)
    key = jax.random.PRNGKey(seed)
    for block in blocks:
        for name in cfg.targets:
            t = TARGETS[name]
            owner = getattr(block, t.sub)
            w = getattr(owner, t.kernel)
            axes = w.get_metadata()["out_sharding"]
            shape, axes = (w.shape[1:], axes[1:]) if layers is not None else (w.shape, axes)
            key, sub_key = jax.random.split(key)
            setattr(owner, t.kernel + SUFFIX, Adapter(
                shape[:t.n_in], shape[t.n_in:], axes[:t.n_in], axes[t.n_in:], rank=cfg.rank,
                alpha=cfg.alpha, dropout=cfg.dropout, key=sub_key, layers=layers,
                param_dtype=w.dtype if param_dtype is None else param_dtype))
    return model


def _site(path: tuple, adapter: Adapter, parents: dict[tuple, nnx.Module]) -> Site:
    """The Site of the Adapter at graph `path`: ('layers', [i,] sub, kernel + SUFFIX)."""
    layer = path[1] if len(path) == 4 and isinstance(path[1], int) else None
    target = _BY_ATTRIBUTE.get(tuple(path[-2:]))
    if path[0] != "layers" or len(path) != (3 if layer is None else 4) or target is None:
        raise ValueError(f"adapters: an Adapter at {'.'.join(map(str, path))}, where the "
                         "Decoder layout (layers[.i].<attn|mlp>.<kernel>_lora) has none")
    return Site(layer, target, parents[path[:-1]], adapter)


def adapters(model: nnx.Module) -> list[Site]:
    """Every adapter of `model`, by (layer, TARGETS order); [] for a model without any.

    Raises ValueError for an Adapter at a path a Decoder does not have (e.g. a Decoder held
    inside another module), so an adapted model is never taken for a plain one.
    """
    nodes = dict(nnx.iter_graph(model))
    sites = [_site(tuple(path), node, nodes) for path, node in nodes.items()
             if isinstance(node, Adapter)]
    order = {name: i for i, name in enumerate(TARGETS)}
    return sorted(sites, key=lambda s: (s.layer or 0, order[s.target.name]))


def has_lora(model: nnx.Module) -> bool:
    """True when `model` carries adapters (its trainable params are then only A and B)."""
    return bool(adapters(model))


def trainable_filter(model: nnx.Module) -> Any:
    """The nnx filter of what the optimizer trains: LoRAParam (the adapters' A and B) for an
    adapted model, whose base weights are frozen; every Param otherwise."""
    return nnx.LoRAParam if has_lora(model) else nnx.Param


def seed_dropout(model: nnx.Module, key_data: jax.Array) -> None:
    """Turns dropout on for this model instance with fresh keys from `key_data` (u32[2]),
    one per adapter (and per layer when stacked). Called by the train step only."""
    key = jax.random.wrap_key_data(key_data)
    for i, site in enumerate(adapters(model)):
        ad = site.adapter
        if ad.dropout == 0:
            continue
        shape = ad.key.shape[:-1]
        k = jax.random.fold_in(key, i)
        ad.key.set_value(jax.random.key_data(jax.random.split(k, shape[0]) if shape else k))
        ad.dropout_on = True


def _plain(model: Decoder) -> Decoder:
    """An abstract plain Decoder (no adapters) of `model`'s config."""
    _check_decoder(model, "LoRA base")
    return nnx.eval_shape(lambda: Decoder(model.cfg, rngs=nnx.Rngs(0)))


def base_graphdef(model: Decoder) -> Any:
    """The graphdef of `model` without its adapters (a plain Decoder), for `base_view`."""
    return nnx.split(_plain(model))[0]


def drop_adapters(tree: dict) -> dict:
    """A pure state dict without the adapter subtrees (the keys <kernel>_lora of TARGETS)."""
    names = {t.kernel + SUFFIX for t in TARGETS.values()}
    return {k: drop_adapters(v) if isinstance(v, dict) else v
            for k, v in tree.items() if k not in names}


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


def merge_lora(model: Decoder) -> Decoder:
    """A plain Decoder (no adapters) whose targeted kernels are W + (alpha/r) A B, computed in
    float32 and stored in W's dtype; `model` itself when it has no adapters. `model` is left
    unchanged."""
    sites = adapters(model)
    if not sites:
        return model
    graphdef, _ = nnx.split(_plain(model))
    merged = nnx.merge(graphdef, drop_adapters(nnx.state(model).to_pure_dict()))
    blocks, _ = _blocks(merged)
    for site in sites:
        block = blocks[0 if site.layer is None else site.layer]
        w = getattr(getattr(block, site.target.sub), site.target.kernel)
        a = jnp.asarray(site.adapter.a[...], jnp.float32)
        b = jnp.asarray(site.adapter.b[...], jnp.float32)
        if site.layer is not None:
            delta = jnp.tensordot(a, b, axes=1)
        else:  # [L, *in, r] x [L, r, *out] -> [L, *in, *out]
            delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)
        w.set_value((jnp.asarray(w[...], jnp.float32) + site.adapter.scale * delta
                     ).astype(w.dtype))
    return merged


def adapter_bytes(model: nnx.Module) -> int:
    """Bytes of every A and B of `model`."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for s in adapters(model)
               for x in (s.adapter.a, s.adapter.b))
