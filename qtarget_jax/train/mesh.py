"""Device mesh ("data", "fsdp", "tensor") and the shardings of parameters and batches.

Parameters carry logical axis names (nnx `out_sharding` metadata such as ("embed", "mlp")); the
one rules table, models/sharding.py LOGICAL_RULES, maps each logical name to mesh axes and
`models.sharding.param_shardings` turns them into NamedShardings (strict: a param without names
or a dim that does not divide is an error). Batches [B, T] follow the same table: B by "batch"
(("data", "fsdp")), T by "seq" (replicated).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qtarget_jax.models.sharding import LOGICAL_RULES, logical_to_spec

AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves sizes for AXES ("-1" = the rest of the devices) and checks they tile the devices.

    Args:
      sizes: axis name -> size (>= 1, or -1 for at most one axis).
      num_devices: total number of devices (all processes).
    Returns:
      a tuple of ints, one per name in AXES, whose product is num_devices.
    """
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; valid axes are {AXES}")
    raw = [int(sizes.get(a, 1)) for a in AXES]
    rest = [a for a, s in zip(AXES, raw) if s == -1]
    bad = [f"{a}={s}" for a, s in zip(AXES, raw) if s == 0 or s < -1]
    if bad or len(rest) > 1:
        raise ValueError(f"mesh: sizes must be >= 1 with at most one -1, "
                         f"got {dict(zip(AXES, raw))}")
    fixed = math.prod(s for s in raw if s != -1)
    if num_devices % fixed:
        raise ValueError(f"mesh: axes {dict(zip(AXES, raw))} (product {fixed}) do not divide "
                         f"the {num_devices} devices")
    shape = tuple(num_devices // fixed if s == -1 else s for s in raw)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh: shape {dict(zip(AXES, shape))} uses {math.prod(shape)} devices, "
                         f"but {num_devices} are present; set one axis to -1")
    return shape


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes AXES sized by `mesh_shape`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    # Auto axes (GSPMD propagation); jax.make_mesh would default to Explicit axes.
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                         devices=devices)


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    """[B, T] arrays: B by the "batch" rule (("data", "fsdp")), T by the "seq" rule."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows [B_local, T] -> global arrays [B, T] sharded by `batch_sharding`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}
