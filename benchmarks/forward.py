"""Forward throughput: qtarget-jax (jit, warm) vs transformers + PyTorch eager, same batch.

SmolLM2-135M-Instruct (the embedded GGUF, converted once to an HF folder in the load_model
cache), float32, random tokens of shape [batch, seq] (default 4 x 256), logits for every
position. Both models are loaded from the same folder in one process, and their timed
iterations alternate (jax, torch, jax, torch, ...) so that both see the same machine load. Prints
tokens/s of each, the ratio, and the max |logit diff| on the batch. Not a test: numbers depend on
the machine and its load.

Example usage:
  python benchmarks/forward.py                      # 4 x 256, 1 warm-up + 3 timed each
  python benchmarks/forward.py --batch 8 --seq 128 --iters 5
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per impl")
    args = parser.parse_args()

    import jax
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from qtarget_jax.models.gguf_io import default_model_path
    from qtarget_jax.models.loading import cached_hf_folder, load_hf

    folder = cached_hf_folder(default_model_path())
    model, cfg, _ = load_hf(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq),
                                               dtype=np.int32)
    tokens_pt = torch.tensor(tokens, dtype=torch.long)
    forward = nnx.jit(lambda m, x: m(x))

    def run_jax() -> np.ndarray:
        return np.asarray(jax.block_until_ready(forward(model, tokens)))

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return ref(tokens_pt).logits.numpy()

    t0 = time.perf_counter()
    ours = run_jax()
    compile_s = time.perf_counter() - t0
    diff = float(np.abs(ours - run_torch()).max())  # also torch's warm-up
    times: dict[str, list[float]] = {"qtarget-jax (jit)": [], "transformers torch (eager)": []}
    for _ in range(args.iters):
        for name, fn in zip(times, (run_jax, run_torch)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    n = args.batch * args.seq
    print(f"SmolLM2-135M forward, batch {args.batch} x {args.seq} = {n} tokens, float32, "
          f"{jax.devices()[0].platform} ({jax.device_count()} jax devices, "
          f"{torch.get_num_threads()} torch threads); jit compile + first run {compile_s:.1f}s")
    rates = {}
    for name, ts in times.items():
        best, median = min(ts), float(np.median(ts))
        rates[name] = n / median
        print(f"  {name:28s} median {median:7.3f}s  best {best:7.3f}s  "
              f"{n / median:9.0f} tokens/s")
    jax_rate, torch_rate = rates.values()
    print(f"  ratio qtarget-jax / torch: {jax_rate / torch_rate:.2f}x   "
          f"max |logit diff| {diff:.2e}")


if __name__ == "__main__":
    main()
