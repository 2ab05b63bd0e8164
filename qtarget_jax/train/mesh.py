"""Device mesh ("data", "fsdp", "tensor") and the shardings of parameters and batches.

Parameters carry logical axis names (nnx `out_sharding` metadata such as ("embed", "mlp")); a
rules table maps each logical name to a mesh axis (or None = replicated). Batches [B, T] are
sharded over ("data", "fsdp") on B and replicated over "tensor".
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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


def logical_to_mesh_spec(logical: Sequence[Optional[str]], rules: Mapping[str, Any],
                         shape: Sequence[int], mesh: Mesh, where: str = "") -> P:
    """Maps logical axis names to a PartitionSpec; an axis that does not divide is an error.

    Mesh axes of size 1 are dropped (replicated), so the same rules serve every mesh.
    """
    out = []
    used: set = set()
    for dim, name in zip(shape, logical):
        axis = None if name is None else rules.get(name, KeyError)
        if axis is KeyError:
            raise ValueError(f"{where}: logical axis {name!r} has no rule; rules: {dict(rules)}")
        axes = tuple(a for a in ((axis,) if isinstance(axis, str) else (axis or ()))
                     if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size:
            raise ValueError(f"{where}: dim {dim} (logical {name!r}) is not divisible by mesh "
                             f"axes {axes} of size {size}")
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_shardings(abstract_params: nnx.State, rules: Mapping[str, Any], mesh: Mesh):
    """NamedShardings (a pure dict mirroring the params) from each Param's logical names.

    Args:
      abstract_params: nnx.State of Params (abstract or concrete); a Param without
        `out_sharding` metadata is replicated.
    """
    flat = {}
    for path, var in abstract_params.flat_state():
        logical = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        where = "/".join(str(p) for p in path)
        if len(logical) != len(var.shape):
            raise ValueError(f"{where}: logical axes {logical} do not match shape {var.shape}")
        flat[path] = NamedSharding(mesh, logical_to_mesh_spec(logical, rules, var.shape, mesh,
                                                              where))
    return nnx.State.from_flat_path(flat).to_pure_dict()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] arrays: B over ("data", "fsdp"), T replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows [B_local, T] -> global arrays [B, T] sharded by `batch_sharding`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def put_global(tree: Any, shardings: Any) -> Any:
    """Host values (identical on every process) -> global arrays placed per `shardings`.

    Works across processes: each process fills only its addressable shards.
    """
    def put(x, sharding):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(put, tree, shardings)
