"""Export to a Hugging Face folder: how a model leaves this stack to be served elsewhere.

`export_hf(model, cfg, folder, tokenizer=...)` writes what `transformers`
`AutoModelForCausalLM.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)` read:

    folder/
      model.safetensors            (or model-0000k-of-0000n.safetensors + .index.json when big)
      config.json                  ModelConfig.to_hf_config() + the tokenizer's special token ids
      generation_config.json       bos / eos / pad token ids
      tokenizer.json, tokenizer_config.json, chat_template.jinja   (when a tokenizer is given)

Tensors are written in the parameters' own dtype, byte for byte (`params.export_params`), so a
Hugging Face folder loaded with `load_hf` and exported again has bit-identical tensors.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from qtarget_jax.models import hf_io
from qtarget_jax.models.config import ModelConfig
from qtarget_jax.models.params import export_params


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """{'bos_token_id', 'eos_token_id', 'pad_token_id'} of a transformers tokenizer, where set."""
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            out[key] = int(value)
    return out


def write_hf_folder(tensors: Mapping[str, np.ndarray], hf_config: Mapping[str, Any], folder: str,
                    *, tokenizer: Any = None,
                    max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write HF-named `tensors`, `hf_config` and optionally `tokenizer` into `folder`.

    Args:
      tensors: Hugging Face name -> array in HF layout (e.g. q_proj.weight [H*Dh, D]).
      hf_config: the `config.json` dict; token ids from `tokenizer` are added when missing.
      folder: created if needed; existing weight files of another layout are an error.
      tokenizer: a transformers tokenizer (saved with its chat template), or None.
    Returns:
      The file names written.
    """
    os.makedirs(folder, exist_ok=True)
    stale = [f for f in os.listdir(folder)
             if f.endswith(".safetensors") or f == hf_io.SAFETENSORS_INDEX]
    if stale:
        raise FileExistsError(f"{folder}: already holds weights {sorted(stale)}; export into an "
                              "empty folder")
    config = dict(hf_config)
    ids = special_token_ids(tokenizer) if tokenizer is not None else {}
    for key, value in ids.items():
        config.setdefault(key, value)
    files = hf_io.write_safetensors(tensors, folder, max_shard_bytes=max_shard_bytes)
    hf_io.write_json(config, os.path.join(folder, hf_io.CONFIG_FILE))
    hf_io.write_json(hf_io.generation_config_from_hf_config(config),
                     os.path.join(folder, hf_io.GENERATION_CONFIG_FILE))
    files += [hf_io.CONFIG_FILE, hf_io.GENERATION_CONFIG_FILE]
    if tokenizer is not None:
        files += [os.path.basename(f) for f in tokenizer.save_pretrained(folder)]
    return files


def export_hf(model: Any, cfg: ModelConfig, folder: str, *, tokenizer: Any = None,
              hf_config: Mapping[str, Any] | None = None,
              max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Save `model` (a `Decoder`) as a Hugging Face folder that transformers loads.

    Args:
      model: the Decoder; its params are gathered to host (sharded arrays included).
      cfg: its ModelConfig, written as `config.json` via `cfg.to_hf_config()`.
      folder: target folder (must hold no weights yet).
      tokenizer: transformers tokenizer to save alongside (with its chat template), or None.
      hf_config: extra `config.json` keys (e.g. the source's `bos_token_id`), overriding.
      max_shard_bytes: above this total the weights are split into shards plus an index.
    Returns:
      The file names written.
    """
    config = {**cfg.to_hf_config(), **(hf_config or {})}
    return write_hf_folder(export_params(model, cfg), config, folder, tokenizer=tokenizer,
                           max_shard_bytes=max_shard_bytes)
