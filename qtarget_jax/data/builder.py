"""JSONL / JSONL.gz / Parquet files -> a tensorflow-datasets dataset stored as array_record
(no TensorFlow needed).

The stored dataset holds validated conversations, not token ids, so one prepared dataset serves
any model/tokenizer. Layout: ``<out_dir>/jsonl_sft/<name>/1.0.0/`` with
``jsonl_sft-<split>.array_record-*``, ``dataset_info.json``, ``features.json``; the bad-row
counts, row format and source files of the preparation are kept in its ``metadata.json``.
Rows are streamed (`readers`); tfds buffers serialized records in memory up to 1 GB and then
spills them to temporary files, so memory stays bounded for any number of rows.

Record features::

  messages: Sequence({"role": Text, "content": Text})   # [num_messages] each
  source:   Text                                        # "file.jsonl:LINE" / "f.parquet:row N"
  metadata: Text   # only with keep columns: a JSON object {column: value} of the kept columns

Stored order is reproducible: each row's tfds key is ``"FILE_INDEX:LINE"`` (the file's place in
its split's list, the row's line number), and tfds stores a split in the order of a salted md5
of the keys. So the order, and the array_record bytes, depend only on the split names, the
files' contents, their order in the list and the ``source`` labels, never on where the files
sit, the process or the time. ``source`` labels a file by its name (with as many parent folders
as make it unique among the split's files); ``metadata.json`` keeps the absolute paths. tfds
serialises each record's feature map in the process's hash order; `DeterministicWriter`
re-serialises it sorted, so preparing the same files twice gives byte-identical array_record
shards (and ``dataset_info.json``, ``features.json``).

tfds writes and reads array_record without TensorFlow (checked with tensorflow absent: the
default install has none); reading uses ``tfds.data_source`` / ``builder_from_directory``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

from qtarget_jax.data import readers, records

BUILDER_NAME = "jsonl_sft"
VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[a-z0-9_]+$")


class JsonlSft(tfds.core.GeneratorBasedBuilder):
    """SFT conversations read from the user's JSONL files (one builder config per dataset name).

    Args (besides tfds's own):
      split_files: split name -> list of files, e.g. ``{"train": ["a.jsonl", "b.parquet"]}``.
      policy: `records.Policy` for bad rows; after `download_and_prepare` its ``counts`` hold
        the skipped rows by reason.
      row_format: `records.RowFormat` (columns to use, kept columns); default: recognise rows.
    """

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, split_files: Mapping[str, Sequence[str]] | None = None,
                 policy: records.Policy | None = None,
                 row_format: records.RowFormat | None = None, **kwargs: Any):
        self._split_files = {k: list(v) for k, v in (split_files or {}).items()}
        self._policy = policy or records.Policy("error")
        self._row_format = row_format or records.RowFormat()
        super().__init__(**kwargs)

    # tfds 4.9.10 resolves code_path via `importlib_resources`, a package it only declares for
    # python < 3.9; on 3.10+ a builder defined in a package then fails. This file is the path.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "messages": tfds.features.Sequence({
                "role": tfds.features.Text(),
                "content": tfds.features.Text(),
            }),
            "source": tfds.features.Text(),
        }
        if self._row_format.keep:
            features["metadata"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="SFT conversations prepared from JSONL/Parquet by qtarget_jax.data",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict:
        if not self._split_files:
            raise ValueError("JsonlSft needs split_files={'train': [...], ...} to prepare")
        return {split: self._generate_examples(paths)
                for split, paths in self._split_files.items()}

    def _example_writer(self) -> tfds.core.ExampleWriter:
        return DeterministicWriter(file_format=self.info.file_format)

    def _generate_examples(self, paths: Sequence[str]):
        labels = source_labels(paths)
        for index, path in enumerate(paths):
            for row in readers.read_rows(path, self._policy, self._row_format):
                # row.where is "PATH:LINE" (JSONL) or "PATH:row N" (Parquet): keep its suffix.
                suffix = row.where[len(path):] if row.where.startswith(path) else f":{row.index}"
                yield example_key(index, row.index), {
                    "messages": records.conversation_to_dicts(row.conversation),
                    "source": f"{labels[index]}{suffix}",
                    **_metadata_feature(row),
                }


class DeterministicWriter(tfds.core.ExampleWriter):
    """tfds's writer, with each tf.Example re-serialised with sorted map keys.

    tfds serialises the ``features`` map of a record in upb's hash order, which differs from
    one process to the next; the bytes then differ though the records are equal.
    """

    def write(self, path, examples):
        def sorted_bytes():
            for key, raw in examples:
                ex = tf_example_pb2.Example()
                ex.ParseFromString(raw)
                yield key, ex.SerializeToString(deterministic=True)
        return super().write(path, sorted_bytes())


def example_key(file_index: int, line: int) -> str:
    """The tfds key of a row: ``"FILE_INDEX:LINE"``, its place in the split, not its path.

    tfds orders a split by md5(split name + key), so this key makes the stored order a pure
    function of the split's list of files and their line layout (module doc).
    """
    return f"{file_index}:{line}"


def source_labels(paths: Sequence[str]) -> list[str]:
    """Short, folder-independent names of ``paths`` for the ``source`` feature.

    Each is the file name, with parent folders added only while two paths of the list would
    share the label: ``["/x/a/train.jsonl", "/y/b/train.jsonl"] -> ["a/train.jsonl",
    "b/train.jsonl"]``; ``["/x/a.jsonl"] -> ["a.jsonl"]``.
    """
    parts = [os.path.normpath(p).replace(os.sep, "/").split("/") for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clash = {i for i, a in enumerate(labels) for j, b in enumerate(labels)
                 if i != j and a == b and depth[i] < len(parts[i])}
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def _metadata_feature(row: readers.Row) -> dict[str, str]:
    """``{"metadata": JSON text}`` of the kept columns; ``{}`` when none are kept. Values are
    stored as JSON (non-JSON Parquet types such as dates as their text)."""
    if row.metadata is None:
        return {}
    return {"metadata": json.dumps(row.metadata, ensure_ascii=False, default=str)}


def prepare_dataset(split_files: Mapping[str, Sequence[str]], out_dir: str, name: str, *,
                    policy: str = "error", row_format: records.RowFormat | None = None
                    ) -> tuple[str, records.Policy]:
    """Validates the rows of JSONL / JSONL.gz / Parquet files and writes them as an
    array_record tfds dataset, streaming (memory bounded by tfds's 1 GB record buffer).

    Args:
      split_files: split -> files, globs or folders of shards (see `readers.expand_paths`),
        e.g. ``{"train": ["data/train-*.parquet"], "test": ["test.jsonl"]}``.
      out_dir: tfds data_dir to write into.
      name: dataset name ([a-z0-9_]+), the builder config; re-preparing the same name fails
        unless its folder is removed first (tfds never overwrites a prepared version).
      policy: "error" (stop at the first bad row, naming file:line / file:row N) or "skip"
        (count by reason). A file that cannot be read (`records.BadFile`) stops both.
      row_format: which columns make the conversation and which are kept as metadata;
        default: recognise ``messages`` / ``conversations`` / ``prompt``+``response``.
    Returns:
      ``(dataset_dir, policy)``: the version folder to pass as ``source``, and the policy with
      its skip counts.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r} must match {_NAME_RE.pattern}")
    fmt = row_format or records.RowFormat()
    files = {}
    for split, paths in split_files.items():
        if not paths:
            raise ValueError(f"split {split!r} has no files")
        try:
            files[split] = [os.path.abspath(p) for p in readers.expand_paths(paths)]
        except FileNotFoundError as err:
            raise FileNotFoundError(f"split {split!r}: {err}") from None
        for p in files[split]:  # unreadable shards and missing columns fail before any work
            if policy == "error":
                readers.check_file(p, fmt)
            elif p.endswith(".parquet"):
                readers.open_parquet(p)
    pol = records.Policy(policy)
    builder = JsonlSft(
        split_files=files,
        policy=pol,
        row_format=fmt,
        data_dir=out_dir,
        config=tfds.core.BuilderConfig(name=name, version=VERSION),
        file_format="array_record",
    )
    if os.path.exists(builder.data_dir):
        raise FileExistsError(f"dataset already prepared at {builder.data_dir}; remove it first")
    builder.info.metadata["policy"] = policy
    builder.info.metadata["files"] = files
    builder.info.metadata["row_format"] = fmt.describe()
    try:
        builder.download_and_prepare()
    except AssertionError as err:  # tfds: "No examples were yielded." for an empty split
        if "No examples were yielded" not in str(err):
            raise
        raise ValueError(f"a split of {name!r} has no valid rows; {pol.summary()}") from None
    # The skip counts are known only once every row was read: write the info again with them.
    builder.info.metadata["skipped"] = dict(pol.counts)
    builder.info.write_to_directory(builder.data_dir)
    return builder.data_dir, pol
