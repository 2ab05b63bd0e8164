"""Param shardings from the one rules table (`qtarget_jax.logical_axes.LOGICAL_RULES`).

Mesh axes are ("data", "fsdp", "tensor") (docs/design.md). Every model parameter carries its
logical axis names as `out_sharding` metadata (models/layers.py); `param_shardings` turns them
into NamedShardings for a given Mesh and refuses dimensions that do not divide. LOGICAL_RULES,
Rules and logical_to_spec are re-exported from `qtarget_jax.logical_axes`, where the table lives
(so the fused loss reads it without importing models/).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qtarget_jax.logical_axes import LOGICAL_RULES, Rules, logical_to_spec

__all__ = ["LOGICAL_RULES", "Rules", "logical_to_spec", "param_shardings", "shard_model",
           "spec_for"]


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def spec_for(name: str, shape: tuple[int, ...], axes: Sequence[str | None] | None,
             mesh: Mesh, rules: Rules = LOGICAL_RULES) -> PartitionSpec:
    """The PartitionSpec of one param, checking each sharded dim divides its mesh axes."""
    if axes is None:
        raise ValueError(f"param {name} {shape} has no logical axis names (out_sharding)")
    if len(axes) != len(shape):
        raise ValueError(f"param {name}: logical axes {tuple(axes)} do not match shape {shape}")
    spec = logical_to_spec(axes, rules)
    for dim, logical, mesh_axes in zip(shape, axes, spec):
        if mesh_axes is None:
            continue
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        for n in names:
            if n not in mesh.shape:
                raise ValueError(f"param {name}: rule {logical!r} -> {n!r}, not a mesh axis "
                                 f"({', '.join(mesh.axis_names)})")
        size = math.prod(mesh.shape[n] for n in names)
        if dim % size:
            raise ValueError(f"param {name}: dim {logical!r} of size {dim} does not divide "
                             f"mesh axis {mesh_axes!r} of size {size} (shape {shape})")
    return spec


def param_shardings(tree, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.State:
    """NamedShardings for every Variable of `tree` (a Module, e.g. from nnx.eval_shape, or a
    State), as an nnx.State of the same structure as `nnx.state(tree)`.

    Raises ValueError naming the param, dim and mesh axis size when a dim does not divide.
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    flat = []
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding")
        spec = spec_for(_path_str(path), tuple(var.shape), axes, mesh, rules)
        flat.append((path, NamedSharding(mesh, spec)))
    return nnx.from_flat_state(flat)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> None:
    """Places every Variable of a concrete `model` on `mesh` per its logical axes, in place."""
    state = nnx.state(model)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
