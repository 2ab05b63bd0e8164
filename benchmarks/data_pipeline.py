"""Data pipeline at scale: prepare a 200k-row chat corpus in bounded memory, tokenise it as fast
as a plain tokenizer loop allows, iterate batches, and compare with the train step.

Claim: `prepare` streams (peak RSS < 2 GB for 200k rows of ~1 KB, whatever the row count), and
tokenisation at training time outruns the train step. Measured in one run, on the same CPU:
  1. corpus: write N NuminaMath-CoT-style rows (source, problem, solution, messages; ~1 KB
     of text per row) as Parquet shards (rows/s);
  2. read (reference): pyarrow iter_batches + to_pylist of the same columns (rows/s), the
     floor for any Parquet reader;
  3. prepare: `python -m qtarget_jax.data prepare` in a child process: rows/s and its peak
     RSS (getrusage of the child);
  4. tokenise: `pipeline.tokenize_split` on a 1/--tok-shards shard of the prepared split
     (read + validate + chat template + mask, exactly what the trainer runs), against the
     reference: a plain loop over the same conversations, `apply_chat_template` then
     `tokenizer(batch of 64)` (tokens/s of each, and the ratio); with --workers N, also
     `tokenize_split(num_workers=N)`;
  5. iterate: packed [B, T] batches (tokens/s);
  6. train step (--train-step): SmolLM2-135M fwd+bwd of the SFT loss on [b, T], random
     weights, jitted, median of 3 after compiling; printed as ratios tokenise / train and
     iterate / train (tokens per second).

Example Usage:
  .venv/bin/python benchmarks/data_pipeline.py --rows 200000 --train-step --workers 2
  .venv/bin/python benchmarks/data_pipeline.py --rows 20000 --tok-shards 4   # quicker
Cost for 200k rows on 2 shared CPU cores (measured): 0.5-1 min corpus, 1.5-2.5 min prepare,
~0.5 min tokenise (5,000 rows, plus ~0.5 min with --workers 2), ~5 min train step (compile +
3 timed steps). Disk: ~0.6 GB in a temp folder (removed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_WORDS = ("the", "sum", "of", "two", "numbers", "is", "equal", "to", "let", "x", "be", "we",
          "have", "so", "therefore", "triangle", "angle", "side", "length", "area", "prime",
          "integer", "divisible", "by", "and", "then", "find", "value", "+", "-", "=", "*")


def _text(rng: np.random.Generator, n_words: int) -> str:
    words = np.asarray(_WORDS)[rng.integers(0, len(_WORDS), n_words)]
    nums = rng.integers(0, 1000, n_words // 6)
    return " ".join(words.tolist()) + " " + " ".join(map(str, nums.tolist()))


def write_corpus(folder: str, rows: int, shards: int = 4, seed: int = 0,
                 batch_rows: int = 5000) -> list[str]:
    """Writes ``rows`` NuminaMath-CoT-style rows as ``shards`` Parquet files (written a batch at
    a time, so memory stays small). Per row ~1 KB of text: a ~200-character problem and a
    ~800-character solution ending in ``\\boxed{N}``; ``messages`` repeats them as chat turns.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_shard = -(-rows // shards)
    paths, done = [], 0
    for s in range(shards):
        path = os.path.join(folder, f"train-{s:05d}-of-{shards:05d}.parquet")
        n_shard = min(per_shard, rows - done)
        with pq.ParquetWriter(path, _schema(pa)) as writer:
            for start in range(0, n_shard, batch_rows):
                n = min(batch_rows, n_shard - start)
                batch = []
                for _ in range(n):
                    problem = _text(rng, 30) + "?"
                    solution = _text(rng, 120) + f"\nSo the answer is \\boxed{{{rng.integers(100)}}}."
                    batch.append({"source": "synthetic_math", "problem": problem,
                                  "solution": solution,
                                  "messages": [{"role": "user", "content": problem},
                                               {"role": "assistant", "content": solution}]})
                writer.write_table(pa.Table.from_pylist(batch, schema=_schema(pa)))
        done += n_shard
        paths.append(path)
    return paths


def _schema(pa):
    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    return pa.schema([("source", pa.string()), ("problem", pa.string()),
                      ("solution", pa.string()), ("messages", pa.list_(msg))])


def read_reference(paths: list[str]) -> int:
    """Rows read by plain pyarrow (the columns prepare reads), as Python objects."""
    import pyarrow.parquet as pq

    n = 0
    for p in paths:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024, columns=["messages"]):
            n += len(batch.to_pylist())
    return n


def prepare_child(folder: str, out: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of `python -m qtarget_jax.data prepare` on folder."""
    cmd = [sys.executable, "-m", "qtarget_jax.data", "prepare", "--split", f"train={folder}",
           "--out", out, "--name", "bench", "--seq-len", "0"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if res.returncode:
        raise SystemExit(f"prepare failed:\n{res.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("  (peak RSS of the child not above an earlier child's; it is an upper bound)")
    return seconds, peak / 1024, res.stdout


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


def reference_tokenize(tok, convs: list, batch: int = 64) -> tuple[float, float, int]:
    """The plain loop: render each conversation with the chat template, then `tok(batch)`.
    Returns (seconds rendering, seconds in tok(batch), tokens)."""
    from qtarget_jax.data.records import conversation_to_dicts

    t = time.perf_counter()
    texts = [tok.apply_chat_template(conversation_to_dicts(c), tokenize=False) for c in convs]
    render_s = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    for start in range(0, len(texts), batch):
        out = tok(texts[start:start + batch], add_special_tokens=False)["input_ids"]
        n += sum(len(ids) for ids in out)
    return render_s, time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="corpus rows")
    ap.add_argument("--shards", type=int, default=4, help="Parquet files")
    ap.add_argument("--tok-shards", type=int, default=40,
                    help="tokenise 1/this of the split (process 0 of this many)")
    ap.add_argument("--workers", type=int, default=0,
                    help="also tokenise with this many worker processes (>1)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per iterated batch")
    ap.add_argument("--batches", type=int, default=200, help="batches to iterate")
    ap.add_argument("--tokenizer", help="HF folder or .gguf (default: SmolLM2 GGUF)")
    ap.add_argument("--train-step", action="store_true", help="also time a 135M train step")
    ap.add_argument("--train-batch", type=int, default=1, help="rows in the timed train step")
    ap.add_argument("--keep", help="work folder to keep (default: a temp folder, removed)")
    args = ap.parse_args()

    from qtarget_jax.data import pipeline, sources
    from qtarget_jax.data.__main__ import load_tokenizer

    print(f"loadavg at start: {open('/proc/loadavg').read().strip()}")
    work = args.keep or tempfile.mkdtemp(prefix="qtarget_data_bench_")
    report = {"rows": args.rows}
    try:
        t = time.perf_counter()
        paths = write_corpus(os.path.join(work, "corpus"), args.rows, args.shards)
        dt = time.perf_counter() - t
        size = sum(os.path.getsize(p) for p in paths)
        print(f"corpus    : {args.rows} rows ({size / 2**20:.0f} MiB Parquet, {args.shards} "
              f"shards) in {dt:.1f}s")

        t = time.perf_counter()
        n = read_reference(paths)
        dt_read = time.perf_counter() - t
        print(f"read (ref): pyarrow iter_batches+to_pylist {n} rows in {dt_read:.1f}s = "
              f"{n / dt_read:,.0f} rows/s")

        seconds, peak_mib, out = prepare_child(os.path.join(work, "corpus"),
                                               os.path.join(work, "tfds"))
        print(f"prepare   : {args.rows} rows in {seconds:.1f}s = {args.rows / seconds:,.0f} "
              f"rows/s (child process, incl. ~3 s start); peak RSS {peak_mib:,.0f} MiB "
              f"({'under' if peak_mib < 2048 else 'OVER'} 2 GiB); read/prepare rate = "
              f"{(n / dt_read) / (args.rows / seconds):.1f}x")
        report.update(prepare_rows_s=args.rows / seconds, prepare_peak_rss_mib=peak_mib)
        ds_dir = os.path.join(work, "tfds", "jsonl_sft", "bench", "1.0.0")

        t = time.perf_counter()
        tok = load_tokenizer(args.tokenizer)
        print(f"tokenizer : loaded in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        split = pipeline.tokenize_split(ds_dir, tok, split="train", seq_len=args.seq_len,
                                        truncate=True, process_index=0,
                                        process_count=args.tok_shards)
        dt = time.perf_counter() - t
        n_ex, ntok = len(split.examples), int(split.lengths.sum())
        ds = sources.open_split(ds_dir, "train")
        convs = [c for _, _, c in sources.read_conversations(
            ds, range(0, len(ds), args.tok_shards), name="bench",
            policy=pipeline.records.Policy("error"))]
        render_s, tok_s, ref_tok = reference_tokenize(tok, convs)
        ref_rate = ref_tok / (render_s + tok_s)
        print(f"tokenise  : tokenize_split of 1/{args.tok_shards} ({n_ex} examples, {ntok} "
              f"tokens) in {dt:.1f}s = {n_ex / dt:,.0f} examples/s, {ntok / dt:,.0f} tokens/s")
        print(f"tok (ref) : plain loop on the same {len(convs)} conversations, "
              f"apply_chat_template + tokenizer(batch of 64): {ref_rate:,.0f} tokens/s "
              f"(tokenizer alone: {ref_tok / tok_s:,.0f} tokens/s); ours / plain loop = "
              f"{(ntok / dt) / ref_rate:.2f}")
        report.update(tokenise_tokens_s=ntok / dt, reference_tokens_s=ref_rate,
                      reference_tokenizer_only_tokens_s=ref_tok / tok_s)
        if args.workers > 1:
            t = time.perf_counter()
            par = pipeline.tokenize_split(ds_dir, tok, split="train", seq_len=args.seq_len,
                                          truncate=True, process_index=0,
                                          process_count=args.tok_shards,
                                          num_workers=args.workers)
            dt_w = time.perf_counter() - t
            assert int(par.lengths.sum()) == ntok
            print(f"tokenise  : the same with num_workers={args.workers}: {dt_w:.1f}s (incl. "
                  f"starting them) = {ntok / dt_w:,.0f} tokens/s, {dt / dt_w:.2f}x one process")
            report.update(tokenise_workers_tokens_s=ntok / dt_w)

        it = pipeline.SftIterator(split, seq_len=args.seq_len, batch_size=args.batch_size,
                                  seed=0)
        batch = next(it)
        t = time.perf_counter()
        n_tok = 0
        for _ in range(args.batches):
            batch = next(it)
            n_tok += int((batch["segment_ids"] > 0).sum())
        dt_it = time.perf_counter() - t
        print(f"iterate   : {args.batches} batches [{args.batch_size}, {args.seq_len}] = "
              f"{n_tok / dt_it:,.0f} tokens/s")
        report.update(iterate_tokens_s=n_tok / dt_it)

        if args.train_step:
            step_s = measure_train_step(batch, args.train_batch)
            train_tok = args.train_batch * args.seq_len
            print(f"train step: SmolLM2-135M fwd+bwd on [{args.train_batch}, {args.seq_len}] "
                  f"{step_s:.2f}s = {train_tok / step_s:,.0f} positions/s")
            print(f"ratio     : tokenise / train = {(ntok / dt) / (train_tok / step_s):,.0f}x; "
                  f"iterate / train = {(n_tok / dt_it) / (train_tok / step_s):,.0f}x")
            report.update(train_positions_s=train_tok / step_s)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"loadavg at end: {open('/proc/loadavg').read().strip()}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
