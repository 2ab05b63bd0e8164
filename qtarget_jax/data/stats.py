"""Statistics of a tokenised split: rows, tokens, supervised tokens, skips, packing efficiency."""
from __future__ import annotations

from typing import Any

import numpy as np

from qtarget_jax.data import chat, packing
from qtarget_jax.data.pipeline import TokenizedSplit


def split_stats(data: TokenizedSplit, seq_len: int, *, seed: int = 0, pack_window: int = 8
                ) -> dict[str, Any]:
    """Numbers for one split (this process's shard).

    Returns a JSON-able dict: records (in the split), examples (kept here), skipped (reason ->
    count), truncated, tokens (input positions), supervised (labels != -100), max_len,
    mean_len, packed_rows and packing_efficiency (epoch 0 packing with ``seed``), and
    padded_efficiency (one example per row, for comparison).
    """
    lengths = data.lengths
    supervised = int(sum(int((e.labels != chat.IGNORE).sum()) for e in data.examples))
    order = np.random.default_rng([seed, 0, 0]).permutation(len(lengths))
    bins = packing.pack_bins(lengths, order, seq_len, window=pack_window)
    return {
        "records": data.num_records,
        "examples": len(data.examples),
        "skipped": dict(sorted(data.policy.counts.items())),
        "truncated": data.num_truncated,
        "tokens": int(lengths.sum()),
        "supervised": supervised,
        "max_len": int(lengths.max()) if len(lengths) else 0,
        "mean_len": float(lengths.mean()) if len(lengths) else 0.0,
        "packed_rows": len(bins),
        "packing_efficiency": packing.packing_efficiency(lengths, bins, seq_len),
        "padded_efficiency": float(lengths.sum()) / (len(lengths) * seq_len) if len(lengths)
        else 0.0,
    }


def format_stats(split: str, s: dict[str, Any]) -> str:
    """A few human-readable lines for `split_stats` output."""
    skipped = ", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "none"
    return (
        f"[{split}] records={s['records']} examples={s['examples']} skipped: {skipped}; "
        f"truncated={s['truncated']}\n"
        f"[{split}] tokens={s['tokens']} supervised={s['supervised']} "
        f"({s['supervised'] / max(s['tokens'], 1):.1%}) mean_len={s['mean_len']:.1f} "
        f"max_len={s['max_len']}\n"
        f"[{split}] packed_rows={s['packed_rows']} packing_efficiency="
        f"{s['packing_efficiency']:.1%} (unpacked: {s['padded_efficiency']:.1%})"
    )
