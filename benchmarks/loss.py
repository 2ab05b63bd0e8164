"""Loss forward+backward: optax CE vs unfused Q-target vs the two fused paths (memory, time).

Four ways to get (loss, d/dh, d/dW) from hidden states h [N, D] and a head W [D, V]:
  (a) optax.softmax_cross_entropy_with_integer_labels on materialised logits h @ W,
  (b) qtarget_loss(h @ W, ...) (unfused Q-target),
  (c) fused_qtarget_loss(h, W, ..., path="vocab_blocks") ([Nb, Vb] tiles, two passes),
  (d) fused_qtarget_loss(h, W, ..., path="token_chunks") ([C, V] chunks, the older path).
Logits are h @ W with float32 accumulation, for float32 and bfloat16 h, W. Targets: "sft" (the
same math as (a)) and "target_sft" with a teacher given as hidden states + head
(D_teacher = 576) for (b)-(d); every ratio is to (a), plain CE without a teacher.

Memory is ahead of time at --tokens (default 8192): `jit(f).lower(...).compile()
.memory_analysis()`: "temp" is XLA's scratch (logits, their gradient, tiles, accumulators),
"total" = arguments + outputs + temp - aliased. Nothing runs at N = 8192.

Time (--time-tokens, default 2048; float32 only, --time-dims, --time-vocabs): every method is
compiled and warmed up, then the methods are called in turn, round after round (--reps rounds),
so a change in the machine's load hits all of them alike; the median of each is reported with
its ratio to (a), XLA's `cost_analysis` FLOPs and the load average before and after. Not a test:
numbers depend on the machine and its load.

Example usage:
  python benchmarks/loss.py                        # memory table + CPU timing (N = 2048)
  python benchmarks/loss.py --time-tokens 0        # memory only (about a minute)
  python benchmarks/loss.py --time-tokens 8192 --time-vocabs 49152 128256   # on a GPU/TPU
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtarget_jax.targets import fused_qtarget_loss, get_preset, qtarget_loss

D_TEACHER = 576
METHODS = ("(a) optax", "(b) unfused", "(c) vblocks", "(d) tchunks")


def _logits(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def make_fns(target: str, methods=METHODS):
    """name -> jitted value_and_grad of f(h, w, labels, mask, th, tw) w.r.t. (h, w)."""
    spec = get_preset(target)
    teacher = spec.needs_teacher

    def optax_ce(h, w, labels, mask, th, tw):
        ce = optax.softmax_cross_entropy_with_integer_labels(_logits(h, w), labels)
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def unfused(h, w, labels, mask, th, tw):
        tl = jax.lax.stop_gradient(_logits(th, tw)) if teacher else None
        return qtarget_loss(_logits(h, w), labels, mask, spec, teacher_logits=tl)[0]

    def fused(path):
        def f(h, w, labels, mask, th, tw):
            kw = {"teacher_hidden": th, "teacher_lm_head": tw} if teacher else {}
            return fused_qtarget_loss(h, w, labels, mask, spec, path=path, **kw)[0]
        return f

    fns = {"(a) optax": optax_ce, "(b) unfused": unfused, "(c) vblocks": fused("vocab_blocks"),
           "(d) tchunks": fused("token_chunks")}
    return {k: jax.jit(jax.value_and_grad(fns[k], (0, 1))) for k in methods}


def abstract_args(n, d, v, dtype):
    sds = jax.ShapeDtypeStruct
    return (sds((n, d), dtype), sds((d, v), dtype), sds((n,), jnp.int32), sds((n,), jnp.float32),
            sds((n, D_TEACHER), dtype), sds((D_TEACHER, v), dtype))


def concrete_args(n, d, v, dtype, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    labels = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
    mask = jnp.asarray(rng.uniform(size=n) < 0.9, jnp.float32)
    th = jnp.asarray(rng.normal(size=(n, D_TEACHER)), dtype)
    tw = jnp.asarray(rng.normal(size=(D_TEACHER, v)) / np.sqrt(D_TEACHER), dtype)
    return h, w, labels, mask, th, tw


def memory(fn, args) -> dict:
    stats = fn.lower(*args).compile().memory_analysis()
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    return {"temp_mib": stats.temp_size_in_bytes / 2**20, "total_mib": total / 2**20}


def flops(compiled) -> float:
    """XLA's cost_analysis FLOPs. It counts the body of a while loop once, whatever the trip
    count, so for the fused paths (loops over tiles) it is a lower bound; see matmul_flops."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


# [N, D] x [D, V]-sized matmuls of value_and_grad: the logits, dh, dW; the vocabulary-blocked
# path recomputes the logits in its backward pass.
MATMULS = {"(a) optax": 3, "(b) unfused": 3, "(c) vblocks": 4, "(d) tchunks": 3}


def matmul_flops(method, n, d, v) -> float:
    """2 N D V per [N, D] x [D, V] matmul, times the method's count (sft, no teacher)."""
    return MATMULS[method] * 2.0 * n * d * v


def memory_table(args):
    print(f"\nmemory at N={args.tokens} (temp = XLA scratch; ratios to (a) optax CE, sft, "
          "same D, V, dtype)")
    print(f"{'target':10} {'D':>5} {'V':>6} {'dtype':8} {'method':12} {'temp MiB':>9} "
          f"{'total MiB':>9} {'temp/(a)':>8} {'tot/(a)':>7}")
    rows = []
    for d in args.dims:
        for v in args.vocabs:
            for dtype_name in args.dtypes:
                shapes = abstract_args(args.tokens, d, v, jnp.dtype(dtype_name))
                base = memory(make_fns("sft", ["(a) optax"])["(a) optax"], shapes)
                for target in args.targets:
                    methods = [m for m in args.methods if target == "sft" or m != "(a) optax"]
                    for name, fn in make_fns(target, methods).items():
                        row = {"target": target, "D": d, "V": v, "dtype": dtype_name,
                               "method": name, "N": args.tokens, **memory(fn, shapes)}
                        row["temp_ratio"] = row["temp_mib"] / base["temp_mib"]
                        row["total_ratio"] = row["total_mib"] / base["total_mib"]
                        rows.append(row)
                        print(f"{target:10} {d:5d} {v:6d} {dtype_name:8} {name:12} "
                              f"{row['temp_mib']:9.0f} {row['total_mib']:9.0f} "
                              f"{row['temp_ratio']:8.3f} {row['total_ratio']:7.3f}", flush=True)
    return rows


def time_table(args):
    n = args.time_tokens
    print(f"\ntime at N={n}, float32, sft: median of {args.reps} interleaved rounds")
    print(f"{'D':>5} {'V':>6} {'method':12} {'median s':>9} {'t/(a)':>6} {'XLA GF':>8} "
          f"{'matmul GF':>9} {'F/(a)':>6}  all times s  (XLA GF: cost_analysis, loop bodies "
          "counted once; matmul GF: 2NDV x matmuls)")
    rows = []
    for d in args.time_dims:
        for v in args.time_vocabs:
            inputs = concrete_args(n, d, v, jnp.float32)
            fns = make_fns("sft", [m for m in args.time_methods])
            gflop = {k: flops(f.lower(*inputs).compile()) / 1e9 for k, f in fns.items()}
            for f in fns.values():
                jax.block_until_ready(f(*inputs))
            load_before = os.getloadavg()
            times = {k: [] for k in fns}
            for _ in range(args.reps):
                for k, f in fns.items():
                    start = time.perf_counter()
                    jax.block_until_ready(f(*inputs))
                    times[k].append(time.perf_counter() - start)
            load_after = os.getloadavg()
            base = statistics.median(times["(a) optax"])
            for k in fns:
                med = statistics.median(times[k])
                mm = matmul_flops(k, n, d, v) / 1e9
                row = {"D": d, "V": v, "N": n, "method": k, "median_s": med,
                       "ratio": med / base, "xla_gflop": gflop[k], "matmul_gflop": mm,
                       "flop_ratio": mm / (matmul_flops("(a) optax", n, d, v) / 1e9),
                       "times": times[k], "load_before": load_before, "load_after": load_after}
                rows.append(row)
                print(f"{d:5d} {v:6d} {k:12} {med:9.3f} {med / base:6.2f} {gflop[k]:8.1f} "
                      f"{mm:9.1f} {row['flop_ratio']:6.2f}  "
                      + " ".join(f"{t:.2f}" for t in times[k]), flush=True)
            print(f"      load average before {load_before[0]:.2f}, after "
                  f"{load_after[0]:.2f} (1 min)")
            del inputs
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="N for the memory table")
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 2048])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--targets", nargs="+", default=["sft", "target_sft"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="methods of the memory table")
    parser.add_argument("--time-tokens", type=int, default=2048, help="N for timing (0: skip)")
    parser.add_argument("--time-dims", type=int, nargs="+", default=[576, 2048])
    parser.add_argument("--time-vocabs", type=int, nargs="+", default=[49152])
    parser.add_argument("--time-methods", nargs="+",
                        default=["(a) optax", "(c) vblocks"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.time_tokens and "(a) optax" not in args.time_methods:
        parser.error("(a) optax is the baseline of the time ratios: keep it in --time-methods")

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min)")
    out = {"memory": [] if not args.tokens else memory_table(args)}
    out["time"] = time_table(args) if args.time_tokens else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
