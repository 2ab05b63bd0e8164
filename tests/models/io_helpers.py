"""Test-only builders for the checkpoint I/O tests: tiny random Hugging Face folders made with
transformers (torch) `save_pretrained`, a tiny byte-level tokenizer with a chat template, and a
tiny llama GGUF written with `gguf.GGUFWriter`. torch is the reference here and nowhere else.
"""
from __future__ import annotations

import gguf
import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)


def make_torch_model(kind: str, *, tie: bool = False, seed: int = 0, dtype=None):
    """A tiny random transformers CausalLM (`kind` 'qwen3' or 'llama'), eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, tie_word_embeddings=tie))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie, rope_theta=1e4))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    with torch.no_grad():  # Norm weights start at 1.0; randomise so a swap would show.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab() -> list[str]:
    """128 tokens: 3 specials, 124 byte-level characters (ASCII first), and the merge 'ab'."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())[:124]
    assert "a" in chars and "b" in chars
    return SPECIAL + chars + ["ab"]


def make_tokenizer():
    """A tiny byte-level BPE tokenizer (vocab 128, one merge) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tiny_vocab())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_hf_folder(path: str, kind: str = "qwen3", *, tie: bool = False,
                   max_shard_size: str | None = None, with_tokenizer: bool = True, dtype=None):
    """Write a tiny random model (and tokenizer) to `path`; returns the torch model."""
    model = make_torch_model(kind, tie=tie, dtype=dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if with_tokenizer:
        make_tokenizer().save_pretrained(path)
    return model


def torch_state(model) -> dict[str, np.ndarray]:
    """The model's saved tensors as numpy (bfloat16 kept bit for bit via ml_dtypes)."""
    import ml_dtypes
    import torch

    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        out[k] = (v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                  if v.dtype == torch.bfloat16 else v.numpy())
    return out


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp `convert_hf_to_gguf.py` LlamaModel.permute: HF rows -> interleaved rotary rows."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def to_gguf_name(name: str) -> str:
    """HF name -> llama.cpp name, written out independently of `gguf_io._NAME_RULES`."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def write_tiny_gguf(path: str, state: dict[str, np.ndarray], *, quant=None,
                    architecture: str = "llama", tokenizer: bool = False) -> dict[str, str]:
    """Write HF-named float32 `state` as a llama.cpp-style GGUF; returns HF name -> GGML type.

    2-D matrices whose row length is a multiple of 32 are stored as `quant` (e.g. Q8_0) when
    given, everything else as F32. q/k rows are permuted as llama.cpp does for `llama`.
    With `tokenizer`, the `tiny_vocab` tokenizer and chat template go into the metadata.
    """
    w = gguf.GGUFWriter(path, architecture)
    c = TINY
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c["vocab_size"])
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    w.add_pad_token_id(c["pad_token_id"])
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tiny_vocab())
        w.add_token_types([3 if t in SPECIAL else 1 for t in tiny_vocab()])
        w.add_token_merges(["a b"])
        w.add_unk_token_id(0)
        w.add_chat_template(CHAT_TEMPLATE)
    types = {}
    for name, value in state.items():
        value = np.asarray(value, np.float32)
        if architecture == "llama" and name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, c["num_attention_heads"])
        elif architecture == "llama" and name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, c["num_key_value_heads"])
        if quant is not None and value.ndim == 2 and value.shape[1] % 32 == 0:
            data = gguf.quants.quantize(value, quant)
            w.add_tensor(to_gguf_name(name), data, raw_dtype=quant)
            types[name] = quant.name
        else:
            w.add_tensor(to_gguf_name(name), value)
            types[name] = "F32"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types
