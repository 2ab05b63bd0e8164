"""fp32 logits of our Decoder vs transformers' torch implementation, per family.

Each tiny random HF model's state_dict goes through load_params; logits must agree within
1e-4 relative (max abs error / max abs logit) on random ids, with right padding and with packed
segments (each packed segment is compared with the HF model run on that example alone).
"""
import numpy as np
import pytest
from flax import nnx

from model_helpers import FAMILIES, assert_rel_close, hf_logits, hf_model, state_dict, \
    tiny_config
from qtarget_jax.models import ModelConfig
from qtarget_jax.models.params import DictSource, load_params

T = 12


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    """(cfg, torch reference, jitted forward(tokens, positions, segment_ids) of ours)."""
    cfg = tiny_config(request.param)
    ref = hf_model(cfg, seed=len(request.param))
    ours = load_params(cfg, DictSource(state_dict(ref)))
    forward = nnx.jit(lambda model, t, p, s: model(t, p, s))
    return cfg, ref, lambda t, p, s: np.asarray(forward(ours, t, p, s))


def test_hf_config_round_trip(pair):
    cfg, ref, _ = pair
    assert ModelConfig.from_hf_config(ref.config.to_dict()) == cfg


def test_logits_match(pair):
    cfg, ref, forward = pair
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T))
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    got = forward(tokens, positions, np.ones((2, T), np.int32))
    assert got.dtype == np.float32
    assert_rel_close(got, hf_logits(ref, tokens), msg=cfg.model_type)


def test_packed_and_padded(pair):
    """Row 0: two packed examples then padding; row 1: one example right-padded to T."""
    cfg, ref, forward = pair
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, T))
    examples = [(0, 0, 5), (0, 5, 10), (1, 0, 7)]   # (row, start, end)
    segments = np.zeros((2, T), np.int32)
    positions = np.zeros((2, T), np.int32)
    for seg, (row, start, end) in enumerate(examples, start=1):
        segments[row, start:end] = seg
        positions[row, start:end] = np.arange(end - start)
    got = forward(tokens, positions, segments)
    assert np.isfinite(got).all(), "padding produced non-finite logits"
    for row, start, end in examples:
        want = hf_logits(ref, tokens[row:row + 1, start:end])
        assert_rel_close(got[row:row + 1, start:end], want, msg=f"row {row} [{start}:{end}]")
    # HF given the padding as its own attention_mask agrees on row 1's real tokens.
    want_masked = hf_logits(ref, tokens, attention_mask=(segments > 0).astype(np.int32))
    assert_rel_close(got[1, :7], want_masked[1, :7], msg="HF attention_mask")
