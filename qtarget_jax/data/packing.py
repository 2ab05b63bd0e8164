"""Pack tokenised examples into fixed-length rows with segment ids and per-segment positions.

A "bin" is the list of example indices that share one row of length T (seq_len). Rows are
static-shape [T] arrays; the batch contract (docs/design.md) is:

  tokens      [B, T] int32  inputs, 0 in padding
  labels      [B, T] int32  next token, -100 where not supervised (and in padding)
  loss_mask   [B, T] f32    1.0 exactly where labels != -100
  positions   [B, T] int32  0, 1, ... restarting in each segment; 0 in padding
  segment_ids [B, T] int32  1, 2, ... per example in the row; 0 = padding
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from qtarget_jax.data.chat import IGNORE, TokenizedExample

BATCH_KEYS = ("tokens", "labels", "loss_mask", "positions", "segment_ids")


def pack_bins(lengths: np.ndarray, order: np.ndarray, seq_len: int, *, window: int = 8
              ) -> list[list[int]]:
    """First-fit packing over a sliding window of open rows, in a fixed visiting order.

    Args:
      lengths: [N] int, positions per example (each <= seq_len).
      order: [M] int, example indices in the order they are visited (e.g. a shuffle).
      seq_len: row length T.
      window: how many rows stay open; when a new row would exceed it, the oldest open row
        is emitted. 1 gives next-fit (rows keep the visiting order exactly).
    Returns:
      Bins (lists of example indices) in emission order; each example appears once.
      Deterministic in (lengths, order, seq_len, window).
    """
    if window < 1:
        raise ValueError(f"pack window must be >= 1, got {window}")
    lengths = np.asarray(lengths)
    out: list[list[int]] = []
    open_bins: list[list[int]] = []
    free: list[int] = []
    for idx in np.asarray(order).tolist():
        n = int(lengths[idx])
        if n > seq_len or n < 1:
            raise ValueError(f"example {idx} has length {n}, outside [1, seq_len={seq_len}]")
        for b, room in enumerate(free):
            if n <= room:
                open_bins[b].append(idx)
                free[b] -= n
                break
        else:
            if len(open_bins) == window:
                out.append(open_bins.pop(0))
                free.pop(0)
            open_bins.append([idx])
            free.append(seq_len - n)
    out.extend(open_bins)
    return out


def one_per_bin(order: np.ndarray) -> list[list[int]]:
    """No packing: one example per row (the rest is padding)."""
    return [[int(i)] for i in np.asarray(order).tolist()]


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """``n`` all-padding rows: a dict of the BATCH_KEYS arrays, each [n, seq_len]."""
    return {
        "tokens": np.zeros((n, seq_len), np.int32),
        "labels": np.full((n, seq_len), IGNORE, np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "positions": np.zeros((n, seq_len), np.int32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
    }


def build_rows(examples: Sequence[TokenizedExample], bins: Sequence[Sequence[int]],
               seq_len: int) -> dict[str, np.ndarray]:
    """Materialises ``bins`` as a batch dict of [len(bins), seq_len] arrays (see module doc)."""
    rows = empty_rows(len(bins), seq_len)
    for r, members in enumerate(bins):
        pos = 0
        for seg, idx in enumerate(members, start=1):
            ex = examples[idx]
            n = len(ex)
            if pos + n > seq_len:
                raise ValueError(f"bin {r} overflows seq_len={seq_len} at example {idx}")
            rows["tokens"][r, pos:pos + n] = ex.tokens
            rows["labels"][r, pos:pos + n] = ex.labels
            rows["positions"][r, pos:pos + n] = np.arange(n, dtype=np.int32)
            rows["segment_ids"][r, pos:pos + n] = seg
            pos += n
    rows["loss_mask"] = (rows["labels"] != IGNORE).astype(np.float32)
    return rows


def packing_efficiency(lengths: np.ndarray, bins: Sequence[Sequence[int]], seq_len: int
                       ) -> float:
    """Fraction of row positions holding real tokens: sum(lengths in bins) / (rows * T)."""
    if not bins:
        return 0.0
    used = sum(int(lengths[i]) for b in bins for i in b)
    return used / (len(bins) * seq_len)
