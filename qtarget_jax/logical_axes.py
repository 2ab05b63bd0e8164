"""LOGICAL_RULES: the one table from logical axis names to mesh axes, and lookups in it.

Mesh axes are ("data", "fsdp", "tensor") (docs/design.md). Models name each parameter's axes
(models/layers.py) and `models.sharding` turns the names into shardings; the train step places
batches by the "batch" and "seq" rules; the fused loss (`targets.ChunkSharding`) shards token
rows by "batch" and the vocabulary by "vocab". This module imports only jax.sharding, so
models/, targets/ and train/ can all read the table without importing each other.
"""
from __future__ import annotations

from typing import Optional, Sequence

from jax.sharding import PartitionSpec

# logical name -> mesh axis (str), several mesh axes (tuple), or None (replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def _rule(name: str, rules: Rules):
    table = dict(rules)
    if name not in table:
        raise ValueError(f"logical axis {name!r} has no rule; rules cover: {', '.join(table)}")
    return table[name]


def logical_to_spec(axes: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> PartitionSpec:
    """Logical axis names (one per dim) -> PartitionSpec; an unknown name is an error."""
    return PartitionSpec(*(None if name is None else _rule(name, rules) for name in axes))


def mesh_axes(name: str, rules: Rules = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes of logical axis `name` as a tuple (() when replicated)."""
    axes = _rule(name, rules)
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def token_axes(rules: Rules = LOGICAL_RULES) -> tuple[str, ...]:
    """Mesh axes over which token rows are sharded: the "batch" rule, e.g. ("data", "fsdp")."""
    return mesh_axes("batch", rules)


def vocab_axis(rules: Rules = LOGICAL_RULES) -> Optional[str]:
    """The one mesh axis the vocabulary is sharded over (the "vocab" rule), or None.

    Raises ValueError when the rule names several mesh axes (vocab-parallel code psums over
    one axis).
    """
    axes = mesh_axes("vocab", rules) if "vocab" in dict(rules) else ()
    if len(axes) > 1:
        raise ValueError(f"rules: the vocabulary is sharded over one mesh axis, got 'vocab' -> "
                         f"{axes!r}")
    return axes[0] if axes else None
