"""Files of rows -> validated conversations, streamed: JSONL, JSONL.gz and Parquet shards.

`expand_paths` turns what the user typed (files, globs, folders of shards) into a list of
files. `read_dicts` streams one file's raw rows with their position; `read_rows` validates
them (`records.row_to_conversation`) under a bad-row policy. Memory is bounded by one Parquet
record batch (`BATCH_ROWS` rows of the needed columns) or one JSONL line, whatever the file
size; Parquet is read with pyarrow, only the columns the row format needs.

Positions: a JSONL row is named ``file:LINE`` (1-based line, as an editor shows it); a Parquet
row ``file:row N`` (0-based row index, as ``pyarrow.parquet.read_table(f).slice(N, 1)`` and
pandas ``df.iloc[N]`` count). `Row.index` is that number: stable across runs, it keys the
example together with the file's index in its split.
"""
from __future__ import annotations

import glob
import gzip
import os
import zlib
from typing import Any, Iterator, NamedTuple, Sequence

from qtarget_jax.data import records

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
BATCH_ROWS = 1024  # Parquet rows decoded at a time


class Row(NamedTuple):
    """One valid row: position in its file, location text, conversation, kept columns."""
    index: int                           # JSONL line (1-based) or Parquet row (0-based)
    where: str                           # "file:LINE" or "file:row N"
    conversation: records.Conversation
    metadata: dict[str, Any] | None      # the RowFormat.keep columns; None when none kept


def file_kind(path: str) -> str:
    """``"jsonl"``, ``"jsonl.gz"`` or ``"parquet"`` from the file name; ValueError otherwise."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if path.endswith(suffix):
            return suffix[1:]
    raise ValueError(f"{path!r}: unsupported file type; expected one of {SUFFIXES}")


def _supported(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(SUFFIXES)


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Files named by ``spec``: comma-separated (or a list of) files, globs and folders.

    A folder gives the supported files directly inside it (not in sub-folders), a glob the
    supported files it matches, both sorted by name. Raises FileNotFoundError for a missing
    file or a folder/glob with no supported file, ValueError for an unsupported file type or
    a file named twice.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item))
            files = [f for f in found if _supported(f)]
            if not files:
                raise FileNotFoundError(f"folder {item!r} has no {'/'.join(SUFFIXES)} files "
                                        f"(it has {[os.path.basename(f) for f in found][:10]})")
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
            files = [f for f in found if _supported(f)]
            if not files:
                raise FileNotFoundError(f"{item!r} matches no {'/'.join(SUFFIXES)} file "
                                        f"(matches: {found[:10]})")
        else:
            if not os.path.isfile(item):
                raise FileNotFoundError(f"no such file {item!r}")
            file_kind(item)
            files = [item]
        out.extend(files)
    seen: set[str] = set()
    for f in out:
        key = os.path.abspath(f)
        if key in seen:
            raise ValueError(f"{f!r} is named twice; its rows would be read twice")
        seen.add(key)
    if not out:
        raise FileNotFoundError(f"no files in {spec!r}")
    return out


def open_parquet(path: str):
    """``pyarrow.parquet.ParquetFile`` of ``path``; `records.BadFile` if it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise records.BadFile(path, f"cannot read as Parquet (truncated or corrupt shard?): "
                              f"{e}") from None


def _jsonl_dicts(path: str, policy: records.Policy) -> Iterator[tuple[int, str, Any]]:
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = records.parse_json(line, where)
                except records.BadRow as err:
                    policy.handle(err)
                    continue
                yield lineno, where, row
    except (EOFError, OSError, zlib.error) as e:
        raise records.BadFile(path, f"truncated or corrupt after line {lineno}: "
                              f"{type(e).__name__}: {e}") from None


def _parquet_dicts(pf: Any, path: str, columns: Sequence[str] | None
                   ) -> Iterator[tuple[int, str, Any]]:
    import pyarrow as pa

    index = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                yield index, f"{path}:row {index}", row
                index += 1
    except (pa.ArrowException, OSError) as e:
        raise records.BadFile(path, f"unreadable from row {index}: {e}") from None


def read_dicts(path: str, policy: records.Policy, columns: Sequence[str] | None = None
               ) -> Iterator[tuple[int, str, Any]]:
    """Yields ``(index, where, row)`` for each row of one file, a decoded JSON value or a
    Parquet row as a dict (only ``columns``, default all; a missing one is an error).

    JSONL lines that are not UTF-8 or not JSON go to ``policy``; blank lines are ignored.
    Raises `records.BadFile` for a file that cannot be read to its end.
    """
    if file_kind(path) == "parquet":
        yield from _parquet_dicts(open_parquet(path), path, columns)
    else:
        yield from _jsonl_dicts(path, policy)


def _missing_row(path: str, fmt: records.RowFormat, missing: list[str], names: list[str]
                 ) -> records.BadRow:
    if set(missing) <= set(fmt.keep):
        what, hint = f"no column {missing} to keep", "fix --keep-columns"
    elif fmt.explicit:
        what, hint = f"no column {missing}", "fix the column flags"
    else:
        what = "no 'messages', 'conversations' or 'prompt'+'response' column"
        hint = "name yours with --messages-column or --prompt-column/--response-column"
    return records.BadRow("bad_fields", f"{path}:row 0",
                          f"{what} (the file has {names}); {hint}; every row of the file is bad")


def check_file(path: str, fmt: records.RowFormat | None = None) -> None:
    """Fails fast, before any row is read: a Parquet shard that cannot be opened raises
    `records.BadFile`; one without the columns ``fmt`` needs raises a `records.BadRow`."""
    if file_kind(path) != "parquet":
        return
    fmt = fmt or records.RowFormat()
    pf = open_parquet(path)
    names = pf.schema_arrow.names
    _, missing = fmt.columns_for(names)
    if missing:
        raise _missing_row(path, fmt, missing, names)


def read_rows(path: str, policy: records.Policy, fmt: records.RowFormat | None = None
              ) -> Iterator[Row]:
    """Yields a `Row` for each valid row of one file (JSONL, JSONL.gz or Parquet).

    Bad rows go to ``policy`` (raise naming ``file:LINE`` / ``file:row N``, or count). A
    Parquet file without the needed columns is bad in every row: under "skip" all its rows
    are counted as ``bad_fields``.
    """
    fmt = fmt or records.RowFormat()
    if file_kind(path) == "parquet":
        pf = open_parquet(path)
        names = pf.schema_arrow.names
        columns, missing = fmt.columns_for(names)
        if missing:
            policy.handle(_missing_row(path, fmt, missing, names), rows=pf.metadata.num_rows)
            return
        dicts = _parquet_dicts(pf, path, columns)
    else:
        dicts = _jsonl_dicts(path, policy)
    for index, where, raw in dicts:
        try:
            conv = records.row_to_conversation(raw, where, fmt)
            meta = records.row_metadata(raw, where, fmt.keep) if fmt.keep else None
        except records.BadRow as err:
            policy.handle(err)
            continue
        yield Row(index, where, conv, meta)
