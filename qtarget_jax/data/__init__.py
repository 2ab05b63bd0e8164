"""SFT data: JSONL / JSONL.gz / Parquet files or tfds sources -> chat-template tokens with
assistant-only labels -> packed, sharded, resumable [B, T] batches (contract in
docs/design.md; user docs in docs/data.md)."""
from qtarget_jax.data.builder import prepare_dataset
from qtarget_jax.data.chat import IGNORE, TokenizedExample, tokenize_conversation
from qtarget_jax.data.packing import BATCH_KEYS
from qtarget_jax.data.pipeline import (
    EvalIterator,
    SftIterator,
    TokenizedSplit,
    make_eval_iterator,
    make_sft_iterator,
    tokenize_split,
)
from qtarget_jax.data.readers import expand_paths, read_rows
from qtarget_jax.data.records import BadFile, BadRow, Message, Policy, RowFormat
from qtarget_jax.data.stats import split_stats
from qtarget_jax.data.synthetic import extract_answer

__all__ = [
    "BATCH_KEYS", "BadFile", "BadRow", "EvalIterator", "IGNORE", "Message", "Policy",
    "RowFormat", "SftIterator", "TokenizedExample", "TokenizedSplit", "expand_paths",
    "extract_answer", "make_eval_iterator", "make_sft_iterator", "prepare_dataset", "read_rows",
    "split_stats", "tokenize_conversation", "tokenize_split",
]
