"""`run(loaded_config)`: the training loop around the pure step.

Per step: next batch (this process's rows) -> global arrays -> jitted step (dispatch is async) ->
metrics of the PREVIOUS step fetched, checked for NaN/inf, logged. Checkpoints: every
`checkpoint.every_steps`, at the end, and on SIGTERM/SIGINT; a step's metrics are checked before
its state is saved, so a NaN never reaches a checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from qtarget_jax import checkpoint as ckpt_lib
from qtarget_jax.config import LoadedConfig, TrainConfig, check_sources, save_resolved
from qtarget_jax.models.export import export_hf
from qtarget_jax.models.lora import has_lora, merge_lora
from qtarget_jax.models.peft_export import export_peft
from qtarget_jax.models.sharding import LOGICAL_RULES
from qtarget_jax.problems import load_examples, solve
from qtarget_jax.targets import spec_from_dict
from qtarget_jax.train import build, metrics as metrics_lib
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.signals import StopRequest
from qtarget_jax.train.state import init_state
from qtarget_jax.train.step import DIAGNOSTICS, jit_train_step, make_eval_step, make_loss_fn

log = logging.getLogger("qtarget_jax.train")


def evaluate(eval_step, state, batches, mesh) -> dict[str, float]:
    """Held-out loss and diagnostics, summed over `batches` then divided once."""
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in jax.device_get(eval_step(state, mesh_lib.global_batch(batch, mesh))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        return {}
    tokens = max(totals.get("tokens", 0.0), 1.0)
    out = {"eval/loss": totals["loss_sum"] / max(totals["denominator"], 1.0)}
    out.update({f"eval/{k}": totals[k] / tokens for k in DIAGNOSTICS if k in totals})
    return out


def _check_finite(step: int, m: dict) -> None:
    if not math.isfinite(m["loss"]):
        raise FloatingPointError(
            f"loss is {m['loss']} at step {step}: stopping; the last good checkpoint stays the "
            f"latest (grad_norm={m.get('grad_norm')}, lr={m.get('lr')})")


def _all_process_states(local: dict) -> dict:
    """Every process's data-iterator state (JSON), gathered so one checkpoint holds them all."""
    raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros((size,), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, size)
    return {"processes": [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]}


def _this_process_state(saved: dict) -> dict:
    states = saved["processes"]
    if len(states) != jax.process_count():
        raise ValueError(f"checkpoint has data states of {len(states)} processes, this run has "
                         f"{jax.process_count()}: resume with the same process layout")
    return states[jax.process_index()]


def _num_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


Probes = Callable[[nnx.Module, int], dict[str, float]]


def run(loaded: LoadedConfig, probes: Optional[Probes] = None) -> dict[str, Any]:
    """Trains per `loaded.config`; returns a summary (final step, last metrics, eval before/after).

    probes: optional `probes(model, step) -> {name: float}`, extra metrics of the current model
      (e.g. `qtarget_jax.problems.probes`) computed at every evaluation: before training, every
      eval.every_steps and after the last step; logged beside the held-out loss. Called on
      every process (a sharded model's forward is collective).

    Outputs under run.dir: config.yaml, metrics.jsonl, tb/, checkpoints/ (unless
    checkpoint.dir), curves.png, hf/ (checkpoint.export_hf).
    """
    cfg: TrainConfig = loaded.config
    check_sources(cfg)  # missing files are one ConfigError naming the key, before JAX starts
    build.init_distributed(cfg.run)

    lead = jax.process_index() == 0
    run_dir = pathlib.Path(cfg.run.dir)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(loaded, run_dir / "config.yaml")
        for line in loaded.overridden:
            log.info("config override %s", line)
    spec = spec_from_dict(dict(cfg.loss.target))
    mesh = mesh_lib.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                               "tensor": cfg.mesh.tensor})
    # Student and teacher are created directly in their shardings (no whole host copy).
    model, model_cfg, tokenizer = build.build_model(
        cfg.model, cfg.run.seed, mesh=mesh, param_dtype=build.student_param_dtype(cfg.lora))
    model = build.apply_lora(model, cfg.lora, cfg.run.seed)  # rank 0: full fine-tuning
    teacher, teacher_graphdef = None, None
    if spec.needs_teacher:
        teacher, teacher_cfg = build.build_teacher(cfg.model, cfg.run.seed, tokenizer, mesh=mesh)
        if teacher_cfg is not None:
            log.info("teacher %s: %d layers, hidden %d, %s params", cfg.model.teacher,
                     teacher_cfg.num_layers, teacher_cfg.hidden_size, teacher_cfg.param_dtype)
    tx, schedule = make_optimizer(cfg.optim, cfg.schedule, cfg.run.steps)
    built = init_state(model, tx, mesh, LOGICAL_RULES, cfg.run.seed, teacher=teacher,
                       teacher_dtype=build.teacher_param_dtype(cfg.model), consume=True)
    del model, teacher  # their buffers now belong to the state
    state = built.state
    bsh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    loss_fn = make_loss_fn(spec, cfg.loss.normalization, fused=cfg.loss.fused, mesh=mesh,
                           normalizer=cfg.loss.normalizer or None, rules=LOGICAL_RULES,
                           real_vocab=len(tokenizer))
    graphs = {"graphdef": built.graphdef, "teacher_graphdef": built.teacher_graphdef,
              "loss_fn": loss_fn}
    step_fn = jit_train_step(built.shardings, bsh, rep, tx=tx, schedule=schedule,
                             microbatches=cfg.data.microbatches, **graphs)
    eval_step = make_eval_step(built.shardings, bsh, rep, **graphs)

    # Fail at start-up, not after an hour: the checkpoint dir must be writable with room.
    # checkpoint.every_steps=0: no checkpoints at all (a run that cannot resume).
    ckpt_dir = cfg.checkpoint.dir or str(run_dir / "checkpoints")
    ckpt = None
    if cfg.checkpoint.every_steps > 0:
        ckpt_lib.check_writable(ckpt_dir, need_bytes=2 * ckpt_lib.tree_bytes(
            state.checkpoint_items()))
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep,
                                     best_metric=cfg.checkpoint.best_metric,
                                     best_mode=cfg.checkpoint.best_mode,
                                     async_save=cfg.checkpoint.async_save)
    train_it = build.train_iterator(cfg.data, tokenizer)
    held_out = build.eval_batches(cfg.data, tokenizer, cfg.eval.batches)
    problems = _load_problems(cfg)
    has_eval = bool(held_out or problems or probes)

    def evaluate_all(state, step_no: int) -> dict[str, float]:
        """Held-out loss and diagnostics, accuracy on eval.problems when set, and probes."""
        out = evaluate(eval_step, state, held_out, mesh) if held_out else {}
        if problems:
            out.update(_solve(problems, built.graphdef, state, tokenizer, cfg, step_no,
                              run_dir if lead else None))
        if probes is not None:
            model = nnx.merge(built.graphdef, state.params, state.rest)
            out.update({k: float(v) for k, v in probes(model, step_no).items()})
        return out

    # Decide how to initialise. The order matters: fresh weights from model.source first; then,
    # if a complete checkpoint exists (and resume is on), its params, optimizer state, step, RNG
    # and data position replace them. The data position is restored, never replayed.
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None and not cfg.checkpoint.resume:
        raise FileExistsError(f"checkpoint.dir={ckpt_dir!r} holds checkpoints up to step "
                              f"{latest} and checkpoint.resume=false: choose another "
                              "checkpoint.dir (or run.dir) or set checkpoint.resume=true")
    if latest is not None:
        items, data_state = ckpt.restore(latest, ckpt_lib.abstract_like(
            state.checkpoint_items(), built.shardings.checkpoint_items()))
        state = state.replace_checkpoint_items(items)
        train_it.set_state(_this_process_state(data_state))
        log.info("resumed from %s step %d", ckpt_dir, latest)
    start = int(jax.device_get(state.step))
    summary: dict[str, Any] = {"start_step": start}
    if start == 0 and has_eval:
        summary["eval_before"] = evaluate_all(state, 0)

    writer = metrics_lib.MetricsWriter(str(run_dir), active=lead,
                                       tensorboard=cfg.logging.tensorboard)
    ftok = metrics_lib.flops_per_token(_num_params((state.params, state.rest)),  # + LoRA base
                                       model_cfg.num_layers, cfg.data.seq_len,
                                       model_cfg.hidden_size)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    peak_total = cfg.logging.peak_flops * jax.device_count()
    bar = None
    if lead and cfg.logging.progress:
        bar = tqdm(total=cfg.run.steps, initial=start, unit="step", dynamic_ncols=True)

    pending: Optional[tuple[int, Any]] = None  # (step number, its metrics still on device)
    last: dict[str, float] = {}
    timer = [time.perf_counter()]

    def flush() -> None:
        """Fetches, checks and logs the pending step's metrics (blocks on that step)."""
        nonlocal pending, last
        if pending is None:
            return
        step_no, m_dev = pending
        pending = None
        m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
        _check_finite(step_no, m)
        now = time.perf_counter()
        dt, timer[0] = now - timer[0], now
        tps = tokens_per_step / max(dt, 1e-9)
        m.update({"perf/step_s": dt, "perf/tokens_per_s": tps})
        util = metrics_lib.mfu(tps, ftok, peak_total)
        if util is not None:
            m["perf/mfu"] = util
        last = m
        if step_no % cfg.logging.every_steps == 0 or step_no == cfg.run.steps:
            writer.write(step_no, m)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:.0f}")

    saved = [start]  # last step saved or restored (an in-flight async save counts)

    def save(step_no: int, eval_metrics: Optional[dict] = None) -> None:
        flush()  # the state about to be saved must have a finite loss
        if ckpt is None:
            return
        saved[0] = step_no
        ckpt.save(step_no, state.checkpoint_items(), _all_process_states(train_it.get_state()),
                  metrics=eval_metrics or None)

    step_no, ev = start, None
    with StopRequest() as stop:
        try:
            while step_no < cfg.run.steps and not stop:
                batch = mesh_lib.global_batch(next(train_it), mesh)
                state, m_dev = step_fn(state, batch)
                step_no += 1
                flush()  # previous step: it ran while this one was dispatched
                pending = (step_no, m_dev)
                ev = None
                if cfg.eval.every_steps and step_no % cfg.eval.every_steps == 0 and has_eval:
                    ev = evaluate_all(state, step_no)
                    writer.write(step_no, ev)
                if (step_no == cfg.run.steps or cfg.checkpoint.every_steps
                        and step_no % cfg.checkpoint.every_steps == 0):
                    save(step_no, ev)
            flush()
            if stop and saved[0] != step_no:
                log.warning("%s: saving step %d and exiting", stop.signal, step_no)
                save(step_no)
            if step_no == cfg.run.steps and has_eval:
                if ev is None:  # not already evaluated at this last step
                    ev = evaluate_all(state, step_no)
                    writer.write(step_no, ev)
                summary["eval_after"] = ev
        finally:
            if ckpt is not None:
                ckpt.close()
            if bar is not None:
                bar.close()
            writer.close()

    summary.update(stop_signal=stop.signal, final_step=step_no, last=last,
                   compiles=step_fn._cache_size())
    if lead and cfg.logging.plot and (run_dir / "metrics.jsonl").exists():
        metrics_lib.plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    if cfg.checkpoint.export_hf and step_no == cfg.run.steps:
        _export(built.graphdef, state, model_cfg, tokenizer, run_dir / "hf", lead,
                base_model=cfg.model.source)
    return summary


def _load_problems(cfg: TrainConfig) -> list:
    """The eval.problems examples (prompt, gold answer), or [] when unset."""
    if not cfg.eval.problems:
        return []
    return load_examples(cfg.eval.problems, limit=cfg.eval.problems_limit or None)


def _solve(problems, graphdef, state, tokenizer, cfg: TrainConfig, step_no: int,
           run_dir: Optional[pathlib.Path]) -> dict[str, float]:
    """Greedy exact-match accuracy of the current params on held-out problems
    (`eval/problems/accuracy`, `.../parse_errors`, `.../n`); outputs to run_dir as JSONL."""
    model = nnx.merge(graphdef, state.params, state.rest)
    out = None if run_dir is None else str(run_dir / f"problems_step{step_no}.jsonl")
    return solve(model, tokenizer, problems, max_new_tokens=cfg.eval.max_new_tokens,
                 out_path=out, prefix="eval/problems/")


def _export(graphdef, state, model_cfg, tokenizer, folder: pathlib.Path, lead: bool,
            base_model: str = "") -> None:
    """The final model as an HF folder (the models package's exporter), on process 0; a LoRA
    model merged, with its adapters also as a PEFT folder beside it (`peft/`)."""
    params, rest = multihost_utils.process_allgather((state.params, state.rest), tiled=True)
    if lead:  # a LoRA model is exported merged: W + (alpha / r) A B
        model = nnx.merge(graphdef, params, rest)
        export_hf(merge_lora(model), model_cfg, str(folder), tokenizer=tokenizer)
        if has_lora(model):
            export_peft(model, str(folder.parent / "peft"), base_model=base_model)
