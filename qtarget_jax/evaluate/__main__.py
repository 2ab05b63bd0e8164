"""`python -m qtarget_jax.evaluate`: accuracy, Average@k, held-out loss of a model on an
evaluation set (JSONL, JSONL.gz or Parquet; chat rows or question/answer rows).

Examples:
  python -m qtarget_jax.evaluate --model smollm2 --data data/synth/test.jsonl --limit 50
  python -m qtarget_jax.evaluate --model runs/x/hf --data data/synth/test.jsonl --samples 16
  python -m qtarget_jax.evaluate --run-dir runs/smollm2_target_sft --data data/synth/test.jsonl
  python -m qtarget_jax.evaluate --model smollm2 --data gsm8k/main/test-00000-of-00001.parquet
  python -m qtarget_jax.evaluate --model smollm2 --data MATH-500/test.jsonl \\
      --question-column problem --answer-column answer --response-column solution

Prints one JSON line of metrics; --out writes the per-example outputs as JSONL.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from qtarget_jax.evaluate import evaluate_model, load_checkpoint, load_examples, load_source
from qtarget_jax.libtpu_env import quiet_without_tpu


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m qtarget_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="'smollm2', a .gguf file or a Hugging Face folder")
    src.add_argument("--run-dir", help="a training run folder (config.yaml + checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--data", required=True,
                   help="JSONL/JSONL.gz/Parquet file(s), glob or folder: chat rows, or "
                   "question/answer rows (GSM8K '#### N', MATH '\\boxed{}' or a bare answer)")
    p.add_argument("--question-column", help="column of the question (default: question, "
                   "problem or prompt for rows that are not chat rows)")
    p.add_argument("--answer-column", help="column of the gold answer (default: answer, else "
                   "solution); its '#### N' or '\\boxed{X}', else its whole text")
    p.add_argument("--response-column", help="column of the reference solution for the "
                   "held-out loss (default: solution, or the answer when it is a solution)")
    p.add_argument("--system-prompt", help="system turn before every question")
    p.add_argument("--limit", type=int, default=None, help="first N examples only")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32,
                   help="prompts per decode call (each decoded 1 + --samples times)")
    p.add_argument("--samples", type=int, default=0, help="k for Average@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=256, help="for the held-out loss")
    p.add_argument("--no-loss", action="store_true", help="skip the held-out loss")
    p.add_argument("--out", default=None, help="per-example JSONL output path")
    args = p.parse_args(argv)
    quiet_without_tpu()  # libtpu installed, no TPU here: no libtpu errors

    t0 = time.perf_counter()
    examples = load_examples(args.data, args.limit, question_column=args.question_column,
                             answer_column=args.answer_column,
                             response_column=args.response_column,
                             system_prompt=args.system_prompt)
    loss_seq_len = None if args.no_loss else args.seq_len
    if loss_seq_len is not None and any(ex.reference is None for ex in examples):
        missing = sum(ex.reference is None for ex in examples)
        print(f"note: {missing} of {len(examples)} examples have no reference response "
              "(--response-column): no held-out loss", file=sys.stderr)
        loss_seq_len = None
    info = {}
    if args.run_dir:
        model, tokenizer, step = load_checkpoint(args.run_dir, args.step)
        info = {"run_dir": args.run_dir, "step": step}
    else:
        model, tokenizer = load_source(args.model)
        info = {"model": args.model}
    metrics = evaluate_model(model, tokenizer, examples, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, num_samples=args.samples,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             loss_seq_len=loss_seq_len,
                             out_path=args.out)
    out = {**info, "data": args.data, **metrics, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
