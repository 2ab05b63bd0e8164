"""Where one decode step's time goes: CPU and wall time per step, then a per-op profile.

The shape of `benchmarks/generate.py`'s workload: SmolLM2-135M's config with random weights
(the weights' values do not change the work), float32, P prompts x R rows (row p * R + 0
greedy, the others sampled at temperature 1), a shared prefix of `--prefix` slots per prompt
(`cache.SharedPrefix`, random keys/values) and `--own` slots per row; each step draws the next
token (`sampling.sample_logits`) then runs `decode.forward_one`, as `decode.decode`'s loop
body does, inside one jitted `fori_loop` of `--steps` steps.

Prints CPU ms and wall ms per step (CPU = user + system of this process, all threads: on a
shared machine less sensitive to the load than wall time; CPU > wall means several threads
ran at once). With --profile, a `jax.profiler` trace of one more run, its thunks summed per
step by (kind, output shape) through the compiled HLO: `ynn_fusion f32[200,1536]` is the MLP's
gate/up dots, `f32[200,3,3,64]` the own-slot attention dots, `f32[40,3,15,*]` the prefix
dots, `f32[200,49152]` the head. `copy f32[200,3,64,64]` (60 per run, whatever --steps) is the
loop's entry copy of this script's input cache, not a per-step cost (`decode` builds its cache
inside its jit). Not a test.

Example usage:
  python benchmarks/decode_step.py                      # 200 rows, 80 + 64 slots, 8 steps
  python benchmarks/decode_step.py --steps 6 --profile
  python benchmarks/decode_step.py --dots-only           # + a step of only its matmuls
"""
import argparse
import collections
import glob
import gzip
import json
import re
import resource
import tempfile
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5, help="rows per prompt (1 greedy + samples)")
    ap.add_argument("--prefix", type=int, default=80, help="prompt slots (shared prefix)")
    ap.add_argument("--own", type=int, default=64, help="each row's own slots")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dots-only", action="store_true",
                    help="also time a step of only its matmuls (the floor of this XLA's dots)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qtarget_jax.generate.decode import forward_one
    from qtarget_jax.generate.sampling import sample_logits
    from qtarget_jax.models.cache import KVCache, with_shared_prefix
    from qtarget_jax.models.config import ModelConfig
    from qtarget_jax.models.decoder import Decoder

    cfg = ModelConfig.smollm2_135m()
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    p, r, sp, n = args.prompts, args.reps, args.prefix, args.steps
    empty = model.init_cache(p, sp, jnp.float32)
    rand = lambda i, x: jax.random.normal(jax.random.key(i), x.shape)  # noqa: E731
    prompts = KVCache(k=tuple(rand(i, x) * 0.5 for i, x in enumerate(empty.k)),
                      v=tuple(rand(100 + i, x) for i, x in enumerate(empty.v)),
                      segment_ids=jnp.ones((p, sp), jnp.int32),
                      index=jnp.asarray(sp, jnp.int32))
    cache = with_shared_prefix(prompts, r, args.own)
    temps = jnp.tile(jnp.asarray([0.0] + [1.0] * (r - 1), jnp.float32), p)
    keys = jax.random.split(jax.random.key(1), p * r)
    logits0 = jax.random.normal(jax.random.key(2), (p * r, cfg.vocab_size))

    @jax.jit
    def run(state, cache, logits):
        def body(i, carry):
            cache, logits, acc = carry
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
            tok = sample_logits(logits, step_keys, temps, 1.0)
            logits, cache = forward_one(nnx.merge(graphdef, state), tok,
                                        jnp.full((p * r,), sp, jnp.int32) + i, cache)
            return cache, logits, acc + tok.sum()
        return jax.lax.fori_loop(0, n, body, (cache, logits, jnp.zeros((), jnp.int32)))[2]

    t0 = time.perf_counter()
    jax.block_until_ready(run(state, cache, logits0))
    print(f"{p * r} rows, {sp} prefix + {args.own} own slots: compile + first run "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(2):
        c0, t0 = _cpu(), time.perf_counter()
        jax.block_until_ready(run(state, cache, logits0))
        t1, c1 = time.perf_counter(), _cpu()
        print(f"step: wall {(t1 - t0) / n * 1e3:7.1f} ms   CPU {(c1 - c0) / n * 1e3:7.1f} ms",
              flush=True)
    if args.dots_only:
        dots_only(cfg, p * r, n)
    if not args.profile:
        return
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        jax.block_until_ready(run(state, cache, logits0))
    events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz",
                                           recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    hlo = run.lower(state, cache, logits0).compile().as_text()
    by_kind, by_kind_n = collections.Counter(), collections.Counter()
    for name, dur in total.items():
        if name.startswith("$") or " " in name or ":" in name:
            continue                                    # runtime events, not thunks
        m = re.search(r"%?" + re.escape(name) + r" = (\S+) ", hlo)
        key = f"{name.split('.')[0]} {m.group(1) if m else '?'}"
        by_kind[key] += dur
        by_kind_n[key] += count[name]
    print(f"{'ms per step':>12} {'ops per step':>12}  thunk kind, output")
    for key, dur in by_kind.most_common(30):
        print(f"{dur / n / 1e3:12.2f} {by_kind_n[key] / n:12.1f}  {key}")


def dots_only(cfg, rows: int, steps: int) -> None:
    """Times a step made of only the decode step's matmuls, chained as the model chains them:
    per layer x [rows, D] @ q [D, H Dh], k and v [D, K Dh], o [H Dh, D], gate and up [D, F],
    down [F, D], then the tied head x @ E^T [D, V]; float32, random weights, in a jitted
    fori_loop of `steps`. No attention, norms, RoPE, cache or sampling: what XLA's dots alone
    take for one step, a floor for the whole step in this library on this machine."""
    import jax
    import jax.numpy as jnp
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = [(d, hd), (d, kd), (d, kd), (hd, d), (d, f), (d, f), (f, d)]
    w = [[jax.random.normal(jax.random.key(10 * i + j), s) * s[0] ** -0.5
          for j, s in enumerate(shapes)] for i in range(cfg.num_layers)]
    emb = jax.random.normal(jax.random.key(7), (v, d)) * d ** -0.5
    x0 = jax.random.normal(jax.random.key(8), (rows, d))

    @jax.jit
    def run(w, emb, x):
        def body(i, x):
            for wq, wk, wv, wo, wg, wu, wd in w:
                q, k, vv = x @ wq, x @ wk, x @ wv
                x = x + (q @ wo) + 1e-3 * (k.sum(-1, keepdims=True) + vv.sum(-1, keepdims=True))
                x = x + ((x @ wg) * (x @ wu)) @ wd
            logits = jax.lax.dot_general(x, emb, (((1,), (1,)), ((), ())))
            return x + 1e-6 * logits.max(-1, keepdims=True)
        return jax.lax.fori_loop(0, steps, body, x)
    flops = 2.0 * rows * (cfg.num_layers * sum(a * b for a, b in shapes) + d * v)
    jax.block_until_ready(run(w, emb, x0))
    for _ in range(2):
        c0, t0 = _cpu(), time.perf_counter()
        jax.block_until_ready(run(w, emb, x0))
        t1, c1 = time.perf_counter(), _cpu()
        print(f"dots only: wall {(t1 - t0) / steps * 1e3:7.1f} ms   CPU "
              f"{(c1 - c0) / steps * 1e3:7.1f} ms   ({flops / 1e9:.1f} GFLOP per step, "
              f"{flops * steps / (t1 - t0) / 1e9:.0f} GFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
