"""Train-step throughput and memory: qtarget-jax vs transformers + PyTorch (eager, torch.compile).

Same work on every side: SmolLM2-135M-Instruct (the embedded GGUF, converted once to an HF
folder), float32, batch 4 x 256 random tokens, every position supervised; the loss is the
token-mean cross-entropy (our `sft` preset: Q = onehot(y)) with the same diagnostics computed
on both sides (p_y, accuracy, entropy, KL(Q||p), supervised tokens: what our train step
reports), global-norm clipping at 1.0 on both sides (its norm is the grad_norm metric),
AdamW(lr 1e-5, betas 0.9/0.95, eps 1e-8, weight decay 0.01 off norms and biases), constant lr.

Protocol:
  * one subprocess per implementation, all pinned to the same CPUs (--cpus) so every library
    sizes its thread pool alike (torch.get_num_threads() and XLA's pool = len(cpus));
  * set-up (loading, jax.jit compile, torch.compile, the first step) is timed apart and never
    counted in the step time;
  * the first-step loss (same initial weights, same batch) and the loss after one AdamW update
    are checked equal across implementations (the run stops if they differ);
  * timed steps are interleaved: round r runs one step of each implementation in turn while the
    others wait idle, so a change of machine load hits all of them alike; median of --steps;
  * peak memory is each subprocess's own peak RSS: over its whole life (loading, compiling and
    steps: the headline) and over the timed steps only (VmHWM reset after the first step);
  * faults/step: minor page faults per timed step (memory the allocator took fresh from the
    kernel, which zeroes it: the allocator's cost, see docs/performance.md);
  * --roofline: after the steps, each library times the step's large matmuls alone, one child
    at a time, and the step time the best rate allows for the step's FLOPs is printed.
Not a test: numbers depend on the machine and its load (the load average is printed).

Example usage:
  python benchmarks/train_step.py                      # jax vs torch eager, 5 timed steps
  python benchmarks/train_step.py --torch-compile      # adds a torch.compile row
  python benchmarks/train_step.py --steps 7 --cpus 0,1 --loss logits
  python benchmarks/train_step.py --roofline           # + matmul rates and the step's floor
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
      python benchmarks/train_step.py                  # both sides on tcmalloc (no page faults)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

B, T, LR, WD, CLIP = 4, 256, 1e-5, 0.01, 1.0
IMPLS = ("jax", "torch", "torch_compile")
REMAT_CHOICES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                 "nothing_saveable")


def _batch(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (B, T + 1)).astype(np.int32)


def _hf_folder() -> str:
    from qtarget_jax.models.gguf_io import default_model_path
    from qtarget_jax.models.loading import cached_hf_folder
    return cached_hf_folder(default_model_path())


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def setup_jax(loss: str, remat: str = "none", scan_layers: bool = False):
    """Returns (step() -> loss float, set-up seconds); remat/scan_layers as ModelConfig's
    remat_policy/scan_layers (per-layer rematerialisation, nnx.scan over stacked layers)."""
    import jax

    from qtarget_jax.config import OptimSection, ScheduleSection
    from qtarget_jax.models.loading import load_model
    from qtarget_jax.models.sharding import LOGICAL_RULES
    from qtarget_jax.targets import get_preset
    from qtarget_jax.train import mesh as mesh_lib
    from qtarget_jax.train.metrics import flops_per_token
    from qtarget_jax.train.optim import make_optimizer
    from qtarget_jax.train.state import init_state
    from qtarget_jax.train.step import jit_train_step, make_loss_fn

    model, cfg, _ = load_model(_hf_folder(), param_dtype="float32", remat_policy=remat,
                              scan_layers=scan_layers)
    mesh = mesh_lib.make_mesh({"data": -1})
    tx, sched = make_optimizer(OptimSection(lr=LR, weight_decay=WD, clip_norm=CLIP),
                               ScheduleSection("constant"), 10 ** 6)
    built = init_state(model, tx, mesh, dict(LOGICAL_RULES), seed=0)
    del model
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh),
                          mesh_lib.replicated(mesh), graphdef=built.graphdef,
                          loss_fn=make_loss_fn(get_preset("sft"), "token",
                                               fused=loss == "fused", mesh=mesh),
                          tx=tx, schedule=sched, microbatches=1)
    ids = _batch(cfg.vocab_size)
    batch = mesh_lib.global_batch({
        "tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((B, T), np.float32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, T), np.int32)}, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(built.state, batch).compile()
    compile_s = time.perf_counter() - t0
    box = [built.state]

    def run() -> float:
        box[0], metrics = compiled(box[0], batch)
        return float(jax.block_until_ready(metrics["loss"]))
    n_params = sum(x.size for x in jax.tree.leaves(built.state.params))
    run.flops_per_token = flops_per_token(n_params, cfg.num_layers, T, cfg.hidden_size)
    run.devices = jax.device_count()
    run.dims = {"hidden": cfg.hidden_size, "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size}
    return run, compile_s


def setup_torch(compile_model: bool):
    """Returns (step() -> loss float, set-up seconds: torch.compile happens in the first step)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(_hf_folder(), dtype=torch.float32)
    model.train()
    # Same decay rule as ours: no decay on norms and biases (1-D tensors).
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                            betas=(0.9, 0.95), eps=1e-8)
    ids = torch.from_numpy(_batch(model.config.vocab_size).astype(np.int64))
    tokens, labels = ids[:, :-1], ids[:, 1:]

    def loss_and_diagnostics(input_ids, labels):
        logits = model(input_ids=input_ids).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        token_loss = -logp.gather(-1, labels[..., None])[..., 0]
        with torch.no_grad():                  # what our step reports, summed over tokens
            lp = logp.detach()
            sums = {"p_y": torch.exp(-token_loss.detach()).sum(),
                    "accuracy": (lp.argmax(-1) == labels).float().sum(),
                    "entropy": -(lp.exp() * lp).sum(),
                    "kl_q_p": token_loss.detach().sum(),   # KL(onehot || p) = CE
                    "tokens": torch.tensor(float(labels.numel()))}
        return token_loss.mean(), sums

    fn = torch.compile(loss_and_diagnostics) if compile_model else loss_and_diagnostics

    def run() -> float:
        loss, _ = fn(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)   # returns the grad_norm metric
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    c = model.config
    run.dims = {"hidden": c.hidden_size, "ffn": c.intermediate_size, "vocab": c.vocab_size}
    return run, 0.0


def child(impl: str, loss: str, remat: str = "none", scan_layers: bool = False) -> None:
    """Set up, run the first step, then one timed step per 'step' line on stdin."""
    def emit(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    t0 = time.perf_counter()
    if impl == "jax":
        run, compile_s = setup_jax(loss, remat, scan_layers)
        threads = None
    else:
        import torch
        run, compile_s = setup_torch(impl == "torch_compile")
        threads = torch.get_num_threads()
    t1 = time.perf_counter()
    first_loss = run()                   # jit is compiled already; eager warms up; torch.compile
    first_s = time.perf_counter() - t1   # compiles here
    with open("/proc/self/clear_refs", "w") as f:     # VmHWM := VmRSS: the steps' own peak
        f.write("5")
    emit({"ready": True, "setup_s": time.perf_counter() - t0, "compile_s": compile_s,
          "first_step_s": first_s, "first_loss": first_loss, "threads": threads,
          "flops_per_token": getattr(run, "flops_per_token", None),
          "devices": getattr(run, "devices", None),
          "cpus": sorted(os.sched_getaffinity(0))})
    line = ""
    for line in sys.stdin:
        if line.strip() != "step":
            break
        r0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        value = run()
        r1, c1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        emit({"wall_s": r1 - r0, "cpu_s": (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime),
              "faults": c1.ru_minflt - c0.ru_minflt, "loss": value})
    emit({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "steps_peak_rss_mb": _status_mb("VmHWM")})
    if line.strip() == "matmul":          # after the peaks, so they stay the step's own
        emit({"matmul_gflops": matmul_rates(impl, run.dims)})


def matmul_shapes(dims: dict) -> list[tuple[int, int, int]]:
    """The step's large float32 matmuls as (m, k, n), N = B * T tokens: the projections' forward
    [N, D] x [D, F] and [N, F] x [F, D], the weight gradients [D, N] x [N, F], and the tied head's
    [N, D] x [D, V], [N, V] x [V, D] and [D, N] x [N, V]."""
    n, d, f, v = B * T, dims["hidden"], dims["ffn"], dims["vocab"]
    return [(n, d, f), (n, f, d), (d, n, f), (n, d, v), (n, v, d), (d, n, v)]


def matmul_rates(impl: str, dims: dict, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of each `matmul_shapes` product alone in this library (median of `reps`)."""
    if impl == "jax":
        import jax
        import jax.numpy as jnp
        mm = jax.jit(jnp.matmul)
        as_array, product = jnp.asarray, lambda a, b: mm(a, b).block_until_ready()
    else:
        import torch
        as_array, product = torch.from_numpy, lambda a, b: a @ b
    rng = np.random.default_rng(0)
    rates = {}
    for m, k, n in matmul_shapes(dims):
        a = as_array(rng.standard_normal((m, k), dtype=np.float32))
        b = as_array(rng.standard_normal((k, n), dtype=np.float32))
        fn = lambda: product(a, b)  # noqa: E731
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rates[f"{m}x{k}x{n}"] = 2.0 * m * k * n / float(np.median(times)) / 1e9
    return rates


def print_roofline(rates: dict, res: dict, ready: dict) -> None:
    """The step time the best measured matmul rate allows for the step's FLOPs, and the goal."""
    for impl, r in rates.items():
        shown = "  ".join(f"{k} {v:.0f}" for k, v in r.items())
        print(f"{impl:>13}: matmul GFLOP/s alone {shown}")
    best = max(v for r in rates.values() for v in r.values())
    fpt = next((ready[i]["flops_per_token"] for i in ready if ready[i].get("flops_per_token")), 0)
    if not fpt:
        return
    flops = fpt * B * T
    line = (f"roofline: {flops / 1e9:.0f} GFLOP per step (6 N + 12 L T D) at the best matmul rate "
            f"{best:.0f} GFLOP/s = {flops / best / 1e9:.2f} s/step at the least")
    if "torch" in res:
        goal = B * T / res["torch"]["tps"] / 1.5
        line += f"; 1.5x torch eager = {goal:.2f} s/step, {flops / goal / 1e9:.0f} GFLOP/s"
    print(line)


def _jax_platform() -> str:
    env = os.environ.get("JAX_PLATFORMS")
    return f"JAX_PLATFORMS={env}" if env else "the default JAX platform"


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pin_cpus(cpus: str | None) -> list[int]:
    """Pins this process (and the children it starts) to the comma-separated CPU ids `cpus`
    (default: the CPUs it may already use); returns them."""
    ids = sorted(os.sched_getaffinity(0)) if cpus is None else [int(c) for c in cpus.split(",")]
    os.sched_setaffinity(0, ids)
    return ids


class Child:
    def __init__(self, impl: str, args, env):
        self.impl = impl
        cpus = ",".join(map(str, args.cpus))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", impl, "--loss", args.loss, "--cpus", cpus,
             "--batch", str(args.batch), "--seq", str(args.seq), "--remat", args.remat]
            + (["--scan-layers"] if args.scan_layers else []),
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise RuntimeError(f"{self.impl} exited ({self.proc.returncode}):\n"
                                   f"{self.proc.stderr.read()[-4000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def send(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()


def main() -> None:
    global B, T
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    ap.add_argument("--impls", default="jax,torch",
                    help=f"comma-separated, from {IMPLS} (jax first for the ratio line)")
    ap.add_argument("--torch-compile", action="store_true", help="add the torch_compile row")
    ap.add_argument("--loss", choices=["fused", "logits"], default="fused",
                    help="our loss path: fused over hidden states (train default) or full logits")
    ap.add_argument("--cpus", default=None,
                    help="comma-separated CPU ids every implementation is pinned to "
                         "(default: all this process may use)")
    ap.add_argument("--batch", type=int, default=B, help="sequences per step")
    ap.add_argument("--seq", type=int, default=T, help="tokens per sequence")
    ap.add_argument("--peak-flops", type=float, default=0.0,
                    help="per-device peak FLOP/s (e.g. 9.89e14 for H100 bf16): prints the MFU "
                         "of the jax row, FLOPs per token = 6 N + 12 L T D as in training")
    ap.add_argument("--remat", choices=REMAT_CHOICES, default="none",
                    help="our per-layer rematerialisation (model.remat; training default none)")
    ap.add_argument("--scan-layers", action="store_true",
                    help="our layers as one nnx.scan over stacked weights (model.scan_layers)")
    ap.add_argument("--roofline", action="store_true",
                    help="after the steps, time the step's large matmuls alone in each library "
                         "and print the step time their best rate allows")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    B, T = args.batch, args.seq
    args.cpus = pin_cpus(args.cpus)
    if args.child:
        child(args.child, args.loss, args.remat, args.scan_layers)
        return
    impls = [i for i in args.impls.split(",") if i]
    if args.torch_compile and "torch_compile" not in impls:
        impls.append("torch_compile")
    if bad := [i for i in impls if i not in IMPLS]:
        raise SystemExit(f"--impls: unknown {bad}; choose from {IMPLS}")
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))}
    print(f"batch {B}x{T} float32 on {_jax_platform() if 'jax' in impls else 'cpu'}, AdamW + clip {CLIP}, loss sft ({args.loss} on our side, remat {args.remat}, scan_layers {args.scan_layers}), "
          f"CPUs {args.cpus}; load average at start {_loadavg()}", flush=True)
    # Set-up one implementation at a time (loading and compiling do not overlap timed work).
    children, ready = {}, {}
    for impl in impls:
        children[impl] = Child(impl, args, env)
        try:
            ready[impl] = children[impl].read()
        except RuntimeError as e:
            print(f"{impl}: set-up failed, row dropped: {str(e).splitlines()[-1]}")
            del children[impl]
            continue
        r = ready[impl]
        what = {"jax": f"jax.jit compile {r['compile_s']:.1f} s", "torch": "eager",
                "torch_compile": "the first step runs torch.compile"}[impl]
        print(f"{impl:>13}: set-up {r['setup_s']:.1f} s ({what}), first step "
              f"{r['first_step_s']:.1f} s, first loss {r['first_loss']:.6f}, "
              f"threads {r['threads'] or len(r['cpus'])}", flush=True)
    live = list(children)
    first = [ready[i]["first_loss"] for i in live]
    if max(first) - min(first) > 1e-4 * abs(first[0]):
        raise SystemExit(f"first-step losses differ: {dict(zip(live, first))}")
    steps = {i: [] for i in live}
    for r in range(args.steps):
        for impl in (live if r % 2 == 0 else live[::-1]):      # alternate who goes first
            steps[impl].append(children[impl].send("step"))
        print(f"  round {r}: " + "  ".join(f"{i} {steps[i][-1]['wall_s']:.2f} s" for i in live)
              + f"   load {_loadavg()}", flush=True)
    # The loss after one AdamW update (same clip, same decay mask) must agree too.
    second = [steps[i][0]["loss"] for i in live]
    if max(second) - min(second) > 1e-3 * abs(second[0]):
        raise SystemExit(f"losses after one update differ: {dict(zip(live, second))}")
    peaks, rates = {}, {}
    for i in live:                      # one child at a time: the matmuls must not overlap
        peaks[i] = children[i].send("matmul" if args.roofline else "quit")
        if args.roofline:
            rates[i] = children[i].read()["matmul_gflops"]
    for impl in live:
        children[impl].proc.wait()
    print(f"{'':>13}  {'tokens/s':>9} {'s/step':>7} {'min-max s':>11} {'cpu s':>6} "
          f"{'peak RSS MB':>11} {'steps peak':>10} {'faults/step':>11}")
    res = {}
    for impl in live:
        wall = np.array([s["wall_s"] for s in steps[impl]])
        cpu = np.median([s["cpu_s"] for s in steps[impl]])
        med = float(np.median(wall))
        res[impl] = {"tps": B * T / med, "peak": peaks[impl]["peak_rss_mb"]}
        if args.peak_flops > 0 and ready[impl].get("flops_per_token"):
            util = (B * T / med * ready[impl]["flops_per_token"]
                    / (args.peak_flops * ready[impl]["devices"]))
            print(f"{impl:>13}: MFU {100 * util:.1f}% ({ready[impl]['flops_per_token']:.3g} "
                  f"FLOPs/token, {ready[impl]['devices']} device(s) at {args.peak_flops:.3g})")
        print(f"{impl:>13}: {B * T / med:9.1f} {med:7.2f} {wall.min():5.2f}-{wall.max():5.2f} "
              f"{cpu:6.2f} {peaks[impl]['peak_rss_mb']:11.0f} "
              f"{peaks[impl]['steps_peak_rss_mb']:10.0f} "
              f"{np.median([s['faults'] for s in steps[impl]]):11.0f}")
    if rates:
        print_roofline(rates, res, ready)
    print(f"median of {args.steps} interleaved steps; loss after one update "
          f"{dict(zip(live, [round(x, 6) for x in second]))}; load average at end {_loadavg()}")
    if "jax" in res and "torch" in res:
        if "torch_compile" in res:
            print(f"ratio jax/torch_compile tokens/s: "
                  f"{res['jax']['tps'] / res['torch_compile']['tps']:.2f}x   peak memory "
                  f"jax/torch_compile: {res['jax']['peak'] / res['torch_compile']['peak']:.2f}x")
        print(f"ratio jax/torch tokens/s: {res['jax']['tps'] / res['torch']['tps']:.2f}x   "
              f"peak memory jax/torch: {res['jax']['peak'] / res['torch']['peak']:.2f}x")


if __name__ == "__main__":
    main()
