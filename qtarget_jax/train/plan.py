"""Plan a job for a TPU slice without the slice: memory per chip, fit, FLOPs and an estimated MFU.

    python -m qtarget_jax.train.plan --config configs/tpu_v5p_llama3_8b.yaml --topology v5p:2x4x4
    python -m qtarget_jax.train.plan --config configs/tpu_v5p_qwen25_math_target_sft.yaml \\
        --topology v5p:2x2x1 --teacher qwen25_math_7b --real-vocab 151665 [--fit]
    python -m qtarget_jax.train.plan --config configs/gpu_8xh100_llama3_8b.yaml --devices 8 \\
        --hbm-gib 80     # no TPU compiler applies: XLA:CPU on 8 fake devices, memory only

`--topology` compiles the job's real train step (aot.py: the step train.py runs, with the
job's mesh and microbatches) with libtpu's TPU compiler for that slice on this CPU machine
(`jax.experimental.topologies`, any generation and shape libtpu knows: v4:2x2x1, v5e:2x4,
v5p:2x4x4, v6e:4x4 ...). No weight is read; models are the ModelConfig presets (`--student`
defaults to the job's model.name) with the job's model.config, compute_dtype and remat. It
prints per chip: the state (student params, Adam moments, teacher params: exact shard sizes),
the compiler's arguments / outputs / aliased / temporaries and their total against the chip's
HBM; FLOPs per step; the collectives of the compiled program; and an ESTIMATED step time,
tokens/s per chip and MFU from the compiler's cost model (`optimal_seconds`), not a measurement.

Loops. `cost_analysis()` counts a while-loop body once (scanned layers, the microbatch loop,
the fused loss's tile loops), so its FLOPs and time cover a fraction of the step. Two fixes
exist: compile a loop-free variant for the estimate, or scale by the loops' trip counts read
from the HLO. This module scales (hlo_stats.py), because it is the cheaper to compile: the
fused loss's tile loops run hundreds of iterations and cannot be unrolled at all, and unrolling
the layers of the 8B job multiplies its ~2 minute compile on these cores by tens. The compiled
FLOPs are the compiler's count plus the matmul FLOPs of every extra loop iteration; the time
is `optimal_seconds` scaled by the same ratio (every loop body assumed as compute-bound as the
program: the optimizer update, outside the loops, is then overcounted, so the estimate errs
slow). Every estimate is checked (a positive time, every trip count read, the HLO's matmuls
within the compiler's count, at least the model's FLOPs, MFU <= 1); one that fails prints
"no estimate" and why. Model FLOPs: 6 N + attention per student token, 2 N_T + attention per
teacher token (metrics.flops_per_token, PaLM's convention).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Optional

from qtarget_jax.libtpu_env import answer_libtpu

GIB = 1 << 30
# Per-chip HBM (GiB) and dense bf16 peak FLOP/s of each TPU generation, from the Cloud TPU
# system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB,
# 275 TFLOP/s; v5e 16 GiB, 197 TFLOP/s; v5p 95 GiB, 459 TFLOP/s; v6e (Trillium) 32 GiB,
# 918 TFLOP/s.
CHIPS = {"v4": (32.0, 275e12), "v5e": (16.0, 197e12), "v5p": (95.0, 459e12),
         "v6e": (32.0, 918e12)}
FIT_MARGIN = 0.10  # --fit keeps this fraction of HBM free (runtime buffers, fragmentation)
INSTALL = ("the TPU compiler (libtpu) is not installed: pip install -e '.[tpu]' "
           "(or pip install 'libtpu==0.0.42.*')")


class DoesNotFit(Exception):
    """The job's step needs more HBM per chip than the chip has."""


def chip_of(topology: str) -> tuple[str, float, float]:
    """'v5p:2x4x4' -> ('v5p', HBM GiB, peak bf16 FLOP/s)."""
    gen = topology.split(":")[0]
    if gen not in CHIPS:
        raise ValueError(f"--topology {topology!r}: generation {gen!r} is not one of "
                         f"{sorted(CHIPS)} (e.g. v5p:2x4x4, v5e:2x4, v6e:4x4)")
    return (gen, *CHIPS[gen])


def tpu_devices(topology: str) -> list:
    """One device per chip of a TPU slice that need not exist, from libtpu's topology.

    libtpu looks for the TPU VM it runs on (metadata server, worker list) and warns when there
    is none; naming this host as the only worker, of the slice's accelerator type, answers it
    without touching the compile (set before libtpu loads, never over a user's setting).
    A process that already planned another generation keeps the first TPU_ACCELERATOR_TYPE:
    it only silences the warning.
    """
    gen, shape = topology.split(":")
    chips = math.prod(int(d) for d in shape.split("x"))
    cores = chips * (2 if gen in ("v4", "v5p") else 1)  # v4/v5p type names count cores
    # No chip is opened: processes planning at once (pytest -n 2) need not share a lockfile.
    answer_libtpu(f"{gen}-{cores}")
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    # v4 lists both TensorCores of a chip; JAX runs one (megacore) device per chip.
    return [d for d in topo.devices if getattr(d, "core_on_chip", 0) == 0]


def libtpu_missing() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is None


def model_configs(cfg, student: Optional[str], teacher: Optional[str]):
    """(student ModelConfig, teacher ModelConfig or None) from presets and the job's model."""
    from qtarget_jax.models import ModelConfig
    from qtarget_jax.train.build import teacher_param_dtype
    m = cfg.model
    name = student or m.name
    changes = {**m.config, "compute_dtype": m.compute_dtype, "remat_policy": m.remat,
               "param_dtype": "float32"}
    if student is None and m.source == "init":  # model.config holds every field
        s = ModelConfig(**changes)
    elif hasattr(ModelConfig, name):
        s = getattr(ModelConfig, name)(**changes)
    else:
        where = "--student" if student else "the config's model.name (or pass --student)"
        raise ValueError(f"plan: {where} {name!r} is not a ModelConfig preset; presets: "
                         f"{', '.join(model_presets())}")
    if teacher is None:
        return s, None
    changes = dict(m.teacher_config)
    if "scan_layers" in m.config:
        changes.setdefault("scan_layers", m.config["scan_layers"])
    t = getattr(ModelConfig, teacher)(**{**changes, "compute_dtype": m.compute_dtype,
                                         "remat_policy": "none",
                                         "param_dtype": teacher_param_dtype(m)})
    return s, t


def model_presets() -> list[str]:
    """The names of ModelConfig's preset constructors (`ModelConfig.llama3_8b()` ...)."""
    from qtarget_jax.models import ModelConfig
    return sorted(n for n, v in vars(ModelConfig).items()
                  if isinstance(v, classmethod) and not n.startswith("from_"))


def count_params(model_cfg) -> int:
    from flax import nnx

    from qtarget_jax.models import Decoder
    abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def model_flops(cfg, student, teacher) -> float:
    """Model FLOPs of one step (all chips): student 6 N + attention per token, plus the
    teacher's forward (a third of its training FLOPs) when the target reads a teacher."""
    from qtarget_jax.targets import spec_from_dict
    from qtarget_jax.train.metrics import flops_per_token
    T = cfg.data.seq_len
    tokens = cfg.data.batch_size * T
    f = flops_per_token(count_params(student), student.num_layers, T, student.q_dim)
    if spec_from_dict(dict(cfg.loss.target)).needs_teacher:
        t = teacher or student
        f += flops_per_token(count_params(t), t.num_layers, T, t.q_dim) / 3
    return f * tokens


def estimate(compiled, model_flops_chip: float, tokens_chip: float, peak: float) -> dict:
    """Compiled FLOPs and the cost model's step time, tokens/s and MFU per chip, checked.

    Returns {"cost_flops", "compiled_flops", "loops", "collectives"} plus either {"step_s", "tokens_per_s",
    "mfu"} or {"no_estimate": reason}.
    """
    from qtarget_jax.train.hlo_stats import hlo_stats
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    secs, flops = float(cost.get("optimal_seconds", -1)), float(cost.get("flops", 0))
    st = hlo_stats(compiled.as_text())
    out = {"cost_flops": flops, "compiled_flops": flops + st.dot_flops - st.dot_flops_once,
           "loops": st.trip_counts, "collectives": st.collectives}
    if not (math.isfinite(secs) and secs > 0 and flops > 0):
        return {**out, "no_estimate": f"the cost model returned optimal_seconds={secs:g}"}
    if st.unknown_trip_counts:
        return {**out, "no_estimate": f"{st.unknown_trip_counts} loops' trip counts unread"}
    if st.dot_flops_once > 1.05 * flops:
        return {**out, "no_estimate": f"the HLO's matmuls ({st.dot_flops_once:.3g}) exceed "
                                      f"the compiler's count ({flops:.3g})"}
    if out["compiled_flops"] < 0.9 * model_flops_chip:
        return {**out, "no_estimate": f"compiled FLOPs {out['compiled_flops']:.3g} below the "
                                      f"model's {model_flops_chip:.3g}"}
    step = secs * out["compiled_flops"] / flops
    mfu = model_flops_chip / (step * peak)
    if not 0 < mfu <= 1:
        return {**out, "no_estimate": f"MFU {mfu:.3g} outside (0, 1]"}
    return {**out, "step_s": step, "tokens_per_s": tokens_chip / step, "mfu": mfu}


def _exhausted(e: Exception, chip: str, hbm: float) -> Optional[DoesNotFit]:
    """A compiler RESOURCE_EXHAUSTED as DoesNotFit (GiB needed read from it when stated)."""
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
        return None
    # "Used 20.50G of 15.75G hbm" or "... HLO temporaries (42.01G) exceeds available HBM"
    used = (re.search(r"Used ([\d.]+)([KMGT]) of", msg)
            or re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", msg))
    scale = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 1024.0}
    need = (f"at least {float(used.group(1)) * scale[used.group(2)]:.1f}" if used
            else f"more than {hbm:.1f}")
    return DoesNotFit(f"does not fit: {chip} chip needs {need} GiB, has {hbm:.1f} GiB")


def compile_job(cfg, student, teacher, real_vocab, devices, chip: str, hbm: Optional[float]):
    """aot.compile_step, with an out-of-memory compile turned into DoesNotFit."""
    from qtarget_jax.train.aot import compile_step
    try:
        return compile_step(cfg, student, teacher, real_vocab, devices)
    except Exception as e:  # noqa: BLE001 - only RESOURCE_EXHAUSTED is turned into a line
        err = _exhausted(e, chip, hbm or 0.0)
        if err is None:
            raise
        raise err from None


def with_batch(cfg, batch_size: int):
    """`cfg` with data.batch_size replaced."""
    import dataclasses
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size))


def fit_batch(total, unit: int, budget: float) -> tuple[Optional[int], float]:
    """Largest batch k x unit whose `total(batch)` bytes fit `budget`.

    Memory is linear in the batch, so totals at 1 and 2 units predict the largest k; the
    prediction is compiled to confirm, then the search steps up or bisects down. Returns
    (batch_size, its total) or (None, the total at one unit).
    """
    t1 = total(unit)
    if t1 > budget:
        return None, t1
    t2 = total(2 * unit)
    if t2 > budget:
        return unit, t1
    lo, hi, best = 2, None, t2
    probe = max(3, 1 + int((budget - t1) // max(t2 - t1, 1)))
    while hi is None or hi - lo > 1:
        t = total(probe * unit)
        if t <= budget:
            lo, best = probe, t
        else:
            hi = probe
        probe = lo + 1 if hi is None else (lo + hi) // 2
    return lo * unit, best


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def report(name: str, where: str, cfg, step, est: Optional[dict], chip: str,
           hbm: Optional[float], model_flops_chip: float) -> list[str]:
    """The printed plan, one `key: value` per line (parsed by tests)."""
    d = cfg.data
    lines = [f"plan: {name} on {where}",
             f"  batch: {d.batch_size} x {d.seq_len} tokens in {d.microbatches} microbatches, "
             f"mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor}",
             "memory per chip (GiB; state exact, the rest from the compiler):"]
    for k, v in {**step.state_bytes, **step.memory}.items():
        lines.append(f"  {k}: {_gib(v)}")
    if hbm:
        free = hbm - step.memory["total"] / GIB
        lines.append(f"  hbm: {hbm:.2f} ({chip}), headroom {free:.2f}")
    if est is None:
        return lines + ["estimate: none (XLA:CPU: no TPU cost model)"]
    lines += ["flops per chip per step:",
              f"  model: {model_flops_chip:.4g} (student 6N + attention, teacher forward 2N_T "
              f"+ attention)",
              f"  compiled: {est['compiled_flops']:.4g} "
              f"({est['compiled_flops'] / model_flops_chip:.2f}x model: recompute and the loss; "
              f"loops {list(est['loops'])} counted)",
              f"  cost_analysis: {est['cost_flops']:.4g} (the compiler's count: loop bodies once)",
              "collectives per chip per step (count, GiB):"]
    for op, (n, b) in est["collectives"].items():
        lines.append(f"  {op}: {n} {_gib(b)}")
    if "no_estimate" in est:
        return lines + [f"estimate: no estimate ({est['no_estimate']})"]
    return lines + [
        "estimate (the TPU compiler's cost model, not a measurement):",
        f"  step_s: {est['step_s']:.4g}",
        f"  tokens_per_s_per_chip: {est['tokens_per_s']:.5g}",
        f"  mfu: {est['mfu']:.4f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="job YAML")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU slice, e.g. v5p:2x4x4 (TPU compiler, libtpu)")
    where.add_argument("--devices", type=int, help="XLA:CPU on this many fake devices (GPU jobs)")
    ap.add_argument("--hbm-gib", type=float, help="memory per device for --devices (GiB)")
    ap.add_argument("--student", help="ModelConfig preset (default: the job's model.name)")
    ap.add_argument("--teacher", help="ModelConfig preset of model.teacher (default: the "
                                      "frozen initial student)")
    ap.add_argument("--real-vocab", type=int, help="tokenizer size when heads are padded")
    ap.add_argument("--fit", action="store_true", help="search the largest batch that fits")
    ap.add_argument("--margin", type=float, default=FIT_MARGIN,
                    help=f"--fit keeps this fraction of HBM free (default {FIT_MARGIN})")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. data.batch_size=64")
    args = ap.parse_args(argv)
    if args.topology:
        if libtpu_missing():
            print(INSTALL)
            return 2
        chip, hbm, peak = chip_of(args.topology)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compile needs no TPU attached
    else:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
        chip, hbm, peak = "device", args.hbm_gib, None
    from qtarget_jax.config import load_config
    from qtarget_jax.train.mesh import mesh_shape
    cfg = load_config(args.config, tuple(args.overrides)).config
    try:
        student, teacher = model_configs(cfg, args.student, args.teacher)
    except ValueError as e:
        print(e)
        return 2
    import jax
    devices = tpu_devices(args.topology) if args.topology else jax.devices()[:args.devices]
    where = (f"{args.topology} ({len(devices)} chips, TPU compiler)" if args.topology
             else f"{len(devices)} fake CPU devices (XLA:CPU)")
    data, fsdp, _ = mesh_shape({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                                "tensor": cfg.mesh.tensor}, len(devices))
    if args.fit:
        if not hbm:
            ap.error("--fit needs the device's memory: --topology, or --hbm-gib with --devices")

        def total(batch_size):
            try:
                return compile_job(with_batch(cfg, batch_size), student, teacher,
                                   args.real_vocab, devices, chip, hbm).memory["total"]
            except DoesNotFit:
                return math.inf
        batch, t = fit_batch(total, cfg.data.microbatches * data * fsdp,
                             (1 - args.margin) * hbm * GIB)
        if batch is None:
            print(f"does not fit: {chip} chip needs {t / GIB:.1f} GiB at the smallest batch, "
                  f"has {hbm:.1f} GiB")
            return 1
        print(f"fit: data.batch_size={batch} ({batch // (data * fsdp)} sequences per chip per "
              f"step) uses {t / GIB:.2f} GiB of {hbm:.1f} GiB ({chip}, margin {args.margin:.0%})")
        return 0
    try:
        step = compile_job(cfg, student, teacher, args.real_vocab, devices, chip, hbm)
    except DoesNotFit as e:
        print(e)
        return 1
    flops_chip = model_flops(cfg, student, teacher) / len(devices)
    tokens_chip = cfg.data.batch_size * cfg.data.seq_len / len(devices)
    est = estimate(step.compiled, flops_chip, tokens_chip, peak) if args.topology else None
    print("\n".join(report(args.config, where, cfg, step, est, chip, hbm, flops_chip)))
    if hbm and step.memory["total"] > hbm * GIB:
        print(f"does not fit: {chip} chip needs {step.memory['total'] / GIB:.1f} GiB, "
              f"has {hbm:.1f} GiB")
        return 1
    if hbm:
        print(f"fit: yes, {step.memory['total'] / GIB:.2f} GiB of {hbm:.1f} GiB ({chip})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
