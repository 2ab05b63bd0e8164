"""ModelConfig: presets, HF config.json mapping both ways, and clear errors on bad input."""
import pytest

from qtarget_jax.models import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling

PRESETS = ["smollm2_135m", "llama2_7b", "llama3_8b", "llama31_8b", "llama32_1b", "mistral_7b",
           "qwen25_7b", "qwen3_0_6b"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_hf_config(name):
    cfg = getattr(ModelConfig, name)()
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    hash(cfg)  # static under jit


def test_preset_override():
    cfg = ModelConfig.smollm2_135m(num_layers=2, compute_dtype="bfloat16", scan_layers=True)
    assert (cfg.num_layers, cfg.compute_dtype, cfg.scan_layers, cfg.hidden_size) == (
        2, "bfloat16", True, 576)


def test_from_hf_config_transformers4_layout():
    """Real Llama-3.2-1B config.json keys (transformers 4: rope_theta + rope_scaling)."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
          "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
          "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
          "rope_theta": 500000.0, "tie_word_embeddings": True, "attention_bias": False,
          "mlp_bias": False, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                                              "low_freq_factor": 1.0,
                                              "original_max_position_embeddings": 8192,
                                              "rope_type": "llama3"}}
    assert ModelConfig.from_hf_config(hf) == ModelConfig.llama32_1b()


def test_from_hf_config_defaults_head_dim_and_kv_heads():
    hf = {"model_type": "mistral", "vocab_size": 10, "hidden_size": 64,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
          "sliding_window": None}
    cfg = ModelConfig.from_hf_config(hf)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.sliding_window) == (16, 4, None)


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf_config({"model_type": "gemma2"})
    assert "'gemma2'" in str(err.value)
    for name in SUPPORTED_MODEL_TYPES:
        assert name in str(err.value)


@pytest.mark.parametrize("change,needle", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "qwen3", "use_sliding_window": True}, "use_sliding_window"),
])
def test_unsupported_hf_features_raise(change, needle):
    hf = {**ModelConfig.llama3_8b().to_hf_config(), **change}
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf_config(hf)


def test_missing_hf_key_named():
    hf = ModelConfig.qwen25_7b().to_hf_config()
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match="'intermediate_size'"):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "gpt2"}, "supported: llama, mistral, qwen2, qwen3"),
    ({"num_heads": 6, "num_kv_heads": 4}, r"num_heads \(6\) must be divisible by num_kv_heads"),
    ({"head_dim": 7}, r"head_dim \(7\) must be even"),
    ({"hidden_size": 0}, "hidden_size must be a positive int, got 0"),
    ({"compute_dtype": "float16"}, "compute_dtype='float16'"),
    ({"param_dtype": "float16"}, "param_dtype='float16'"),
    ({"remat_policy": "everything"}, "remat_policy='everything'"),
    ({"sliding_window": 0}, "sliding_window must be a positive int"),
])
def test_bad_config_values_raise(change, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.smollm2_135m(**change)


def test_bad_rope_scaling_raises():
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling(8.0, 4.0, 1.0, 8192)
