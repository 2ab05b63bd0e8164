"""Optax chain from the config: global-norm clipping -> AdamW (or SGD) with a warmup schedule.

Weight decay is masked off norms and biases: parameters with fewer than 2 dimensions or whose path
names a norm or bias are not decayed.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from qtarget_jax.config import OptimSection, ScheduleSection


def make_schedule(optim: OptimSection, sched: ScheduleSection, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup 0 -> lr, then cosine/linear decay to end_lr_ratio*lr.

    Args:
      total_steps: optimizer steps of the run (warmup included).
    """
    peak, warm = optim.lr, sched.warmup_steps
    if warm < 0 or warm > total_steps:
        raise ValueError(f"schedule.warmup_steps={warm} must be in [0, run.steps={total_steps}]")
    end = sched.end_lr_ratio * peak
    if sched.kind == "constant":
        decay = optax.constant_schedule(peak)
    elif sched.kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(total_steps - warm, 1),
                                            alpha=sched.end_lr_ratio)
    elif sched.kind == "linear":
        decay = optax.linear_schedule(peak, end, max(total_steps - warm, 1))
    else:
        raise ValueError(f"schedule.kind={sched.kind!r}: expected cosine, linear or constant")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: >= 2-D tensors that are neither norms nor biases."""
    def keep(path, x):
        name = _path_name(path)
        return x.ndim >= 2 and "norm" not in name and "bias" not in name
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim: OptimSection, sched: ScheduleSection,
                   total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """Returns (optax chain, lr schedule). The chain expects the token-mean gradient."""
    lr = make_schedule(optim, sched, total_steps)
    parts = []
    if optim.clip_norm is not None:
        if optim.clip_norm <= 0:
            raise ValueError(f"optim.clip_norm={optim.clip_norm} must be > 0 or null")
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    if optim.name == "adamw":
        parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                 weight_decay=optim.weight_decay, mask=decay_mask))
    elif optim.name == "sgd":
        parts.append(optax.add_decayed_weights(optim.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(lr))
    else:
        raise ValueError(f"optim.name={optim.name!r}: expected adamw or sgd")
    return optax.chain(*parts), lr
