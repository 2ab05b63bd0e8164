"""Train-step throughput: qtarget-jax vs transformers + PyTorch eager, same model/batch/optimizer.

SmolLM2-135M-Instruct (the embedded GGUF, converted once to an HF folder), batch 4 x 256 random
tokens, every position supervised, AdamW(lr 1e-5, wd 0.01), float32, CPU. Each implementation
runs in its own subprocess so peak memory (max RSS) is its own; the parent prints both and the
ratio. Not a test: numbers depend on the machine and its load.

Example usage:
  python benchmarks/train_step.py                 # both, 1 warm-up + 3 timed steps each
  python benchmarks/train_step.py --steps 5 --impl jax
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

B, T, LR, WD = 4, 256, 1e-5, 0.01


def _batch(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (B, T + 1)).astype(np.int32)


def _hf_folder() -> str:
    from qtarget_jax.models.gguf_io import default_model_path
    from qtarget_jax.models.loading import cached_hf_folder
    return cached_hf_folder(default_model_path())


def bench_jax(steps: int) -> list[float]:
    import jax

    from qtarget_jax.config import OptimSection, ScheduleSection
    from qtarget_jax.models.loading import load_model
    from qtarget_jax.models.sharding import LOGICAL_RULES
    from qtarget_jax.targets import get_preset
    from qtarget_jax.train import mesh as mesh_lib
    from qtarget_jax.train.optim import make_optimizer
    from qtarget_jax.train.state import init_state
    from qtarget_jax.train.step import jit_train_step, logits_loss

    model, cfg, _ = load_model(_hf_folder(), param_dtype="float32")
    mesh = mesh_lib.make_mesh({"data": -1})
    tx, sched = make_optimizer(OptimSection(lr=LR, weight_decay=WD, clip_norm=None),
                               ScheduleSection("constant"), 10 ** 6)
    built = init_state(model, tx, mesh, dict(LOGICAL_RULES), seed=0)
    del model
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh),
                          mesh_lib.replicated(mesh), graphdef=built.graphdef,
                          loss_fn=logits_loss(get_preset("sft"), "token"), tx=tx,
                          schedule=sched, microbatches=1, compute_dtype="float32")
    ids = _batch(cfg.vocab_size)
    batch = mesh_lib.global_batch({
        "tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((B, T), np.float32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "segment_ids": np.ones((B, T), np.int32)}, mesh)
    state, times = built.state, []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return times[1:]


def bench_torch(steps: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(_hf_folder(), torch_dtype=torch.float32)
    model.train()
    # Same decay rule as ours: no decay on norms and biases (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                            betas=(0.9, 0.95), eps=1e-8)
    ids = torch.from_numpy(_batch(model.config.vocab_size).astype(np.int64))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(input_ids=ids[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[1:]


def child(impl: str, steps: int) -> None:
    times = (bench_jax if impl == "jax" else bench_torch)(steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": impl, "step_s": float(np.median(times)),
                      "tokens_per_s": B * T / float(np.median(times)), "peak_rss_mb": peak_mb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--impl", choices=["jax", "torch", "both"], default="both")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.impl, args.steps)
        return
    impls = ["jax", "torch"] if args.impl == "both" else [args.impl]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))}
    results = {}
    for impl in impls:
        out = subprocess.run([sys.executable, __file__, "--child", "--impl", impl, "--steps",
                              str(args.steps)], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{impl} failed:\n{out.stderr[-4000:]}")
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[impl]
        print(f"{impl:>5}: {r['tokens_per_s']:8.1f} tokens/s  ({r['step_s']:.2f} s/step, "
              f"batch {B}x{T})  peak RSS {r['peak_rss_mb']:.0f} MB")
    if len(results) == 2:
        ratio = results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        print(f"ratio jax/torch tokens/s: {ratio:.2f}x   peak memory jax/torch: "
              f"{results['jax']['peak_rss_mb'] / results['torch']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
