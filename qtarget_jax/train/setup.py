"""What a run needs before its first step, built in order: `setup(loaded, probes) -> Setup`.

Decide how to initialise training. The order is important:
  1. the mesh, then the student (and teacher) created directly in their shardings;
  2. the state (params, optimizer, RNG) from those weights, and the jitted train/eval steps,
     reused from an earlier run of this process when their constants are equal
     (`compile_cache.reuse`);
  3. the checkpointer (its folder checked writable first), the data iterator and eval sets;
  4. `resume`: if a complete checkpoint exists (and checkpoint.resume), its params, optimizer
     state, step, RNG and data position replace the fresh ones (the data position is restored,
     never replayed), and metrics.jsonl is cut back to that step; without one, the records of
     an earlier attempt are removed, so a restarted run logs each step once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from qtarget_jax import checkpoint as ckpt_lib
from qtarget_jax.config import LoadedConfig, TrainConfig
from qtarget_jax.models.sharding import LOGICAL_RULES
from qtarget_jax.targets import spec_from_dict
from qtarget_jax.train import build, compile_cache
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.state import Built, TrainState, init_state
from qtarget_jax.train.step import jit_train_step, make_eval_step, make_loss_fn

log = logging.getLogger("qtarget_jax.train")

Probes = Callable[[nnx.Module, int], dict[str, float]]


@dataclasses.dataclass
class Setup:
    """Everything `run` uses, built by `setup`; `state` is replaced as training goes."""
    cfg: TrainConfig
    lead: bool                     # process 0: writes outputs
    run_dir: pathlib.Path
    mesh: Any
    model_cfg: Any                 # the student's ModelConfig
    tokenizer: Any
    built: Built                   # graphdefs and shardings of the state
    state: TrainState
    step_fn: Any                   # jitted (state, batch) -> (state, metrics)
    eval_step: Any                 # jitted (state, batch) -> summed eval metrics
    ckpt: Optional[ckpt_lib.Checkpointer]
    ckpt_dir: str
    train_it: Any
    held_out: list
    probes: Optional[Probes]


def setup(loaded: LoadedConfig, probes: Optional[Probes] = None) -> Setup:
    """Steps 1-3 of the module docstring: mesh, models, state, steps, checkpointer, data."""
    cfg = loaded.config
    lead = jax.process_index() == 0
    run_dir = pathlib.Path(cfg.run.dir)
    mesh = mesh_lib.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                               "tensor": cfg.mesh.tensor})
    model, model_cfg, tokenizer = build.build_model(
        cfg.model, cfg.run.seed, mesh=mesh, param_dtype=build.student_param_dtype(cfg.lora))
    model = build.apply_lora(model, cfg.lora, cfg.run.seed)  # rank 0: full fine-tuning
    teacher = None
    if spec_from_dict(dict(cfg.loss.target)).needs_teacher:
        teacher, teacher_cfg = build.build_teacher(cfg.model, cfg.run.seed, tokenizer, mesh=mesh)
        if teacher_cfg is not None:
            log.info("teacher %s: %d layers, hidden %d, %s params", cfg.model.teacher,
                     teacher_cfg.num_layers, teacher_cfg.hidden_size, teacher_cfg.param_dtype)
    tx, schedule = make_optimizer(cfg.optim, cfg.schedule, cfg.run.steps)
    built = init_state(model, tx, mesh, LOGICAL_RULES, cfg.run.seed, teacher=teacher,
                       teacher_dtype=build.teacher_param_dtype(cfg.model), consume=True)
    del model, teacher  # their buffers now belong to the state
    step_fn, eval_step = _steps(cfg, built, mesh, tx, schedule, real_vocab=len(tokenizer))

    # Fail at start-up, not after an hour: the checkpoint dir must be writable with room.
    # checkpoint.every_steps=0: no checkpoints at all (a run that cannot resume).
    ckpt_dir = cfg.checkpoint.dir or str(run_dir / "checkpoints")
    ckpt = None
    if cfg.checkpoint.every_steps > 0:
        ckpt_lib.check_writable(ckpt_dir, need_bytes=2 * ckpt_lib.tree_bytes(
            built.state.checkpoint_items()))
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep,
                                     best_metric=cfg.checkpoint.best_metric,
                                     best_mode=cfg.checkpoint.best_mode,
                                     async_save=cfg.checkpoint.async_save)
    return Setup(cfg=cfg, lead=lead, run_dir=run_dir, mesh=mesh, model_cfg=model_cfg,
                 tokenizer=tokenizer, built=built, state=built.state, step_fn=step_fn,
                 eval_step=eval_step, ckpt=ckpt, ckpt_dir=ckpt_dir,
                 train_it=build.train_iterator(cfg.data, tokenizer),
                 held_out=build.eval_batches(cfg.data, tokenizer, cfg.eval.batches),
                 probes=probes)


def _steps(cfg: TrainConfig, built: Built, mesh, tx, schedule, real_vocab: int):
    """(train step, eval step), jitted; the same objects as an earlier run's in this process
    when every constant they close over is equal, so their compiled programs are reused."""
    def section(x) -> str:
        return json.dumps(dataclasses.asdict(x), sort_keys=True, default=str)
    shard_leaves, shard_tree = jax.tree.flatten(built.shardings)
    key = (built.graphdef, built.teacher_graphdef, shard_tree, tuple(shard_leaves), mesh,
           section(cfg.loss), section(cfg.optim), section(cfg.schedule), section(cfg.lora),
           cfg.run.steps, cfg.data.microbatches, real_vocab)

    def make():
        bsh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
        spec = spec_from_dict(dict(cfg.loss.target))
        loss_fn = make_loss_fn(spec, cfg.loss.normalization, fused=cfg.loss.fused, mesh=mesh,
                               normalizer=cfg.loss.normalizer or None, rules=LOGICAL_RULES,
                               real_vocab=real_vocab)
        graphs = {"graphdef": built.graphdef, "teacher_graphdef": built.teacher_graphdef,
                  "loss_fn": loss_fn}
        return (jit_train_step(built.shardings, bsh, rep, tx=tx, schedule=schedule,
                               microbatches=cfg.data.microbatches, **graphs),
                make_eval_step(built.shardings, bsh, rep, **graphs))
    return compile_cache.reuse(key, make)


def resume(s: Setup) -> int:
    """Step 4 of the module docstring; returns the step training starts from."""
    cfg = s.cfg
    latest = s.ckpt.latest_step() if s.ckpt is not None else None
    if latest is not None and not cfg.checkpoint.resume:
        raise FileExistsError(f"checkpoint.dir={s.ckpt_dir!r} holds checkpoints up to step "
                              f"{latest} and checkpoint.resume=false: choose another "
                              "checkpoint.dir (or run.dir) or set checkpoint.resume=true")
    if latest is not None:
        items, data_state = s.ckpt.restore(latest, ckpt_lib.abstract_like(
            s.state.checkpoint_items(), s.built.shardings.checkpoint_items()))
        s.state = s.state.replace_checkpoint_items(items)
        s.train_it.set_state(this_process_state(data_state))
        log.info("resumed from %s step %d", s.ckpt_dir, latest)
    start = int(jax.device_get(s.state.step))
    if s.lead:
        kept = truncate_records(s.run_dir / "metrics.jsonl", start)
        if kept is not None:
            log.info("metrics.jsonl: kept %d records up to step %d", kept, start)
    return start


def truncate_records(path: pathlib.Path, step: int) -> Optional[int]:
    """Keeps the records of `path` (JSONL, each with "step") up to `step`; a fresh start
    (step 0) removes the file. Returns how many records were kept (None: no file)."""
    if not path.is_file():
        return None
    if step == 0:
        path.unlink()
        return 0
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a record cut by a kill mid-write
            continue
        if rec.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)  # atomic: a second kill leaves the old or the new file, whole
    return len(kept)


def all_process_states(local: dict) -> dict:
    """Every process's data-iterator state (JSON), gathered so one checkpoint holds them all."""
    raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros((size,), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, size)
    return {"processes": [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]}


def this_process_state(saved: dict) -> dict:
    """This process's data-iterator state out of `all_process_states`' record."""
    states = saved["processes"]
    if len(states) != jax.process_count():
        raise ValueError(f"checkpoint has data states of {len(states)} processes, this run has "
                         f"{jax.process_count()}: resume with the same process layout")
    return states[jax.process_index()]
