"""The few lines `train.py` prints when a run ends: what changed, where the run is, what next.

    print("\n".join(summary_lines(run(loaded), loaded.config)))

`summary_lines` is a pure function of the dict `qtarget_jax.train.loop.run` returns
(`start_step`, `final_step`, `stop_signal`, `eval_before`, `eval_after`) and the run's
`TrainConfig`; it reads no file. The numbers stay machine-readable: that dict in
`<run.dir>/summary.json` (`write_summary`), every step and the evaluation after training in
`<run.dir>/metrics.jsonl`, each held-out problem's output in `<run.dir>/problems_step<N>.jsonl`.
"""
from __future__ import annotations

import json
import os
import pathlib
import shlex
from typing import Any, Mapping, Optional

import jax

from qtarget_jax.targets import spec_from_dict

CHAT_PROMPT = "What is 7 + 5?"
SUMMARY_KEYS = ("start_step", "final_step", "stop_signal", "eval_before", "eval_after")

# Evaluation keys (`loop.evaluate`, `problems.solve`) -> (label, format); others print as named.
_LABELS = {
    "eval/loss": ("held-out loss", "{:.3f}"),
    "eval/accuracy": ("token accuracy", "pct"),
    "eval/p_y": ("mean p_y", "{:.3f}"),
    "eval/gamma": ("mean gamma (label trust)", "{:.3f}"),
    "eval/entropy": ("entropy of p", "{:.3f}"),
    "eval/kl_q_p": ("KL(Q || p)", "{:.4f}"),
    "eval/problems/parse_errors": ("outputs with no answer", "{:.0f}"),
}
_EXACT, _N = "eval/problems/accuracy", "eval/problems/n"


def _fmt(key: str, metrics: Optional[Mapping[str, float]]) -> str:
    if not metrics or key not in metrics:
        return "-"
    v = float(metrics[key])
    if key == _EXACT:  # greedy exact match as correct / problems
        n = int(round(float(metrics.get(_N, 0.0))))
        return f"{int(round(v * n))}/{n}" if n else f"{100 * v:.1f}%"
    fmt = _LABELS.get(key, (key, "{:.4g}"))[1]
    return f"{100 * v:.1f}%" if fmt == "pct" else fmt.format(v)


def metric_lines(before: Optional[Mapping[str, float]], after: Optional[Mapping[str, float]],
                 exact_label: str = "exact match") -> list[str]:
    """`  label   before -> after` for every metric in either dict: greedy exact match first,
    then the held-out loss and diagnostics, then any other metric (probes) under its key."""
    keys = list(dict.fromkeys([*(before or {}), *(after or {})]))
    known = [k for k in (_EXACT, *_LABELS) if k in keys]
    keys = known + [k for k in keys if k not in known and k != _N]
    if all(m is None or m.get("eval/gamma") == m.get("eval/p_y") for m in (before, after)):
        keys = [k for k in keys if k != "eval/gamma"]  # gamma = p_y (Target-SFT, DFT): once
    labels = {**{k: v[0] for k, v in _LABELS.items()}, _EXACT: exact_label}
    rows = [(labels.get(k, k), _fmt(k, before), _fmt(k, after)) for k in keys]
    width = max((len(r[0]) for r in rows), default=0)
    return [f"  {label:<{width}}  {b:>7} -> {a}" for label, b, a in rows]


def _method(cfg: Any) -> str:
    """`target_sft (eta=0.5; teacher: the frozen initial model)`."""
    knobs = dict(cfg.loss.target)
    preset = knobs.pop("preset", "?")
    parts = [", ".join(f"{k}={v}" for k, v in sorted(knobs.items()))]
    if spec_from_dict(dict(cfg.loss.target)).needs_teacher:
        parts.append("teacher: " + (cfg.model.teacher or "the frozen initial model"))
    inside = "; ".join(p for p in parts if p)
    return f"{preset} ({inside})" if inside else preset


def summary_lines(result: Mapping[str, Any], cfg: Any) -> list[str]:
    """Human-readable lines for the end of a run (no trailing newlines).

    Args:
      result: what `qtarget_jax.train.loop.run` returned: start_step, final_step, stop_signal,
        and eval_before / eval_after when the run evaluated there.
      cfg: the run's `TrainConfig` (loss.target, model, lora, eval, logging, checkpoint, run).
    Returns:
      the run's progress, before -> after for each held-out metric, and where the run is:
      its folder, TensorBoard, the exported model and the command to chat with it.
    """
    run_dir, steps = cfg.run.dir, cfg.run.steps
    start, final = int(result.get("start_step", 0)), int(result.get("final_step", 0))
    stop = result.get("stop_signal")
    source = cfg.model.source or cfg.model.name
    lora = f", LoRA rank {cfg.lora.rank}" if cfg.lora.rank else ""
    out = [f"{_method(cfg)} on {source}{lora}: steps {start} -> {final} of {steps}"]
    ckpt_dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    if stop:
        out.append(f"stopped by {stop}; the same command resumes from {ckpt_dir}")
    before, after = result.get("eval_before"), result.get("eval_after")
    if before or after:
        exact = "exact match"
        if cfg.eval.problems:
            n = cfg.eval.problems_limit
            exact = f"exact match ({'first ' + str(n) if n else 'all'} problems, greedy)"
        when = "before -> after" if before else f"resumed at step {start}: - -> after"
        out.append(f"held-out ({cfg.eval.problems or cfg.data.path}), {when}:")
        out += metric_lines(before, after, exact)
    files = ["metrics.jsonl", "summary.json", "config.yaml"]
    if cfg.eval.problems:
        outputs = sorted({s for s, ev in ((start, before), (final, after)) if ev})
        files += [f"problems_step{s}.jsonl" for s in outputs]
    if cfg.checkpoint.every_steps > 0 and not cfg.checkpoint.dir:
        files.append("checkpoints/")
    out.append(f"run folder: {run_dir} ({', '.join(files)})")
    if cfg.logging.tensorboard:
        out.append(f"TensorBoard: tensorboard --logdir {shlex.quote(os.path.join(run_dir, 'tb'))}")
    chat = f'python -m qtarget_jax.generate --model {shlex.quote(run_dir)} "{CHAT_PROMPT}"'
    hf = os.path.join(run_dir, "hf")
    if cfg.checkpoint.export_hf and final == steps:
        peft = f", adapters in {os.path.join(run_dir, 'peft')}" if cfg.lora.rank else ""
        out.append(f"exported: {hf} (Hugging Face folder, checkpoint.export_hf=true{peft})")
        out.append(f"chat: {chat}")
    else:
        out.append(f"export: checkpoint.export_hf=true on the command line writes {hf} "
                   "at the last step")
        out.append(f"chat, once exported: {chat}")
    return out


def write_summary(result: Mapping[str, Any], cfg: Any) -> Optional[pathlib.Path]:
    """Writes SUMMARY_KEYS of `result` to `<run.dir>/summary.json` on process 0 (other
    processes write nothing and get None); returns the path written."""
    if jax.process_index() != 0:
        return None
    path = pathlib.Path(cfg.run.dir) / "summary.json"
    path.write_text(json.dumps({k: result.get(k) for k in SUMMARY_KEYS}, indent=1) + "\n")
    return path
