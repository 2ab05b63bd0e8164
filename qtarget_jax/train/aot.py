"""A job's train step compiled ahead of time from abstract inputs: no weights, no allocation.

The step is the one `train.py` runs (student forward + backward, teacher forward, fused loss,
microbatches, AdamW, `jit_train_step` with the job's shardings), lowered from ShapeDtypeStructs
over any device list: libtpu's TPU devices of a topology that is not attached
(`jax.experimental.topologies`), or this host's (fake) CPU devices.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    compiled: Any                  # jax.stages.Compiled
    state_bytes: dict              # {"student_params", "optimizer", "teacher_params"} per chip
    memory: dict                   # {"arguments", "outputs", "aliased", "temporaries", "total"}


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def bytes_per_chip(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of each)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def compile_step(cfg, student_cfg, teacher_cfg=None, real_vocab: Optional[int] = None,
                 devices: Optional[Sequence[Any]] = None) -> CompiledStep:
    """The compiled train step of TrainConfig `cfg` over `devices` (default: all visible).

    Args:
      student_cfg / teacher_cfg: ModelConfigs (teacher None: the frozen initial student when
        the target needs a teacher, in model.teacher_dtype).
      real_vocab: the tokenizer size when the heads have padding rows.
    Returns:
      CompiledStep; memory in bytes per chip, total = arguments + outputs - aliased + temps.
    Raises whatever the compiler raises (a TPU's RESOURCE_EXHAUSTED included).
    """
    from qtarget_jax.models import Decoder
    from qtarget_jax.models.sharding import LOGICAL_RULES, param_shardings
    from qtarget_jax.targets import spec_from_dict
    from qtarget_jax.train import mesh as mesh_lib
    from qtarget_jax.train.build import teacher_param_dtype
    from qtarget_jax.train.optim import make_optimizer
    from qtarget_jax.train.state import TrainState, opt_state_shardings
    from qtarget_jax.train.step import jit_train_step, make_loss_fn

    mesh = mesh_lib.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                               "tensor": cfg.mesh.tensor}, devices)
    rep = mesh_lib.replicated(mesh)

    def split(model_cfg):
        graphdef, params, rest = nnx.split(
            nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
        shard = param_shardings(params, mesh, LOGICAL_RULES).to_pure_dict()
        rest = rest.to_pure_dict()
        return graphdef, _abstract(params.to_pure_dict(), shard), shard, rest

    spec = spec_from_dict(dict(cfg.loss.target))
    graphdef, params, p_shard, rest = split(student_cfg)
    tx, schedule = make_optimizer(cfg.optim, cfg.schedule, cfg.run.steps)
    o_shard = opt_state_shardings(tx, params, p_shard, mesh)
    opt_state = _abstract(jax.eval_shape(tx.init, params), o_shard)
    t_graphdef = t_params = t_shard = t_rest = None
    if spec.needs_teacher and teacher_cfg is None:
        dtype = jnp.dtype(teacher_param_dtype(cfg.model))
        t_graphdef, t_shard, t_rest = graphdef, p_shard, rest
        t_params = _abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                                          params), p_shard)
    elif spec.needs_teacher:
        t_graphdef, t_params, t_shard, t_rest = split(teacher_cfg)
    rest_shard = jax.tree.map(lambda _: rep, rest)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
                       opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
                       teacher=t_params, rest=rest, teacher_rest=t_rest)
    shardings = TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep,
                           teacher=t_shard, rest=rest_shard,
                           teacher_rest=None if t_rest is None else rest_shard)
    bsh = mesh_lib.batch_sharding(mesh)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bsh)
             for k in ("tokens", "labels", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bsh)
    loss_fn = make_loss_fn(spec, cfg.loss.normalization, fused=cfg.loss.fused, mesh=mesh,
                           normalizer=cfg.loss.normalizer or None, real_vocab=real_vocab)
    step = jit_train_step(shardings, bsh, rep, graphdef=graphdef, teacher_graphdef=t_graphdef,
                          loss_fn=loss_fn, tx=tx, schedule=schedule,
                          microbatches=cfg.data.microbatches)
    compiled = step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    memory = {"arguments": analysis.argument_size_in_bytes,
              "outputs": analysis.output_size_in_bytes,
              "aliased": analysis.alias_size_in_bytes,
              "temporaries": analysis.temp_size_in_bytes}
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                       + memory["temporaries"])
    state_bytes = {"student_params": bytes_per_chip(params),
                   "optimizer": bytes_per_chip(opt_state),
                   "teacher_params": 0 if t_params is None else bytes_per_chip(t_params)}
    return CompiledStep(compiled=compiled, state_bytes=state_bytes, memory=memory)
