"""`run(loaded_config)`: the training loop around the pure step.

Per step: next batch (this process's rows) -> global arrays -> jitted step (dispatch is async) ->
metrics of the PREVIOUS step fetched, checked for NaN/inf, logged. Checkpoints: every
`checkpoint.every_steps`, at the end, and on SIGTERM/SIGINT; a step's metrics are checked before
its state is saved, so a NaN never reaches a checkpoint. What is built before the first step,
and in which order, is `train.setup`.

Timings (docs/training.md): `perf/step_s` is one step's device time alone: from the later of
its dispatch and the previous step's end to its own end, both seen where its metrics are fetched
anyway (one step late), so no host sync is added. Compilation is `perf/compile_s` (logged with
the first step; 0 when this process had compiled the step already), and each evaluation's
wall time (held-out loss, problems, probes) is `perf/eval_s` in its record.
"""
from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from qtarget_jax.config import LoadedConfig, TrainConfig, check_sources, save_resolved
from qtarget_jax.models.export import export_hf
from qtarget_jax.models.lora import has_lora, merge_lora
from qtarget_jax.models.peft_export import export_peft
from qtarget_jax.problems import load_examples, solve
from qtarget_jax.train import build, metrics as metrics_lib
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.setup import Probes, Setup, all_process_states, resume, setup
from qtarget_jax.train.signals import StopRequest
from qtarget_jax.train.step import DIAGNOSTICS

log = logging.getLogger("qtarget_jax.train")


def run(loaded: LoadedConfig, probes: Optional[Probes] = None) -> dict[str, Any]:
    """Trains per `loaded.config`; returns a summary (final step, last metrics, eval before/after).

    probes: optional `probes(model, step) -> {name: float}`, extra metrics of the current model
      (e.g. `qtarget_jax.problems.probes`) computed at every evaluation: before training, every
      eval.every_steps and after the last step; logged beside the held-out loss. Called on
      every process (a sharded model's forward is collective).

    Returns {"start_step", "eval_before" (when starting at 0 with any evaluation),
    "eval_after" (when the last step was reached), "stop_signal", "final_step", "last" (the
    last step's metrics), "compiles" (train-step compilations in this run), "compile_s"}.
    Outputs under run.dir: config.yaml, metrics.jsonl, tb/, checkpoints/ (unless
    checkpoint.dir), curves.png, hf/ (checkpoint.export_hf).
    """
    cfg: TrainConfig = loaded.config
    check_sources(cfg)  # missing files are one ConfigError naming the key, before JAX starts
    build.init_distributed(cfg.run)
    if jax.process_index() == 0:
        pathlib.Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        save_resolved(loaded, pathlib.Path(cfg.run.dir) / "config.yaml")
        for line in loaded.overridden:
            log.info("config override %s", line)
    s = setup(loaded, probes)
    start = resume(s)
    evaluator = Evaluation(s)
    summary: dict[str, Any] = {"start_step": start}
    if start == 0 and evaluator.active:
        summary["eval_before"] = evaluator(s.state, 0)

    loop = StepLoop(s, start)
    with StopRequest() as stop:
        try:
            step_no, ev = loop.train(evaluator, stop)
            if stop and loop.saved != step_no:
                log.warning("%s: saving step %d and exiting", stop.signal, step_no)
                loop.save(step_no)
            if step_no == cfg.run.steps and evaluator.active:
                if ev is None:  # not already evaluated at this last step
                    ev = evaluator(s.state, step_no)
                    evaluator.record(loop.writer, step_no, ev)
                summary["eval_after"] = ev
        finally:
            loop.close()

    summary.update(stop_signal=stop.signal, final_step=step_no, last=loop.last,
                   compiles=loop.compiles, compile_s=loop.compile_s)
    if s.lead and cfg.logging.plot and (s.run_dir / "metrics.jsonl").exists():
        metrics_lib.plot_curves(s.run_dir / "metrics.jsonl", s.run_dir / "curves.png")
    if cfg.checkpoint.export_hf and step_no == cfg.run.steps:
        _export(s.built.graphdef, s.state, s.model_cfg, s.tokenizer, s.run_dir / "hf", s.lead,
                base_model=cfg.model.source)
    return summary


class Evaluation:
    """`evaluation(state, step) -> metrics`: held-out loss and diagnostics, greedy accuracy on
    eval.problems when set, and the probes; `record(...)` adds its wall time (`perf/eval_s`)."""

    def __init__(self, s: Setup):
        self.s, self.seconds = s, 0.0
        self.problems = _load_problems(s.cfg)
        self.active = bool(s.held_out or self.problems or s.probes)

    def record(self, writer, step_no: int, metrics: dict) -> None:
        """Logs `metrics` (this evaluation's) with `perf/eval_s`."""
        writer.write(step_no, {**metrics, "perf/eval_s": self.seconds})

    def __call__(self, state, step_no: int) -> dict[str, float]:
        s, t0 = self.s, time.perf_counter()
        out = evaluate(s.eval_step, state, s.held_out, s.mesh) if s.held_out else {}
        if self.problems:
            out.update(_solve(self.problems, s.built.graphdef, state, s.tokenizer, s.cfg,
                              step_no, s.run_dir if s.lead else None))
        if s.probes is not None:
            model = nnx.merge(s.built.graphdef, state.params, state.rest)
            out.update({k: float(v) for k, v in s.probes(model, step_no).items()})
        self.seconds = time.perf_counter() - t0
        return out


class StepLoop:
    """The steps from `start` to run.steps: dispatch, the one-step-late metrics fetch with its
    timing, periodic evaluation and checkpoints. Owns the metrics writer and progress bar."""

    def __init__(self, s: Setup, start: int):
        cfg = s.cfg
        self.s, self.saved = s, start  # last step saved or restored (async saves count)
        self.pending: Optional[tuple[int, Any, float]] = None  # (step, metrics on device,
        #                                                          time its dispatch returned)
        self.last: dict[str, float] = {}
        self.compile_s, self.compiles = 0.0, 0
        self.writer = metrics_lib.MetricsWriter(str(s.run_dir), active=s.lead,
                                                tensorboard=cfg.logging.tensorboard)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.ftok = metrics_lib.flops_per_token(
            _num_params((s.state.params, s.state.rest)),  # + LoRA base
            s.model_cfg.num_layers, cfg.data.seq_len, s.model_cfg.hidden_size)
        self.peak_total = cfg.logging.peak_flops * jax.device_count()
        self.bar = None
        if s.lead and cfg.logging.progress:
            self.bar = tqdm(total=cfg.run.steps, initial=start, unit="step", dynamic_ncols=True)
        self.step_no = start
        self._done_at = time.perf_counter()  # when the previous step was seen finished

    def train(self, evaluator: Evaluation, stop) -> tuple[int, Optional[dict]]:
        """Steps until run.steps or a stop request; returns (last step, its eval or None)."""
        s, cfg, ev = self.s, self.s.cfg, None
        while self.step_no < cfg.run.steps and not stop:
            dispatched = self.dispatch()
            self.flush()  # the previous step: it ran while this one was dispatched
            self.pending, ev = dispatched, None
            step_no = self.step_no
            if cfg.eval.every_steps and step_no % cfg.eval.every_steps == 0 and evaluator.active:
                self.flush()  # evaluation reads this step's state: no extra wait
                ev = evaluator(s.state, step_no)
                evaluator.record(self.writer, step_no, ev)
            if (step_no == cfg.run.steps or cfg.checkpoint.every_steps
                    and step_no % cfg.checkpoint.every_steps == 0):
                self.save(step_no, ev)
        self.flush()
        return self.step_no, ev

    def dispatch(self) -> tuple[int, Any, float]:
        """Runs the next step asynchronously (the first call in a process also compiles);
        returns (its step number, its metrics on device, when its dispatch returned)."""
        s = self.s
        batch = mesh_lib.global_batch(next(s.train_it), s.mesh)
        before = s.step_fn._cache_size()
        t0 = time.perf_counter()
        s.state, m_dev = s.step_fn(s.state, batch)
        t1 = time.perf_counter()
        if s.step_fn._cache_size() != before:  # traced and compiled (or read from disk)
            self.compiles += 1
            self.compile_s += t1 - t0
        self.step_no += 1
        return self.step_no, m_dev, t1

    def flush(self) -> None:
        """Fetches, checks, times and logs the pending step's metrics (blocks on that step)."""
        if self.pending is None:
            return
        step_no, m_dev, dispatched = self.pending
        self.pending = None
        m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
        _check_finite(step_no, m)
        now = time.perf_counter()
        dt = now - max(self._done_at, dispatched)  # this step alone, not what ran between
        self._done_at = now
        tps = self.tokens_per_step / max(dt, 1e-9)
        m.update({"perf/step_s": dt, "perf/tokens_per_s": tps})
        if self.compiles and not self.last:  # the run's first logged step
            m["perf/compile_s"] = self.compile_s
        util = metrics_lib.mfu(tps, self.ftok, self.peak_total)
        if util is not None:
            m["perf/mfu"] = util
        self.last = m
        cfg = self.s.cfg
        if step_no % cfg.logging.every_steps == 0 or step_no == cfg.run.steps:
            self.writer.write(step_no, m)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:.0f}")

    def save(self, step_no: int, eval_metrics: Optional[dict] = None) -> None:
        """A checkpoint of the current state (its loss checked finite first)."""
        self.flush()
        s = self.s
        if s.ckpt is None:
            return
        self.saved = step_no
        s.ckpt.save(step_no, s.state.checkpoint_items(),
                    all_process_states(s.train_it.get_state()),
                    metrics=eval_metrics or None)

    def close(self) -> None:
        if self.s.ckpt is not None:
            self.s.ckpt.close()
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


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


def _num_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


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
