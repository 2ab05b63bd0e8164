"""Open one split of a dataset for random access: a prepared folder or a tfds catalog name.

``source`` (the one config field) is either
- a folder written by `builder.prepare_dataset` (any tfds dataset folder with
  ``dataset_info.json``), read with ``tfds.builder_from_directory``, or
- a tfds catalog name such as ``"my_dataset"`` or ``"my_dataset/config:1.0.0"``, read with
  ``tfds.data_source(name, data_dir=...)``. It must already be prepared as array_record in
  ``data_dir`` (nothing is downloaded). Its records need ``messages`` or ``prompt`` +
  ``response`` features; ``field_map`` renames others, e.g.
  ``{"prompt": "question", "response": "answer"}``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import tensorflow_datasets as tfds

from qtarget_jax.data import records

_READ_CHUNK = 1024  # records fetched per array_record read


def open_split(source: str, split: str, *, data_dir: str | None = None) -> Sequence[Any]:
    """Returns a random-access data source (``len`` and ``[i]``) of the split's records."""
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "dataset_info.json")):
            raise FileNotFoundError(
                f"source {source!r} is a folder without dataset_info.json; pass the version "
                "folder printed by `python -m qtarget_jax.data prepare` (.../<name>/1.0.0)")
        builder = tfds.builder_from_directory(source)
        splits = list(builder.info.splits)
        if split not in splits:
            raise KeyError(f"source {source!r} has no split {split!r}; it has {splits}")
        return builder.as_data_source(split=split)
    # Catalog names are "name[/config][:version]": at most one "/", no leading "/", ".", "~".
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.path.exists(source):
        raise FileNotFoundError(f"source {source!r} is not a dataset folder (and not a catalog "
                                "name): pass the folder printed by `prepare`")
    return tfds.data_source(source, split=split, data_dir=data_dir, download=False)


def record_to_conversation(record: Mapping[str, Any], where: str,
                           field_map: Mapping[str, str] | None = None
                           ) -> records.Conversation:
    """Validates one stored record (see `records.row_to_conversation`) after renaming fields.

    ``field_map`` maps our field (``messages``, ``prompt``, ``response``) -> the record's key.
    """
    row = dict(record)
    for ours, theirs in (field_map or {}).items():
        if ours not in ("messages", "prompt", "response"):
            raise ValueError(f"field_map key {ours!r} must be messages, prompt or response")
        if theirs not in record:
            raise KeyError(f"{where}: field_map {ours}->{theirs!r} but record has {sorted(record)}")
        row[ours] = record[theirs]
    return records.row_to_conversation(row, where)


def read_records(data_source: Sequence[Any], indices: Sequence[int], *, name: str
                 ) -> list[tuple[int, str, Mapping[str, Any]]]:
    """Reads records ``indices`` (in batches); returns ``[(index, where, record)]``.

    ``where`` is the record's own ``source`` feature when present (``file.jsonl:LINE``), else
    ``"<name>[index]"``.
    """
    indices = [int(i) for i in indices]
    recs = []
    for start in range(0, len(indices), _READ_CHUNK):
        chunk = indices[start:start + _READ_CHUNK]
        getitems = getattr(data_source, "__getitems__", None)
        recs.extend(getitems(chunk) if getitems else [data_source[i] for i in chunk])
    out = []
    for i, rec in zip(indices, recs):
        where = rec.get("source", None)
        where = where.decode() if isinstance(where, bytes) else (where or f"{name}[{i}]")
        out.append((i, where, rec))
    return out


def read_conversations(data_source: Sequence[Any], indices: Sequence[int], *, name: str,
                       policy: records.Policy, field_map: Mapping[str, str] | None = None
                       ) -> list[tuple[int, str, records.Conversation]]:
    """Reads and validates records ``indices``; returns ``[(index, where, conversation)]``.

    ``where`` as in `read_records`. Bad records go to ``policy``.
    """
    out = []
    for i, where, rec in read_records(data_source, indices, name=name):
        try:
            out.append((i, where, record_to_conversation(rec, where, field_map)))
        except records.BadRow as err:
            policy.handle(err)
    return out
