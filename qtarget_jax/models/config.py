"""ModelConfig: the one description of a decoder-only Llama-family model.

Covers, by field values: Llama 2 / 3 / 3.1+ (llama3 RoPE scaling), SmolLM2 (Llama with tied
embeddings), Mistral (sliding window), Qwen2 / Qwen2.5 (q/k/v bias), Qwen3 (q/k RMSNorm).

Shapes legend used across models/: B batch, T sequence, S cache length, V vocab, D hidden_size,
H num_heads, K num_kv_heads, G = H // K (queries per kv head), Dh head_dim, F intermediate_size,
L num_layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3.1 style ("rope_type": "llama3") frequency scaling of RoPE."""

    factor: float                            # long wavelengths are divided by this
    low_freq_factor: float                   # wavelengths above orig/low_freq_factor are scaled
    high_freq_factor: float                  # wavelengths below orig/high_freq_factor are kept
    original_max_position_embeddings: int    # context length the model was pretrained with

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ValueError(f"RopeScaling: factor ({self.factor}) and "
                             f"original_max_position_embeddings "
                             f"({self.original_max_position_embeddings}) must be > 0")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"RopeScaling: high_freq_factor ({self.high_freq_factor}) must be "
                             f"> low_freq_factor ({self.low_freq_factor})")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Hyper-parameters of one decoder; frozen and hashable so it can be static under jit."""

    model_type: str                 # one of SUPPORTED_MODEL_TYPES (HF config.json "model_type")
    vocab_size: int                 # V
    hidden_size: int                # D
    intermediate_size: int          # F, SwiGLU hidden dim
    num_layers: int                 # L
    num_heads: int                  # H, query heads
    num_kv_heads: int               # K, key/value heads (grouped-query attention), H % K == 0
    head_dim: int                   # Dh
    rope_theta: float = 10000.0     # RoPE base
    rope_scaling: RopeScaling | None = None   # llama3 scaling; None = plain RoPE
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False         # LM head = embedding transposed
    attention_bias: bool = False    # bias on q/k/v projections (Qwen2), never on o_proj
    qk_norm: bool = False           # RMSNorm over Dh of q and k before RoPE (Qwen3)
    sliding_window: int | None = None         # key at distance >= window is masked; None = off
    max_position_embeddings: int = 8192
    param_dtype: str = "float32"    # storage dtype of parameters, one of DTYPES
    compute_dtype: str = "float32"  # dtype of activations and matmul inputs, one of DTYPES;
    #                                 each param is cast to it once, where a layer uses it
    remat_policy: str = "none"      # per-layer rematerialisation, one of REMAT_POLICIES
    scan_layers: bool = False       # nnx.scan over stacked layers (compile time flat in L)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type={self.model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads ({self.num_heads}) must be divisible by "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim ({self.head_dim}) must be even for RoPE")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"ModelConfig: rope_theta ({self.rope_theta}) and rms_norm_eps "
                             f"({self.rms_norm_eps}) must be > 0")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be a RopeScaling or None, got "
                             f"{self.rope_scaling!r}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"ModelConfig.sliding_window must be a positive int or None, got "
                             f"{self.sliding_window!r}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; "
                                 f"supported: {', '.join(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}; "
                             f"supported: {', '.join(REMAT_POLICIES)}")

    @property
    def q_dim(self) -> int:
        """H * Dh, the width of the query projection."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """K * Dh, the width of each key / value projection."""
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (re-validated)."""
        return dataclasses.replace(self, **changes)

    # ---- presets (published config.json values) -------------------------------------------

    @classmethod
    def smollm2_135m(cls, **override: Any) -> "ModelConfig":
        """HuggingFaceTB/SmolLM2-135M(-Instruct): Llama architecture, tied embeddings."""
        return cls(**{**dict(
            model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192),
            **override})

    @classmethod
    def llama2_7b(cls, **override: Any) -> "ModelConfig":
        """meta-llama/Llama-2-7b-hf."""
        return cls(**{**dict(
            model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
            num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=10000.0,
            rms_norm_eps=1e-5, max_position_embeddings=4096), **override})

    @classmethod
    def llama3_8b(cls, **override: Any) -> "ModelConfig":
        """meta-llama/Meta-Llama-3-8B (no RoPE scaling; see llama31_8b for 3.1)."""
        return cls(**{**dict(
            model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
            rms_norm_eps=1e-5, max_position_embeddings=8192), **override})

    @classmethod
    def llama31_8b(cls, **override: Any) -> "ModelConfig":
        """meta-llama/Llama-3.1-8B: llama3 RoPE scaling, 128k context."""
        return cls.llama3_8b(**{**dict(
            rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=131072),
            **override})

    @classmethod
    def llama32_1b(cls, **override: Any) -> "ModelConfig":
        """meta-llama/Llama-3.2-1B: llama3 RoPE scaling (factor 32), tied embeddings."""
        return cls(**{**dict(
            model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
            num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
            rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
            tie_word_embeddings=True, max_position_embeddings=131072), **override})

    @classmethod
    def mistral_7b(cls, **override: Any) -> "ModelConfig":
        """mistralai/Mistral-7B-v0.1: sliding-window attention (4096)."""
        return cls(**{**dict(
            model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=10000.0,
            rms_norm_eps=1e-5, sliding_window=4096, max_position_embeddings=32768),
            **override})

    @classmethod
    def qwen25_7b(cls, **override: Any) -> "ModelConfig":
        """Qwen/Qwen2.5-7B-Instruct: q/k/v bias."""
        return cls(**{**dict(
            model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
            num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
            rms_norm_eps=1e-6, attention_bias=True, max_position_embeddings=32768),
            **override})

    @classmethod
    def qwen25_math_1_5b(cls, **override: Any) -> "ModelConfig":
        """Qwen/Qwen2.5-Math-1.5B(-Instruct): q/k/v bias, tied embeddings, 4k context."""
        return cls(**{**dict(
            model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
            num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=10000.0,
            rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True,
            max_position_embeddings=4096), **override})

    @classmethod
    def qwen25_math_7b(cls, **override: Any) -> "ModelConfig":
        """Qwen/Qwen2.5-Math-7B(-Instruct): the 1.5B's tokenizer, 152064 head rows, 4k context."""
        return cls.qwen25_7b(**{**dict(rope_theta=10000.0, max_position_embeddings=4096),
                                **override})

    @classmethod
    def qwen3_0_6b(cls, **override: Any) -> "ModelConfig":
        """Qwen/Qwen3-0.6B: q/k RMSNorm, tied embeddings, head_dim 128 != D / H."""
        return cls(**{**dict(
            model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
            num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
            rms_norm_eps=1e-6, qk_norm=True, tie_word_embeddings=True,
            max_position_embeddings=40960), **override})

    # ---- Hugging Face config.json ---------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **override: Any) -> "ModelConfig":
        """Maps a HF config.json dict (transformers 4.x or 5.x layout) to a ModelConfig.

        Raises ValueError naming the key and value for anything this decoder cannot run
        exactly (unsupported model_type, rope_type, activation, o_proj/MLP bias, Qwen layer-wise
        sliding windows) rather than silently running a different model.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json model_type={model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"config.json ({model_type}) is missing required key {key!r}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
        if hf.get("mlp_bias", False):
            raise ValueError("config.json mlp_bias=True is not supported")
        attention_bias = model_type == "qwen2"
        if model_type != "qwen2" and hf.get("attention_bias", False):
            raise ValueError(f"config.json attention_bias=True for {model_type} (bias on o_proj "
                             f"too) is not supported; only qwen2 q/k/v bias is")
        sliding_window = None
        if model_type == "mistral":
            sliding_window = hf.get("sliding_window")
        elif hf.get("use_sliding_window", False):
            raise ValueError(f"config.json use_sliding_window=True for {model_type} (layer-wise "
                             f"windows) is not supported")
        theta, scaling = _rope_from_hf(hf)
        heads = hf["num_attention_heads"]
        fields = dict(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=theta,
            rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias, qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            max_position_embeddings=hf.get("max_position_embeddings", 8192))
        return cls(**{**fields, **override})

    def to_hf_config(self) -> dict[str, Any]:
        """The HF config.json dict (transformers 5 layout, `rope_parameters`) of this model."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        hf: dict[str, Any] = dict(
            architectures=[_ARCHITECTURES[self.model_type]], model_type=self.model_type,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, hidden_act="silu", rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rope_parameters=rope,
            dtype=self.param_dtype)
        if self.model_type in ("llama", "qwen3"):
            hf.update(attention_bias=False)
        if self.model_type == "llama":
            hf.update(mlp_bias=False)
        if self.model_type == "mistral":
            hf.update(sliding_window=self.sliding_window)
        if self.model_type in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=False)
        return hf


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling|None) from `rope_parameters` (v5) or `rope_theta`+`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"config.json rope_type={rope_type!r} is not supported; "
                         f"supported: default, llama3")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k not in params]
    if missing:
        raise ValueError(f"config.json llama3 rope scaling is missing keys {missing}")
    return float(theta), RopeScaling(
        factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]))
