"""A few train steps of a tiny Decoder on fixed batches; run in-process or as one of N processes.

As a script (spawned by multiprocess_test.py):
  python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS OUT_JSON
it initialises jax.distributed on localhost with gloo CPU collectives, feeds this process only
its rows of each global batch, and writes the losses to OUT_JSON (process 0).
"""
import json
import os
import sys

STEPS, BATCH, SEQ = 3, 8, 16
MODEL = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
# The teacher is independent of the student: twice as wide, one layer deeper, same vocabulary.
TEACHER = dict(MODEL, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=8,
               num_kv_heads=4)
TARGET = {"preset": "kl_anchor", "kl_weight": 0.5}  # needs the teacher


def global_batches():
    import numpy as np
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        tokens = rng.integers(0, 128, (BATCH, SEQ)).astype(np.int32)
        mask = (rng.random((BATCH, SEQ)) < 0.6).astype(np.float32)
        labels = np.where(mask > 0, np.roll(tokens, -1, 1), -100).astype(np.int32)
        out.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                    "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
                    "segment_ids": np.ones((BATCH, SEQ), np.int32)})
    return out


def run_losses(mesh_sizes, devices=None, microbatches=1, fused=False, **model_changes):
    """Losses of STEPS steps; each process feeds only its contiguous share of the rows."""
    import jax
    from flax import nnx

    from qtarget_jax.config import OptimSection, ScheduleSection
    from qtarget_jax.models import Decoder, ModelConfig
    from qtarget_jax.models.sharding import LOGICAL_RULES
    from qtarget_jax.targets import spec_from_dict
    from qtarget_jax.train import mesh as mesh_lib
    from qtarget_jax.train.optim import make_optimizer
    from qtarget_jax.train.state import init_state
    from qtarget_jax.train.step import jit_train_step, make_loss_fn

    mesh = mesh_lib.make_mesh(mesh_sizes, devices)
    tx, sched = make_optimizer(OptimSection(lr=1e-2), ScheduleSection(warmup_steps=1), STEPS)
    spec = spec_from_dict(TARGET)
    assert spec.needs_teacher
    built = init_state(Decoder(ModelConfig(**MODEL, **model_changes), rngs=nnx.Rngs(0)), tx, mesh,
                       dict(LOGICAL_RULES), seed=0,
                       teacher=Decoder(ModelConfig(**TEACHER), rngs=nnx.Rngs(1)))
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh),
                          mesh_lib.replicated(mesh), graphdef=built.graphdef,
                          loss_fn=make_loss_fn(spec, "token", fused=fused, mesh=mesh), tx=tx,
                          schedule=sched, microbatches=microbatches,
                          teacher_graphdef=built.teacher_graphdef)
    state, losses = built.state, []
    p, n = jax.process_index(), jax.process_count()
    for batch in global_batches():
        local = {k: v[p * BATCH // n:(p + 1) * BATCH // n] for k, v in batch.items()}
        state, metrics = step(state, mesh_lib.global_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    return losses, step._cache_size()


def main(pid: int, nproc: int, port: int, ndev: int, out: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", nproc, pid)
    assert jax.device_count() == nproc * ndev and jax.local_device_count() == ndev
    losses, compiles = run_losses({"data": 1, "fsdp": -1, "tensor": 2}, fused=True)
    if pid == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "compiles": compiles}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
