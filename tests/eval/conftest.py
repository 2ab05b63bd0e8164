"""Fixtures for the generate/evaluate/lens tests: a tiny random decoder and the tiny byte-level
tokenizer of tests/models/io_helpers.py (reused, so both test folders share one chat template)."""
import os
import sys

import jax
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))

from io_helpers import make_tokenizer  # noqa: E402

from qtarget_jax.models import Decoder, ModelConfig  # noqa: E402

TINY = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
            num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """The tiny decoder's ModelConfig fields (a copy: tests override some)."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    """A random tiny decoder; matrices scaled x10 (std 0.2) so greedy outputs vary by position."""
    model = Decoder(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, params))
    return model
