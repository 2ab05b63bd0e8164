"""Decoder-only Llama-family models in Flax NNX: config, layers, decoder, cache, sharding, params."""
from qtarget_jax.models.cache import KVCache, init_cache
from qtarget_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from qtarget_jax.models.decoder import Decoder

__all__ = ["Decoder", "KVCache", "ModelConfig", "RopeScaling", "SUPPORTED_MODEL_TYPES",
           "init_cache"]
