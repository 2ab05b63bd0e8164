"""Orbax checkpoints: async saves every N steps, keep last K (+ best), resume, start-up checks.

A checkpoint holds two items: "state" (step, params, opt_state, rng: a pytree of global arrays)
and "data" (the data iterator position, JSON). Orbax writes each step to a temporary folder and
renames it when complete, so a process killed mid-save leaves no half checkpoint: `latest_step`
only sees finished ones. Local paths and gs:// go through the same code (etils.epath).
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm


def checkpoint_path(directory: str) -> epath.Path:
    """`directory` as Orbax needs it: absolute when local (a relative run.dir is resolved against
    the working directory), unchanged for URLs such as gs://bucket/run."""
    if "://" in directory:
        return epath.Path(directory)
    return epath.Path(os.path.abspath(directory))


def check_writable(directory: str, need_bytes: int = 0) -> epath.Path:
    """Creates `directory` and proves it writable (and, when local, that `need_bytes` fit).

    Raises:
      OSError naming the path when it cannot be written or the disk is too full.
    """
    path = checkpoint_path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - re-raised with the path in the message
        raise OSError(f"checkpoint.dir={directory!r} is not writable: {e}") from e
    if not str(directory).startswith("gs://") and need_bytes:
        free = shutil.disk_usage(str(path)).free
        if free < need_bytes:
            raise OSError(f"checkpoint.dir={directory!r}: {free / 2**30:.2f} GiB free, but a "
                          f"checkpoint needs about {need_bytes / 2**30:.2f} GiB")
    return path


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Checkpointer:
    """Wraps ocp.CheckpointManager with our items and retention policy."""

    def __init__(self, directory: str, *, keep: int, best_metric: Optional[str] = None,
                 best_mode: str = "min", async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        policies = [cm.LatestN(n=keep)]
        if best_metric:
            policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric],
                                     reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True)
        self.best_metric = best_metric
        self.manager = ocp.CheckpointManager(checkpoint_path(directory), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state_items: Any, data_state: Mapping[str, Any],
             metrics: Optional[Mapping[str, float]] = None) -> None:
        """Starts an (async) save of step `step`; `metrics` feed the best-checkpoint policy."""
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            metrics = None
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_items), data=ocp.args.JsonSave(dict(data_state))),
            metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
            force=True)

    def restore(self, step: int, abstract_items: Any) -> tuple[Any, dict]:
        """Restores step `step` into `abstract_items` (ShapeDtypeStructs with shardings)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_items), data=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
