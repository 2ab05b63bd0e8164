"""Where the decoder's time goes on this machine: forward vs value_and_grad vs AdamW.

For each program: jit compile time, median wall time, `cost_analysis()` FLOPs and bytes, the
compiled HLO's counts of dots, copies, transposes, scatters and while loops (`as_text()`), and
a `jax.profiler` trace (Perfetto JSON) whose per-thunk events are attributed back to the HLO's
fused computations and summed by kind (fusion[dot], fusion[copy+transpose], ...).
SmolLM2-135M (embedded GGUF), float32, random tokens, token-mean cross-entropy. Not a test.

Example usage:
  python benchmarks/profile_decoder.py --batch 1 --seq 480
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import numpy as np

_OP = re.compile(r"(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)*?) (\w[\w\-]*)\(")
_KINDS = ("dot", "transpose", "copy", "reduce", "scatter", "gather", "select", "exponential",
          "concatenate", "dynamic-slice", "dynamic-update-slice")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and "=" in line:
            comps[name].append(line.strip())
    return comps


def _kinds(hlo: str) -> dict[str, str]:
    """HLO instruction name -> kind: its opcode, or fusion[<notable ops inside>]."""
    comps = _computations(hlo)
    out = {}
    for lines in comps.values():
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            name, op = m.group(1), m.group(3)
            if op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", line)
                ops = {_OP.match(b).group(3) for b in comps.get(called.group(1), [])
                       if called and _OP.match(b)}
                op = "fusion[" + ("+".join(sorted(ops & set(_KINDS))) or "elementwise") + "]"
            out[name] = op
    return out


def profile(name: str, compiled, call) -> None:
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    counts = collections.Counter(re.findall(
        r"= \S+ (copy|transpose|scatter|while|dot)\(", hlo))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    print(f"{name}: median {np.median(times):.3f} s {[round(t, 3) for t in times]}  "
          f"GFLOP {cost.get('flops', 0) / 1e9:.1f}  GB {cost.get('bytes accessed', 0) / 1e9:.2f}"
          f"  HLO {dict(counts)}  load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    import jax
    kinds = _kinds(hlo)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            call()
        path = glob.glob(d + "/**/*perfetto_trace.json.gz", recursive=True)[0]
        events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind, n = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in kinds:
            by_kind[kinds[e["name"]]] += e["dur"]
            n[kinds[e["name"]]] += 1
    total = sum(by_kind.values()) or 1
    for kind, us in by_kind.most_common(10):
        print(f"    {us / 1e3:9.1f} ms {100 * us / total:5.1f} %  x{n[kind]:<5d} {kind}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=480)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from qtarget_jax.models.gguf_io import default_model_path
    from qtarget_jax.models.loading import cached_hf_folder, load_model

    model, cfg, _ = load_model(cached_hf_folder(default_model_path()), param_dtype="float32")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = params.to_pure_dict()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens, labels = jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.adamw(1e-5, b1=0.9, b2=0.95, weight_decay=0.01)

    def update(g, o, p):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    grads = jax.grad(loss)(params)
    opt_state = tx.init(params)
    for name, fn, fargs in (("forward+loss", loss, (params,)),
                            ("value_and_grad", jax.value_and_grad(loss), (params,)),
                            ("adamw_update", update, (grads, opt_state, params))):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*fargs).compile()
        print(f"{name}: compile {time.perf_counter() - t0:.1f} s", flush=True)
        profile(name, compiled, lambda c=compiled, a=fargs: jax.block_until_ready(c(*a)))


if __name__ == "__main__":
    main()
