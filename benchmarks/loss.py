"""Loss forward+backward: optax CE vs unfused Q-target vs fused Q-target (memory and time).

Three ways to get (loss, d/dh, d/dW) from hidden states h [N, D] and a head W [D, V]:
  (a) optax.softmax_cross_entropy_with_integer_labels on materialised logits h @ W,
  (b) qtarget_loss(h @ W, ...) (unfused Q-target),
  (c) fused_qtarget_loss(h, W, ...) (chunked, never holds [N, V]).
Logits are h @ W with float32 accumulation (float32 logits, as the model's head), for float32
and bfloat16 h, W. Target: "sft" (same math as (a)), and "target_sft" with a teacher given as
hidden states + head for the memory table.

Peak memory is ahead of time: `jax.jit(f).lower(...).compile().memory_analysis()`, so it holds
for any device of that backend; "temp" is XLA's scratch (activations: logits and their
gradients), "total" = arguments + outputs + temp - aliased (h, W, dh, dW included). Time is the
median of `--reps` timed calls after one warm-up, measured at `--time-tokens` tokens (a CPU
shared by several people cannot run 8192 x 128256 logits in reasonable time; use
`--time-tokens 8192` on an accelerator). Not a test: numbers depend on the machine and its load.

Example usage:
  python benchmarks/loss.py                             # the full table, CPU-sized timing
  python benchmarks/loss.py --time-tokens 8192 --reps 5 # on a GPU/TPU
  python benchmarks/loss.py --dims 576 --vocabs 49152 --dtypes float32 --chunk 256
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtarget_jax.targets import fused_qtarget_loss, get_preset, qtarget_loss

D_TEACHER = 576


def _logits(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def make_fns(target: str, chunk):
    """name -> f(h, w, labels, mask, th, tw) returning (loss, (dh, dW))."""
    spec = get_preset(target)
    teacher = spec.needs_teacher

    def optax_ce(h, w, labels, mask, th, tw):
        ce = optax.softmax_cross_entropy_with_integer_labels(_logits(h, w), labels)
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def unfused(h, w, labels, mask, th, tw):
        tl = jax.lax.stop_gradient(_logits(th, tw)) if teacher else None
        return qtarget_loss(_logits(h, w), labels, mask, spec, teacher_logits=tl)[0]

    def fused(h, w, labels, mask, th, tw):
        kw = {"teacher_hidden": th, "teacher_lm_head": tw} if teacher else {}
        return fused_qtarget_loss(h, w, labels, mask, spec, chunk_size=chunk, **kw)[0]

    fns = {"(b) unfused": unfused, "(c) fused": fused}
    if not teacher:
        fns = {"(a) optax": optax_ce, **fns}
    return {k: jax.jit(jax.value_and_grad(f, (0, 1))) for k, f in fns.items()}


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


def timing(fn, args, reps) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="N for the memory table")
    parser.add_argument("--time-tokens", type=int, default=256, help="N for timing (0: skip)")
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 2048])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--targets", nargs="+", default=["sft", "target_sft"])
    parser.add_argument("--chunk", type=int, default=None, help="fused chunk size (default: "
                        "the library's default_chunk_size)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"memory at N={args.tokens}, time at N={args.time_tokens}")
    rows = []
    header = (f"{'target':10} {'D':>5} {'V':>6} {'dtype':8} {'method':12} {'temp MiB':>9} "
              f"{'total MiB':>9} {'temp/(a)':>8} {'tot/(a)':>7} {'time s':>7} {'t/(a)':>6}")
    print(header)
    for target in args.targets:
        for d in args.dims:
            for v in args.vocabs:
                for dtype_name in args.dtypes:
                    dtype = jnp.dtype(dtype_name)
                    fns = make_fns(target, args.chunk)
                    base = None
                    small = (concrete_args(args.time_tokens, d, v, dtype)
                             if args.time_tokens and target == "sft" else None)
                    for name, fn in fns.items():
                        row = {"target": target, "D": d, "V": v, "dtype": dtype_name,
                               "method": name,
                               **memory(fn, abstract_args(args.tokens, d, v, dtype))}
                        row["time_s"] = timing(fn, small, args.reps) if small else None
                        base = base or row
                        rows.append(row)
                        t = row["time_s"]
                        t_ratio = (f"{t / base['time_s']:6.2f}" if t and base["time_s"]
                                   else "     -")
                        print(f"{target:10} {d:5d} {v:6d} {dtype_name:8} {name:12} "
                              f"{row['temp_mib']:9.0f} {row['total_mib']:9.0f} "
                              f"{row['temp_mib'] / base['temp_mib']:8.3f} "
                              f"{row['total_mib'] / base['total_mib']:7.3f} "
                              f"{t if t else float('nan'):7.3f} {t_ratio}", flush=True)
                    del small
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
