"""The trainer's entry points: a resumable, sharded, packed SFT batch stream and a one-pass eval.

Order of work: open the split -> this process reads only its shard (record ``i`` belongs to
process ``i % process_count``) -> validate + tokenise + mask (bad rows per `policy`) -> per
epoch, shuffle the shard by ``(seed, epoch, process_index)`` and pack it into rows -> batches of
``batch_size // process_count`` rows. The stream runs over epochs without end; a batch may hold
the last rows of one epoch and the first of the next, so every process yields one batch per
step whatever its shard's packing gives.

Iterator state is ``{"epoch", "row", "fingerprint"}``: the epoch's packing is a pure function
of (shard, seed, epoch), so after `set_state` the next batch is exactly the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from qtarget_jax.data import chat, packing, records, sources

log = logging.getLogger(__name__)
_TOKENIZE_CHUNK = 2048  # records read and held as text at a time (one worker task)


@dataclasses.dataclass
class TokenizedSplit:
    """This process's share of a split, tokenised.

    examples: kept examples (each tokens/labels [L_i], L_i <= seq_len).
    lengths: [N] int64 positions per example.
    num_records: records in the whole split (all processes).
    policy: the bad-row policy with skip counts by reason.
    num_truncated: examples whose response tail was cut to fit.
    """
    examples: list[chat.TokenizedExample]
    lengths: np.ndarray
    num_records: int
    policy: records.Policy
    num_truncated: int


def _tokenize_records(data_source: Any, indices: Sequence[int], tokenizer: Any, *, name: str,
                      seq_len: int, truncate: bool, field_map: Mapping[str, str] | None
                      ) -> list[chat.TokenizedExample | records.BadRow]:
    """Reads, validates and tokenises records ``indices``: per record, in order, its example
    or the `BadRow` it is (returned for the caller's policy, not handled here)."""
    out: list[Any] = []
    convs = []
    for i, where, rec in sources.read_records(data_source, indices, name=name):
        try:
            convs.append((len(out), where, sources.record_to_conversation(rec, where, field_map)))
            out.append(None)
        except records.BadRow as err:
            out.append(err)
    tokenized = chat.tokenize_conversations(tokenizer, [(w, c) for _, w, c in convs])
    for (k, where, _), got in zip(convs, tokenized):
        if not isinstance(got, records.BadRow):
            try:
                got = chat.to_training_example(*got, seq_len, truncate=truncate, where=where)
            except records.BadRow as err:
                got = err
        out[k] = got
    return out


_worker: dict[str, Any] = {}


def _worker_init(source: str, split: str, data_dir: str | None, tokenizer: Any,
                 kwargs: dict) -> None:
    _worker.update(ds=sources.open_split(source, split, data_dir=data_dir),
                   tokenizer=tokenizer, kwargs=kwargs)


def _worker_chunk(indices: Sequence[int]) -> list:
    out = _tokenize_records(_worker["ds"], indices, _worker["tokenizer"], **_worker["kwargs"])
    # BadRow pickles badly (its __init__ takes three arguments): send its parts.
    return [(g.reason, g.where, g.detail) if isinstance(g, records.BadRow) else g for g in out]


def tokenize_split(source: str, tokenizer: Any, *, split: str, seq_len: int,
                   data_dir: str | None = None, policy: str = "error", truncate: bool = False,
                   field_map: Mapping[str, str] | None = None, process_index: int = 0,
                   process_count: int = 1, num_workers: int = 0) -> TokenizedSplit:
    """Reads this process's shard of ``split`` and tokenises it (see `chat`).

    Records are read and tokenised a chunk at a time (only the token arrays are kept).
    ``num_workers > 1`` spreads the chunks over that many worker processes (spawned; each
    opens the split and gets a copy of the tokenizer); the result, bad-row handling included,
    is the same as with one process, in the same order.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ds = sources.open_split(source, split, data_dir=data_dir)
    pol = records.Policy(policy)
    indices = range(process_index, len(ds), process_count)
    chunks = [indices[start:start + _TOKENIZE_CHUNK]
              for start in range(0, len(indices), _TOKENIZE_CHUNK)]
    kwargs = dict(name=f"{source}:{split}", seq_len=seq_len, truncate=truncate,
                  field_map=field_map)
    examples, truncated = [], 0

    def consume(results):
        nonlocal truncated
        for got in results:
            if isinstance(got, tuple):
                got = records.BadRow(*got)
            if isinstance(got, records.BadRow):
                pol.handle(got)
                continue
            truncated += got.truncated
            examples.append(got)

    if num_workers > 1 and len(chunks) > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(source, split, data_dir, tokenizer, kwargs)) as pool:
            for results in pool.map(_worker_chunk, chunks):
                consume(results)
    else:
        for chunk in chunks:
            consume(_tokenize_records(ds, chunk, tokenizer, **kwargs))
    if pol.counts:
        log.warning("%s split %r: %s", source, split, pol.summary())
    lengths = np.array([len(e) for e in examples], np.int64)
    return TokenizedSplit(examples, lengths, len(ds), pol, truncated)


def _local_batch(batch_size: int, process_count: int) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"global batch_size={batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    return batch_size // process_count


class SftIterator:
    """Endless batches over epochs (see module doc). Each batch: dict of [B_local, T] arrays."""

    def __init__(self, data: TokenizedSplit, *, seq_len: int, batch_size: int, seed: int,
                 pack: bool = True, pack_window: int = 8, process_index: int = 0,
                 process_count: int = 1):
        if not data.examples:
            raise ValueError(f"process {process_index} has no examples to train on "
                             f"({data.num_records} records in the split; {data.policy.summary()})")
        self.data = data
        self.seq_len, self.seed, self.pack, self.pack_window = seq_len, seed, pack, pack_window
        self.local_batch_size = _local_batch(batch_size, process_count)
        self.process_index, self.process_count = process_index, process_count
        self._epoch, self._row = 0, 0
        self._bins_epoch, self._bins = -1, []
        key = json.dumps([seed, seq_len, batch_size, pack, pack_window, process_index,
                          process_count, len(data.examples), int(data.lengths.sum())])
        self._fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]

    def epoch_bins(self, epoch: int) -> list[list[int]]:
        """The rows of ``epoch``: bins of example indices (a pure function of seed and epoch)."""
        if epoch != self._bins_epoch:
            rng = np.random.default_rng([self.seed, epoch, self.process_index])
            order = rng.permutation(len(self.data.examples))
            self._bins = (packing.pack_bins(self.data.lengths, order, self.seq_len,
                                            window=self.pack_window)
                          if self.pack else packing.one_per_bin(order))
            self._bins_epoch = epoch
        return self._bins

    def __iter__(self) -> "SftIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        chosen = []
        while len(chosen) < self.local_batch_size:
            bins = self.epoch_bins(self._epoch)
            take = bins[self._row:self._row + self.local_batch_size - len(chosen)]
            chosen.extend(take)
            self._row += len(take)
            if self._row >= len(bins):
                self._epoch, self._row = self._epoch + 1, 0
        return packing.build_rows(self.data.examples, chosen, self.seq_len)

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self._epoch

    def get_state(self) -> dict[str, Any]:
        """Small JSON-able position: ``{"epoch": int, "row": int, "fingerprint": str}``."""
        return {"epoch": self._epoch, "row": self._row, "fingerprint": self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves to a position from `get_state`; raises if it came from another configuration."""
        if set(state) != {"epoch", "row", "fingerprint"}:
            raise KeyError(f"iterator state needs epoch, row, fingerprint; got {sorted(state)}")
        if state["fingerprint"] != self._fingerprint:
            raise ValueError(
                f"iterator state fingerprint {state['fingerprint']!r} != {self._fingerprint!r}: "
                "it was saved with another seed/seq_len/batch/packing/process layout/data")
        epoch, row = int(state["epoch"]), int(state["row"])
        if epoch < 0 or not 0 <= row < len(self.epoch_bins(epoch)):
            raise ValueError(f"iterator state epoch={epoch} row={row} is out of range")
        self._epoch, self._row = epoch, row


class EvalIterator:
    """One pass over a split, one example per row, in stored order; finite and deterministic.

    Every process yields ``num_batches = ceil(ceil(num_records / P) / B_local)`` batches, so
    hosts stay in step; rows past this shard's examples are padding (segment_ids 0, labels
    -100), which adds nothing to loss sums. ``num_examples`` counts this shard's real rows.
    """

    def __init__(self, data: TokenizedSplit, *, seq_len: int, batch_size: int,
                 process_count: int = 1):
        self.data, self.seq_len = data, seq_len
        self.local_batch_size = _local_batch(batch_size, process_count)
        per_process = -(-data.num_records // process_count)
        self.num_batches = -(-per_process // self.local_batch_size)
        self.num_examples = len(data.examples)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        b = self.local_batch_size
        for k in range(self.num_batches):
            members = [[i] for i in range(k * b, min((k + 1) * b, self.num_examples))]
            rows = packing.build_rows(self.data.examples, members, self.seq_len)
            if len(members) < b:
                pad = packing.empty_rows(b - len(members), self.seq_len)
                rows = {key: np.concatenate([rows[key], pad[key]]) for key in rows}
            yield rows


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def make_sft_iterator(source: str, tokenizer: Any, *, seq_len: int, batch_size: int, seed: int,
                      pack: bool = True, process_index: int | None = None,
                      process_count: int | None = None, split: str = "train",
                      data_dir: str | None = None, policy: str = "error",
                      truncate: bool = False, field_map: Mapping[str, str] | None = None,
                      pack_window: int = 8, num_workers: int = 0) -> SftIterator:
    """The training stream. ``batch_size`` is GLOBAL; each batch has batch_size/P rows.

    Args:
      source: a prepared dataset folder or a tfds catalog name (see `sources`).
      tokenizer: a transformers tokenizer with a chat_template.
      seq_len: T, row length. batch_size: global batch (rows). seed: shuffle seed.
      pack: pack several examples per row (else one per row, padded).
      process_index / process_count: default jax.process_index() / jax.process_count().
      split, data_dir, field_map: where to read (see `sources.open_split`).
      policy: "error" | "skip" for bad rows; truncate: cut too-long responses instead of
        treating the row as bad (see `chat.to_training_example`).
      pack_window: open rows in first-fit packing.
      num_workers: processes that tokenise the shard when the iterator is built (0 or 1: this
        one); the same examples either way.
    Returns:
      `SftIterator`: ``next(it)`` -> dict of [batch_size/P, seq_len] arrays (design.md),
      ``get_state()`` / ``set_state()``.
    """
    pi, pc = _processes(process_index, process_count)
    _local_batch(batch_size, pc)
    data = tokenize_split(source, tokenizer, split=split, seq_len=seq_len, data_dir=data_dir,
                          policy=policy, truncate=truncate, field_map=field_map,
                          process_index=pi, process_count=pc, num_workers=num_workers)
    return SftIterator(data, seq_len=seq_len, batch_size=batch_size, seed=seed, pack=pack,
                       pack_window=pack_window, process_index=pi, process_count=pc)


def make_eval_iterator(source: str, tokenizer: Any, *, seq_len: int, batch_size: int,
                       split: str = "test", process_index: int | None = None,
                       process_count: int | None = None, data_dir: str | None = None,
                       policy: str = "error", truncate: bool = False,
                       field_map: Mapping[str, str] | None = None,
                       num_workers: int = 0) -> EvalIterator:
    """One deterministic pass over ``split`` (see `EvalIterator`); ``batch_size`` is global."""
    pi, pc = _processes(process_index, process_count)
    _local_batch(batch_size, pc)
    data = tokenize_split(source, tokenizer, split=split, seq_len=seq_len, data_dir=data_dir,
                          policy=policy, truncate=truncate, field_map=field_map,
                          process_index=pi, process_count=pc, num_workers=num_workers)
    return EvalIterator(data, seq_len=seq_len, batch_size=batch_size, process_count=pc)
