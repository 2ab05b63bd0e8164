"""Training: mesh + shardings, optax chain, sharded state, the pure step, and the loop.

    mesh.py     Mesh ("data", "fsdp", "tensor"), logical-rule shardings, global batches
    optim.py    clip -> AdamW/SGD with masked weight decay, warmup + cosine/linear schedules
    state.py    TrainState (step, params, opt_state, rng, teacher, rest) created sharded
    step.py     train_step(state, batch) -> (state, metrics), jitted once
    setup.py    what a run builds before its first step, in order, and resume
    loop.py     run(loaded_config): the step loop, evaluation, checkpoints, timings
    compile_cache.py  JAX's persistent cache folder; jitted steps reused across runs
    build.py    models, teacher, tokenizer, iterators, jax.distributed from the config
    metrics.py  JSONL / TensorBoard / curves, FLOPs and MFU
    signals.py  SIGTERM / SIGINT -> save and stop
    aot.py      the step compiled ahead of time from abstract inputs, for any device list
    plan.py     python -m qtarget_jax.train.plan: memory per chip, fit, FLOPs, estimated MFU
                of a job on a TPU slice, from the TPU compiler, without the slice
    hlo_stats.py  matmul FLOPs and collectives of compiled HLO, loops counted by trip count
"""
from qtarget_jax.train.state import TrainState
from qtarget_jax.train.step import train_step

__all__ = ["TrainState", "train_step"]
