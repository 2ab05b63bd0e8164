"""Session fixtures for tests/data (a tiny in-memory tokenizer; no files, no network)."""
import pytest
from data_helpers import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A small prepared dataset (train 40 rows of varied lengths, test 7) and its JSONL rows."""
    from data_helpers import chat_row, write_jsonl

    from qtarget_jax.data import builder

    root = tmp_path_factory.mktemp("ds")
    train = [chat_row(f"What is {i} + {i % 7}?", " ".join(["1 +"] * (i % 9)) + f" = {i}\n#### {i}")
             for i in range(40)]
    test = [{"prompt": f"What is {i} + 2?", "response": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
            for i in range(7)]
    files = {"train": [write_jsonl(root / "train.jsonl", train)],
             "test": [write_jsonl(root / "test.jsonl", test)]}
    path, _ = builder.prepare_dataset(files, str(root / "tfds"), "tiny")
    return {"path": path, "train": train, "test": test, "data_dir": str(root / "tfds")}
