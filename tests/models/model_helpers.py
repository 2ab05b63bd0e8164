"""Test-only builders for the decoder tests: tiny ModelConfigs of each family and the matching
transformers (torch, fp32, eager attention) reference model with random weights.
torch is the independent reference here and nowhere in qtarget_jax/.
"""
from __future__ import annotations

import numpy as np

from qtarget_jax.models import ModelConfig, RopeScaling

# family name -> fields that differ from the tiny base; one per thing the config must cover.
FAMILIES = {
    "llama3_rope_scaling": dict(model_type="llama", rope_theta=10000.0,
                                rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
    "smollm2_tied": dict(model_type="llama", tie_word_embeddings=True, rms_norm_eps=1e-5),
    "mistral_window": dict(model_type="mistral", sliding_window=4),
    "qwen2_bias": dict(model_type="qwen2", attention_bias=True, rope_theta=1e6),
    "qwen3_qk_norm": dict(model_type="qwen3", qk_norm=True, tie_word_embeddings=True,
                          head_dim=16),
}
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def tiny_config(family: str, **override) -> ModelConfig:
    return ModelConfig(**{**TINY, **FAMILIES[family], **override})


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers CausalLM built from cfg.to_hf_config(), all weights random (norms ~1)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(cfg.to_hf_config())
    hf_cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None,
              attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Reference logits [B, T, V] float32 from the torch model."""
    import torch

    kwargs = {}
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(positions, dtype=torch.long)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long), use_cache=False,
                    **kwargs)
    return out.logits.float().numpy()


def assert_rel_close(got, want, rel: float = 1e-4, msg: str = "") -> None:
    """max |got - want| <= rel * max |want| (the issue's "1e-4 relative")."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{msg}: shapes {got.shape} vs {want.shape}"
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err <= rel, f"{msg}: relative error {err:.3e} > {rel:.0e}"


def random_hf_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named fp32 weights for cfg (norm scales near 1, others N(0, 0.2^2))."""
    from qtarget_jax.models.params import expected_hf_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_hf_shapes(cfg).items():
        noise = 0.2 * rng.standard_normal(shape).astype(np.float32)
        out[name] = (1.0 + noise) if name.endswith("norm.weight") else noise
    return out


def random_model(cfg: ModelConfig, seed: int = 0):
    """A Decoder with random_hf_weights, built via load_params (much cheaper than an eager
    Decoder init, which compiles one random op per parameter shape)."""
    from qtarget_jax.models.params import DictSource, load_params

    return load_params(cfg, DictSource(random_hf_weights(cfg, seed)))
