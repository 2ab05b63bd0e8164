"""Run outputs on process 0: metrics.jsonl, TensorBoard, curves.png; FLOPs and MFU estimates.

Every record is one flat dict of floats with "/"-grouped names (q/p_y, perf/tokens_per_s) plus
"step". Other processes get a writer that does nothing, so callers never branch on the process.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping, Optional

PLOT_KEYS = ("loss", "eval/loss", "q/gamma", "q/p_y", "q/entropy", "q/kl_q_p", "grad_norm", "lr")


def flops_per_token(num_params: int, num_layers: int, seq_len: int, dim: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, fwd + bwd) + 12 L T D (attention scores)."""
    return 6.0 * num_params + 12.0 * num_layers * seq_len * dim


def mfu(tokens_per_s: float, flops_token: float, peak_flops_total: float) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown (0)."""
    if peak_flops_total <= 0:
        return None
    return tokens_per_s * flops_token / peak_flops_total


class MetricsWriter:
    """Appends records to <dir>/metrics.jsonl and TensorBoard (<dir>/tb) when `active`."""

    def __init__(self, run_dir: str, *, active: bool, tensorboard: bool):
        self.active = active
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if active and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(pathlib.Path(run_dir) / "tb"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def plot_curves(jsonl: str | pathlib.Path, out_png: str | pathlib.Path) -> list[str]:
    """Plots each of PLOT_KEYS found in the JSONL against step; returns the keys plotted.

    A resumed run appends to the same file; the last record of each step wins.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step: dict[int, dict] = {}
    for rec in read_jsonl(jsonl):
        by_step.setdefault(rec["step"], {}).update(rec)
    keys = [k for k in PLOT_KEYS if any(k in r for r in by_step.values())]
    if not keys:
        return []
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = sorted((s, r[key]) for s, r in by_step.items() if key in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return keys
