"""Decoder-only Llama-family models in Flax NNX: config, layers, decoder, cache, sharding, params.

File formats (safetensors, GGUF, tokenizers) live in hf_io.py / gguf_io.py / export.py /
loading.py and build on `params.load_params` / `params.export_params`.
"""
from qtarget_jax.models.cache import KVCache, init_cache
from qtarget_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from qtarget_jax.models.decoder import Decoder
from qtarget_jax.models.params import DictSource, TensorSource, export_params, load_params
from qtarget_jax.models.sharding import LOGICAL_RULES, param_shardings, shard_model

__all__ = ["Decoder", "DictSource", "KVCache", "LOGICAL_RULES", "ModelConfig", "RopeScaling",
           "SUPPORTED_MODEL_TYPES", "TensorSource", "export_params", "init_cache",
           "load_params", "param_shardings", "shard_model"]
