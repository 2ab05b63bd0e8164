"""Batched KV-cache decoding on the training model (decode.py), the sampling rule
(sampling.py), token streaming for one prompt (stream.py) and the chat CLI
(`python -m qtarget_jax.generate`, __main__.py; docs/evaluation.md)."""
from qtarget_jax.generate.decode import (Generation, Prompt, decode, forward_one, generate,
                                         generate_many, left_pad, prefill, prompt_ids)
from qtarget_jax.generate.sampling import (SamplingConfig, argmax_last, inverse_cdf, row_keys,
                                           sample_logits)

__all__ = ["Generation", "Prompt", "SamplingConfig", "argmax_last", "decode", "forward_one",
           "generate", "generate_many", "inverse_cdf", "left_pad", "prefill", "prompt_ids",
           "row_keys", "sample_logits"]
