"""SFT data: JSONL/tfds sources -> chat-template tokens with assistant-only labels -> packed,
sharded, resumable [B, T] batches (contract in docs/design.md; user docs in docs/data.md)."""
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
from qtarget_jax.data.records import BadRow, Message, Policy
from qtarget_jax.data.stats import split_stats
from qtarget_jax.data.synthetic import extract_answer

__all__ = [
    "BATCH_KEYS", "BadRow", "EvalIterator", "IGNORE", "Message", "Policy", "SftIterator",
    "TokenizedExample", "TokenizedSplit", "extract_answer", "make_eval_iterator",
    "make_sft_iterator", "prepare_dataset", "split_stats", "tokenize_conversation",
    "tokenize_split",
]
