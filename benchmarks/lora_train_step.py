"""LoRA vs full fine-tuning: memory and speed of our train step on SmolLM2-135M-Instruct.

The main job's step (configs/smollm2_target_sft.yaml): Target-SFT (eta 0.5) with the initial
model as teacher, the fused loss, scanned layers, float32 params, AdamW, batch 4 x 256 random
tokens, every position supervised. Two variants, each in its own subprocess (sequentially):

  full     every weight trained; the teacher is a frozen device copy of the initial weights
  lora16   rank-16 adapters (alpha 32) on q, k, v, o, gate, up, down; only they are trained
           and have Adam state; the teacher is the frozen base itself, adapters off (no copy)

Per variant: the state's bytes (trained params, optimizer state, frozen base, teacher copy),
XLA's compiled memory_analysis of the step (arguments, outputs, temporaries), the compile time
apart, the median seconds of --steps timed steps (after one warm-up step), tokens/s, and the
subprocess's peak RSS. Not a test: timings depend on the machine and its load (printed).

  python benchmarks/lora_train_step.py [--steps 3] [--rank 16]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from train_step import _status_mb  # benchmarks/ is sys.path[0] when run as a script

B, T = 4, 256


def _bytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def measure(variant: str, rank: int, steps: int) -> dict:
    """One variant's numbers (runs in a subprocess of its own)."""
    import jax

    from qtarget_jax.config import OptimSection, ScheduleSection
    from qtarget_jax.models import lora
    from qtarget_jax.models.gguf_io import default_model_path
    from qtarget_jax.models.loading import cached_hf_folder, load_model
    from qtarget_jax.models.sharding import LOGICAL_RULES
    from qtarget_jax.targets import get_preset
    from qtarget_jax.train import mesh as mesh_lib
    from qtarget_jax.train.optim import make_optimizer
    from qtarget_jax.train.state import INITIAL, init_state
    from qtarget_jax.train.step import jit_train_step, make_loss_fn

    model, cfg, _ = load_model(cached_hf_folder(default_model_path()), param_dtype="float32",
                               scan_layers=True)
    if variant != "full":
        lora.add_lora(model, lora.LoraConfig(rank=rank, alpha=2.0 * rank), seed=0)
    mesh = mesh_lib.make_mesh({"data": -1})
    tx, sched = make_optimizer(OptimSection(lr=1e-4, weight_decay=0.01), ScheduleSection(
        "constant"), 10 ** 6)
    built = init_state(model, tx, mesh, dict(LOGICAL_RULES), seed=0, teacher=INITIAL,
                       teacher_dtype="float32", consume=True)
    del model
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh),
                          mesh_lib.replicated(mesh), graphdef=built.graphdef,
                          teacher_graphdef=built.teacher_graphdef,
                          loss_fn=make_loss_fn(get_preset("target_sft", eta=0.5), "token",
                                               fused=True, mesh=mesh),
                          tx=tx, schedule=sched, microbatches=1)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = mesh_lib.global_batch({
        "tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((B, T), np.float32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, T), np.int32)}, mesh)
    state = built.state
    out = {"variant": variant, "trained_params_mb": _bytes(state.params) / 2 ** 20,
           "opt_state_mb": _bytes(state.opt_state) / 2 ** 20,
           "frozen_base_mb": _bytes(state.rest) / 2 ** 20,
           "teacher_copy_mb": _bytes(state.teacher) / 2 ** 20}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out.update(argument_mb=mem.argument_size_in_bytes / 2 ** 20,
               output_mb=mem.output_size_in_bytes / 2 ** 20,
               temp_mb=mem.temp_size_in_bytes / 2 ** 20)
    state, m = compiled(state, batch)
    losses = [float(jax.block_until_ready(m["loss"]))]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        losses.append(float(jax.block_until_ready(m["loss"])))
        times.append(time.perf_counter() - t0)
    out.update(step_s=float(np.median(times)), tokens_per_s=B * T / float(np.median(times)),
               losses=losses, peak_rss_mb=_status_mb("VmHWM"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.rank, args.steps)))
        return
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = []
    for variant in ("full", f"lora{args.rank}"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps",
                               str(args.steps), "--rank", str(args.rank)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"load average at end: {os.getloadavg()}")
    keys = ("trained_params_mb", "opt_state_mb", "frozen_base_mb", "teacher_copy_mb",
            "argument_mb", "temp_mb", "peak_rss_mb", "compile_s", "step_s", "tokens_per_s")
    print("| | " + " | ".join(keys) + " |")
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
