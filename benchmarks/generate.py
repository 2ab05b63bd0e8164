"""Decode throughput and memory: qtarget-jax `generate_many` vs transformers' `model.generate`.

Same work on both sides: SmolLM2-135M-Instruct (the embedded GGUF, converted once to an HF
folder) in float32, the same chat-rendered prompt ids (arithmetic problems of
`data.synthetic`, as the experiment's final evaluation), up to --new-tokens new tokens, EOS ends
a row. Per prompt: 1 greedy + --samples samples at temperature 1.0 (top_p 1, no top-k), as the
experiment's final evaluation. Ours: one `generate_many` call (one prefill per prompt, the
continuations decoded together). Transformers: `generate` greedy on the prompts, then
`generate(do_sample=True, num_return_sequences=samples)`, left-padded batches.

Protocol:
  * one subprocess per side, pinned to the same CPUs (--cpus), so peak RSS is each side's own;
  * rounds are interleaved (round r: one side, then the other, alternating who goes first);
    round 0 is the warm-up: ours compiles there, and compile s = round 0 - the median of the
    later rounds; decode tokens/s is the median over rounds >= 1;
  * tokens: generated tokens per row up to and including its EOS; both sides count alike;
  * greedy rows are compared token for token (the count of equal rows is printed);
  * --roofline: each side times the decode's matmuls alone; with the FLOPs per decoded token
    (2 x matmul params + attention over the context) the best rate gives a floor.
Not a test: numbers depend on the machine and its load (the load average is printed).

Example usage:
  python benchmarks/generate.py                            # 40 prompts x 5, 64 tokens, 2 rounds
  python benchmarks/generate.py --prompts 8 --new-tokens 16  # a quick development run
  python benchmarks/generate.py --roofline --rounds 3
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (the same child protocol and matmul timing)
from train_step import Child as _Child, _hf_folder, _loadavg, pin_cpus  # noqa: E402


def prompts(n: int) -> tuple[list, list[list[int]]]:
    """(chats, chat-rendered ids) of the first n held-out synthetic problems (user turn)."""
    from qtarget_jax.data import synthetic
    from qtarget_jax.generate import prompt_ids
    from qtarget_jax.models.tokenizer import load_tokenizer
    tok = load_tokenizer(_hf_folder())
    rows = synthetic.generate(0, n, seed=0)["test"]
    chats = [r["messages"][:-1] for r in rows]
    return chats, [prompt_ids(tok, m) for m in chats]


def _until_eos(row, eos: int) -> list[int]:
    row = [int(t) for t in row]
    return row[:row.index(eos) + 1] if eos in row else row


def setup_jax(messages, ids, samples: int, new_tokens: int):
    from qtarget_jax.generate import SamplingConfig, generate_many, prompt_ids
    from qtarget_jax.models.loading import load_model
    model, _, tok = load_model("smollm2")
    greedy = SamplingConfig(max_new_tokens=new_tokens)
    configs = [greedy] + [SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)] * samples
    if [prompt_ids(tok, m) for m in messages] != ids:
        raise SystemExit("jax: the prompts tokenise differently from the parent's ids")

    def run(seed: int):
        groups = generate_many(model, tok, messages, configs, seed=seed)
        eos = tok.eos_token_id
        out = [[g.token_ids + ([eos] if g.finish_reason == "eos" else []) for g in grp]
               for grp in groups]
        return [o[0] for o in out], [s for o in out for s in o[1:]]
    c = model.cfg
    run.dims = {"hidden": c.hidden_size, "ffn": c.intermediate_size, "vocab": c.vocab_size,
                "layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
                "head_dim": c.head_dim}
    return run, tok.eos_token_id


def setup_torch(messages, ids, samples: int, new_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(_hf_folder(), dtype=torch.float32).eval()
    gc = model.generation_config
    eos, pad = gc.eos_token_id, gc.pad_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = eos if pad is None else pad
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    common = dict(attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=eos,
                  pad_token_id=pad)

    def run(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            g = model.generate(input_ids, do_sample=False, **common)
            s = model.generate(input_ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                               num_return_sequences=samples, **common)
        return ([_until_eos(r, eos) for r in g[:, width:].tolist()],
                [_until_eos(r, eos) for r in s[:, width:].tolist()])
    return run, eos


def matmul_rates(impl: str, rows: int, dims: dict) -> dict[str, float]:
    """GFLOP/s of train_step's matmul shapes alone with N = rows tokens (a decode step's
    [rows, D] x [D, F], [rows, F] x [F, D], the head [rows, D] x [D, V], and their transposes)."""
    train_step.B, train_step.T = rows, 1
    return train_step.matmul_rates(impl, dims)


def child(impl: str, ids_path: str, samples: int, new_tokens: int) -> None:
    """Set up, then one timed generation per 'run SEED' line on stdin."""
    def emit(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    with open(ids_path) as f:
        messages, ids = json.load(f)
    t0 = time.perf_counter()
    run, eos = (setup_jax if impl == "jax" else setup_torch)(messages, ids, samples, new_tokens)
    threads = None
    if impl == "torch":
        import torch
        threads = torch.get_num_threads()
    emit({"ready": True, "setup_s": time.perf_counter() - t0, "threads": threads, "eos": eos,
          "dims": getattr(run, "dims", None)})
    line = ""
    for line in sys.stdin:
        if not line.startswith("run "):
            break
        r0 = time.perf_counter()
        greedy, sampled = run(int(line.split()[1]))
        wall = time.perf_counter() - r0
        emit({"wall_s": wall, "greedy": greedy,
              "tokens": sum(map(len, greedy)) + sum(map(len, sampled)),
              "sampled_mean_len": float(np.mean([len(s) for s in sampled]))})
    emit({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    if line.startswith("matmul"):
        emit({"matmul_gflops": matmul_rates(impl, int(line.split()[1]), json.loads(
            line.split(maxsplit=2)[2]))})


class Child(_Child):
    """One side's subprocess, with train_step.Child's pipe protocol (read, send)."""

    def __init__(self, impl: str, args, ids_path: str, env):
        self.impl = impl
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", impl, "--ids", ids_path,
             "--samples", str(args.samples), "--new-tokens", str(args.new_tokens),
             "--cpus", ",".join(map(str, args.cpus))],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)


def flops_per_token(dims: dict, context: float) -> float:
    """Decode FLOPs per generated token: 2 x the matmul params (q, k, v, o, MLP per layer, the
    head) + attention scores and values over `context` cached slots (4 H Dh per slot, layer)."""
    d, f, v, n_l = dims["hidden"], dims["ffn"], dims["vocab"], dims["layers"]
    h, k, dh = dims["heads"], dims["kv_heads"], dims["head_dim"]
    per_layer = d * (h + 2 * k) * dh + h * dh * d + 3 * d * f
    return 2.0 * (n_l * per_layer + d * v) + 4.0 * n_l * h * dh * context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=40, help="prompts (held-out problems)")
    ap.add_argument("--samples", type=int, default=4, help="sampled continuations per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per row")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved rounds per side; round 0 is the warm-up (>= 2)")
    ap.add_argument("--cpus", default=None, help="comma-separated CPU ids both sides use")
    ap.add_argument("--roofline", action="store_true",
                    help="time the decode's matmuls alone on each side and print the floor")
    ap.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cpus = pin_cpus(args.cpus)
    if args.child:
        child(args.child, args.ids, args.samples, args.new_tokens)
        return
    if args.rounds < 2 or args.prompts < 1 or args.samples < 0 or args.new_tokens < 1:
        raise SystemExit("need --rounds >= 2, --prompts >= 1, --samples >= 0, --new-tokens >= 1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    messages, ids = prompts(args.prompts)
    ids_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"decode_ids_{os.getpid()}.json")
    with open(ids_path, "w") as f:
        json.dump([messages, ids], f)
    rows = args.prompts * (1 + args.samples)
    print(f"{args.prompts} prompts ({min(map(len, ids))}-{max(map(len, ids))} tokens) x "
          f"(1 greedy + {args.samples} samples at t=1.0) = {rows} rows, <= {args.new_tokens} new "
          f"tokens, float32, CPUs {args.cpus}; load average at start {_loadavg()}", flush=True)
    sides = ("jax", "torch")
    children, ready = {}, {}
    for impl in sides:                  # set-up one side at a time
        children[impl] = Child(impl, args, ids_path, env)
        ready[impl] = children[impl].read()
        print(f"{impl:>6}: set-up {ready[impl]['setup_s']:.1f} s", flush=True)
    runs = {i: [] for i in sides}
    for r in range(args.rounds):
        for impl in (sides if r % 2 == 0 else sides[::-1]):
            runs[impl].append(children[impl].send(f"run {r}"))
        print(f"  round {r}{' (warm-up)' if r == 0 else ''}: " + "  ".join(
            f"{i} {runs[i][-1]['wall_s']:.1f} s ({runs[i][-1]['tokens']} tokens)" for i in sides)
            + f"   load {_loadavg()}", flush=True)
    os.remove(ids_path)
    dims = ready["jax"]["dims"]
    peaks, rates = {}, {}
    for impl in sides:                  # one child at a time: the matmuls must not overlap
        cmd = f"matmul {rows} {json.dumps(dims)}" if args.roofline else "quit"
        peaks[impl] = children[impl].send(cmd)["peak_rss_mb"]
        if args.roofline:
            rates[impl] = children[impl].read()["matmul_gflops"]
        children[impl].proc.wait()
    res = {}
    for impl in sides:
        later = runs[impl][1:]
        wall = float(np.median([x["wall_s"] for x in later]))
        tokens = float(np.median([x["tokens"] for x in later]))
        res[impl] = {"tps": tokens / wall, "wall": wall, "tokens": tokens}
        compile_s = runs[impl][0]["wall_s"] - wall
        print(f"{impl:>6}: decode {wall:6.1f} s for {tokens:.0f} tokens = {tokens / wall:7.1f} "
              f"tokens/s; round 0 - later = {compile_s:5.1f} s "
              f"({'compile' if impl == 'jax' else 'warm-up'}); sampled rows average "
              f"{later[-1]['sampled_mean_len']:.1f} tokens; peak RSS {peaks[impl]:.0f} MB")
    same = sum(a == b for a, b in zip(runs["jax"][-1]["greedy"], runs["torch"][-1]["greedy"]))
    print(f"greedy rows equal token for token: {same}/{args.prompts}")
    if rates:
        for impl, r in rates.items():
            print(f"{impl:>6}: matmul GFLOP/s alone " + "  ".join(f"{k} {v:.0f}"
                                                                 for k, v in r.items()))
        best = max(v for r in rates.values() for v in r.values())
        context = max(map(len, ids)) + args.new_tokens / 2
        fpt = flops_per_token(dims, context)
        print(f"roofline: {fpt / 1e6:.0f} MFLOP per decoded token (context ~{context:.0f}) at "
              f"the best matmul rate {best:.0f} GFLOP/s = {best * 1e9 / fpt:.0f} tokens/s at "
              "most; " + ", ".join(f"{i} {res[i]['tps'] * fpt / 1e9:.0f} GFLOP/s = "
                                   f"{100 * res[i]['tps'] * fpt / (best * 1e9):.0f}% of it"
                                   for i in sides))
    print(f"load average at end {_loadavg()}")
    print(f"ratio ours/transformers decode tokens/s: {res['jax']['tps'] / res['torch']['tps']:.2f}"
          f"   peak memory ours/transformers: {peaks['jax'] / peaks['torch']:.2f}")


if __name__ == "__main__":
    main()
