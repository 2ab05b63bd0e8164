"""JSONL -> tfds array_record dataset, read back by folder, by catalog name and under mock_data."""
import importlib.util
import json
import os

import pytest
import tensorflow_datasets as tfds
from data_helpers import chat_row, write_jsonl

from qtarget_jax.data import builder, records, sources


class QaToy(tfds.core.GeneratorBasedBuilder):
    """A user's own catalog dataset with other field names (question/answer)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"question": f"q{i}?", "answer": f"a{i}"}


def _conversations(ds):
    n = len(ds)
    pol = records.Policy("error")
    return {w: c for _, w, c in sources.read_conversations(ds, range(n), name="x", policy=pol)}


def test_tensorflow_is_not_installed():
    # The whole pipeline (write + read) runs without TensorFlow; keep the default install so.
    assert importlib.util.find_spec("tensorflow") is None


def test_prepared_dataset_round_trip(prepared):
    path = prepared["path"]
    assert sorted(f for f in os.listdir(path) if "array_record" in f) == [
        "jsonl_sft-test.array_record-00000-of-00001",
        "jsonl_sft-train.array_record-00000-of-00001"]
    for split in ("train", "test"):
        ds = sources.open_split(path, split)
        got = _conversations(ds)
        rows = prepared[split]
        assert len(got) == len(rows)
        by_line = {int(w.rsplit(":", 1)[1]): c for w, c in got.items()}
        for line, row in enumerate(rows, start=1):
            want = records.row_to_conversation(row, "ref")
            assert by_line[line] == want


def test_catalog_name_reads_same_records(prepared):
    ds = sources.open_split("jsonl_sft/tiny", "test", data_dir=prepared["data_dir"])
    assert _conversations(ds) == _conversations(sources.open_split(prepared["path"], "test"))


def test_user_catalog_dataset_with_field_map(tmp_path):
    QaToy(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = sources.open_split("qa_toy", "train", data_dir=str(tmp_path))
    pol = records.Policy("error")
    with pytest.raises(records.BadRow, match=r"qa_toy:train\[0\]: bad_fields"):
        sources.read_conversations(ds, [0], name="qa_toy:train", policy=pol)
    got = sources.read_conversations(ds, range(3), name="qa_toy:train", policy=pol,
                                     field_map={"prompt": "question", "response": "answer"})
    assert sorted(c[0].content for _, _, c in got) == ["q0?", "q1?", "q2?"]


class _OneByOne:
    """Hides ``__getitems__``: tfds 4.9.10's mock source breaks on batched reads."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_mock_data_catalog_route():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = _OneByOne(sources.open_split("qa_toy", "train"))
        pol = records.Policy("skip")  # random mock text may be blank: counted, not silent
        got = sources.read_conversations(ds, range(len(ds)), name="mock", policy=pol,
                                         field_map={"prompt": "question", "response": "answer"})
    assert len(got) + sum(pol.counts.values()) == 6
    assert set(pol.counts) <= {"empty_response"}


def test_prepare_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat_row("a", "b"), '{"prompt": "x"}'])
    with pytest.raises(records.BadRow, match=r"bad\.jsonl:2: bad_fields"):
        builder.prepare_dataset({"train": [path]}, str(tmp_path / "out"), "bad")


def test_prepare_skip_counts_saved_in_metadata(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat_row("a", "b"), "oops", '{"prompt": "x"}',
                                              '{"prompt": "x", "response": ""}'])
    out, pol = builder.prepare_dataset({"train": [path]}, str(tmp_path / "out"), "skipme",
                                       policy="skip")
    assert dict(pol.counts) == {"malformed_json": 1, "bad_fields": 1, "empty_response": 1}
    with open(os.path.join(out, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["skipped"] == dict(pol.counts) and meta["policy"] == "skip"
    assert len(sources.open_split(out, "train")) == 1
    with pytest.raises(FileExistsError, match="already prepared"):
        builder.prepare_dataset({"train": [path]}, str(tmp_path / "out"), "skipme",
                                policy="skip")


@pytest.mark.parametrize("kwargs,err", [
    ({"split_files": {"train": ["/nonexistent.jsonl"]}, "name": "ok"}, FileNotFoundError),
    ({"split_files": {"train": []}, "name": "ok"}, ValueError),
    ({"split_files": {"train": ["x"]}, "name": "Bad-Name"}, ValueError),
])
def test_prepare_argument_errors(tmp_path, kwargs, err):
    with pytest.raises(err):
        builder.prepare_dataset(kwargs["split_files"], str(tmp_path), kwargs["name"])


def test_open_split_errors(prepared, tmp_path):
    with pytest.raises(KeyError, match="no split 'validation'"):
        sources.open_split(prepared["path"], "validation")
    with pytest.raises(FileNotFoundError, match="without dataset_info.json"):
        sources.open_split(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="not a dataset folder"):
        sources.open_split("./missing/folder", "train")
    with pytest.raises(FileNotFoundError, match="not a dataset folder"):
        sources.open_split("data/tfds/jsonl_sft/x/1.0.0", "train")
