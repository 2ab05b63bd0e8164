"""Memory per chip of a job's compiled train step, from XLA's `memory_analysis`, on fake devices.

    python -m qtarget_jax.train.memory --config configs/tpu_v5p_llama3_8b.yaml --devices 32 \\
        --student llama3_8b
    python -m qtarget_jax.train.memory --config configs/tpu_v5p_qwen25_math_target_sft.yaml \\
        --devices 32 --student qwen25_math_1_5b --teacher qwen25_math_7b

The whole step (student forward + backward, teacher forward, fused loss, AdamW update) is
lowered and compiled ahead of time for `--devices` CPU devices laid out by the job's mesh, from
abstract inputs (ShapeDtypeStructs): no weight is read and nothing is allocated. Models are the
named ModelConfig presets (the job's weights need not be on this machine), with the job's
model.config, compute_dtype, remat and teacher_dtype applied.

Printed per chip: the state's arguments split into student params, Adam moments and teacher
params (exact: they are the shard sizes), and XLA's argument / output / temporary sizes of the
compiled program. Temporaries come from the CPU compiler's schedule of the same SPMD program;
a TPU or GPU compiler fuses differently, so read them as an estimate within tens of percent.
"""
from __future__ import annotations

import argparse
import os
import sys


def _abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _bytes_per_chip(tree) -> int:
    import math

    import jax
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * x.dtype.itemsize
    return total


def compiled_memory(cfg, student_cfg, teacher_cfg=None, real_vocab=None) -> dict:
    """Per-chip bytes of the compiled train step of TrainConfig `cfg` on all visible devices.

    Args:
      student_cfg / teacher_cfg: ModelConfigs (teacher None: the frozen initial student when
        the target needs a teacher, in model.teacher_dtype).
      real_vocab: the tokenizer size when the heads have padding rows.
    Returns:
      {"student_params", "optimizer", "teacher_params", "arguments", "outputs", "aliased",
       "temporaries", "total"} in bytes per chip (total = arguments + outputs - aliased + temps).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qtarget_jax.models import Decoder
    from qtarget_jax.models.sharding import LOGICAL_RULES, param_shardings
    from qtarget_jax.targets import spec_from_dict
    from qtarget_jax.train import mesh as mesh_lib
    from qtarget_jax.train.build import teacher_param_dtype
    from qtarget_jax.train.optim import make_optimizer
    from qtarget_jax.train.state import TrainState, opt_state_shardings
    from qtarget_jax.train.step import jit_train_step, make_loss_fn

    mesh = mesh_lib.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                               "tensor": cfg.mesh.tensor})
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
    analysis = step.lower(state, batch).compile().memory_analysis()
    out = {"student_params": _bytes_per_chip(params), "optimizer": _bytes_per_chip(opt_state),
           "teacher_params": 0 if t_params is None else _bytes_per_chip(t_params),
           "arguments": analysis.argument_size_in_bytes,
           "outputs": analysis.output_size_in_bytes,
           "aliased": analysis.alias_size_in_bytes,
           "temporaries": analysis.temp_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="job YAML")
    ap.add_argument("--devices", type=int, required=True, help="chips the job is written for")
    ap.add_argument("--student", required=True, help="ModelConfig preset, e.g. llama3_8b")
    ap.add_argument("--teacher", help="ModelConfig preset of model.teacher (default: the "
                                      "frozen initial student)")
    ap.add_argument("--real-vocab", type=int, help="tokenizer size when heads are padded")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. data.batch_size=64")
    args = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from qtarget_jax.config import load_config
    from qtarget_jax.models import ModelConfig

    cfg = load_config(args.config, tuple(args.overrides)).config
    m = cfg.model
    student = getattr(ModelConfig, args.student)(
        **{**m.config, "compute_dtype": m.compute_dtype, "remat_policy": m.remat,
           "param_dtype": "float32"})
    teacher = None
    if args.teacher:
        from qtarget_jax.train.build import teacher_param_dtype
        t_changes = dict(m.teacher_config)
        if "scan_layers" in m.config:
            t_changes.setdefault("scan_layers", m.config["scan_layers"])
        teacher = getattr(ModelConfig, args.teacher)(
            **{**t_changes, "compute_dtype": m.compute_dtype, "remat_policy": "none",
               "param_dtype": teacher_param_dtype(m)})
    mem = compiled_memory(cfg, student, teacher, args.real_vocab)
    gib = 1 << 30
    print(f"{args.config}: {args.devices} devices, mesh data={cfg.mesh.data} "
          f"fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor}, student {args.student}, teacher "
          f"{args.teacher or 'initial student'} ({m.teacher_dtype or m.compute_dtype})")
    for key in ("student_params", "optimizer", "teacher_params", "arguments", "outputs",
                "aliased", "temporaries", "total"):
        print(f"  {key:15s} {mem[key] / gib:8.2f} GiB per chip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
