"""Fixtures of the experiment tests."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from experiment_helpers import export_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    """The tiny random decoder and tokenizer as an HF folder (experiment_helpers.export_tiny)."""
    return export_tiny(str(tmp_path_factory.mktemp("tiny_hf")))
