"""Data pipeline throughput on this machine: preparation and batch iteration vs the train step.

Claim: iterating prepared batches is far faster than a train step consumes them, so the input
pipeline never stalls training. Measured in one run, on the same CPU:
  1. synth: generating the synthetic set (rows/s);
  2. prepare: JSONL -> tfds array_record (rows/s);
  3. tokenise: read + validate + chat template + mask (examples/s, tokens/s);
  4. iterate: packed [B, T] batches from the tokenised split (batches/s, examples/s, tokens/s);
  5. train step (--train-step): SmolLM2-135M forward+backward of the Q-target loss on [b, T],
     random weights, jitted, median of 3 after compiling (tokens/s); printed as the ratio
     iterate tokens/s / train tokens/s (the headroom).

Example Usage:
  .venv/bin/python benchmarks/data_pipeline.py --n-train 1000 --seq-len 512 --batch-size 8
  .venv/bin/python benchmarks/data_pipeline.py --train-step --train-batch 1
Cost: about a minute on 2 shared CPU cores (tokenizer load ~15 s, train step ~1 min more).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s"


def measure_train_step(batch: dict, train_batch: int) -> float:
    """Median seconds of a jitted SmolLM2-135M fwd+bwd of the SFT loss on ``train_batch`` rows."""
    import jax
    from flax import nnx

    from qtarget_jax.models import Decoder, ModelConfig
    from qtarget_jax.targets import get_preset, qtarget_loss

    model = Decoder(ModelConfig.smollm2_135m(), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    spec = get_preset("sft")
    rows = {k: jax.numpy.asarray(v[:train_batch]) for k, v in batch.items()}

    @jax.jit
    def step(params, rows):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            logits = m(rows["tokens"], rows["positions"], rows["segment_ids"])
            return qtarget_loss(logits, rows["labels"], rows["loss_mask"], spec)[0]
        return jax.value_and_grad(loss_fn)(params)

    jax.block_until_ready(step(params, rows))  # compile
    times = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(step(params, rows))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1000, help="synthetic problems (x2 rows)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per iterated batch")
    ap.add_argument("--batches", type=int, default=300, help="batches to iterate")
    ap.add_argument("--tokenizer", help="HF folder or .gguf (default: SmolLM2 GGUF)")
    ap.add_argument("--train-step", action="store_true", help="also time a 135M train step")
    ap.add_argument("--train-batch", type=int, default=1, help="rows in the timed train step")
    args = ap.parse_args()

    import tensorflow_datasets as tfds

    from qtarget_jax.data import builder, pipeline, synthetic
    from qtarget_jax.data.__main__ import load_tokenizer

    tfds.disable_progress_bar()
    work = tempfile.mkdtemp(prefix="qtarget_data_bench_")
    t = time.perf_counter()
    data = synthetic.generate(args.n_train, 10, seed=0, noise=0.2)
    path = os.path.join(work, "train.jsonl")
    synthetic.write_jsonl(data["train"], path)
    dt = time.perf_counter() - t
    rows = len(data["train"])
    print(f"synth     : {rows} rows in {dt:.2f}s = {_rate(rows, dt)} rows")

    t = time.perf_counter()
    ds_dir, _ = builder.prepare_dataset({"train": [path]}, os.path.join(work, "tfds"), "bench")
    dt = time.perf_counter() - t
    print(f"prepare   : {rows} rows in {dt:.2f}s = {_rate(rows, dt)} rows")

    t = time.perf_counter()
    tok = load_tokenizer(args.tokenizer)
    print(f"tokenizer : loaded in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    split = pipeline.tokenize_split(ds_dir, tok, split="train", seq_len=args.seq_len)
    dt = time.perf_counter() - t
    ntok = int(split.lengths.sum())
    print(f"tokenise  : {len(split.examples)} examples, {ntok} tokens in {dt:.2f}s = "
          f"{_rate(len(split.examples), dt)} examples, {_rate(ntok, dt)} tokens")

    it = pipeline.SftIterator(split, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
    next(it)
    t = time.perf_counter()
    n_ex = n_tok = 0
    batch = None
    for _ in range(args.batches):
        batch = next(it)
        n_tok += int((batch["segment_ids"] > 0).sum())
        n_ex += int(sum(len(np.unique(r[r > 0])) for r in batch["segment_ids"]))
    dt = time.perf_counter() - t
    positions = args.batches * args.batch_size * args.seq_len
    print(f"iterate   : {args.batches} batches [{args.batch_size}, {args.seq_len}] in {dt:.2f}s "
          f"= {_rate(args.batches, dt)} batches, {_rate(n_ex, dt)} examples, "
          f"{_rate(n_tok, dt)} tokens ({n_tok / positions:.1%} of positions are tokens)")
    iterate_tok_s = n_tok / dt

    if args.train_step:
        step_s = measure_train_step(batch, args.train_batch)
        train_tok = args.train_batch * args.seq_len
        print(f"train step: SmolLM2-135M fwd+bwd on [{args.train_batch}, {args.seq_len}] "
              f"{step_s:.2f}s = {_rate(train_tok, step_s)} positions")
        print(f"ratio     : iterate tokens/s / train positions/s = "
              f"{iterate_tok_s / (train_tok / step_s):,.0f}x")


if __name__ == "__main__":
    main()
