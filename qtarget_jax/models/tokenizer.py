"""Tokenizers (with chat templates) from a Hugging Face folder or a GGUF file, without torch.

A folder's tokenizer is loaded with `AutoTokenizer.from_pretrained(folder,
trust_remote_code=False)`. A GGUF stores its tokenizer as metadata (`tokenizer.ggml.tokens`,
`.merges`, `.token_type`, special ids, `tokenizer.chat_template`). transformers'
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` reads that through a GGUF reader that imports
torch, so here the metadata is read with the `gguf` package and handed to transformers' own
converter (`convert_gguf_tokenizer`): the same tokenizer, with no torch on the path
(`tests/models/test_io_gguf.py` checks it against the transformers path).
"""
from __future__ import annotations

import os
from typing import Any

import gguf

from qtarget_jax.models.gguf_io import field_value

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# GGUF special-token metadata -> tokenizer attribute (transformers' `_SPECIAL_TOKENS`).
_GGUF_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                 "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def has_tokenizer(folder: str) -> bool:
    """Whether `folder` holds tokenizer files (`tokenizer.json` / `_config.json` / `.model`)."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def load_tokenizer(folder: str) -> Any:
    """The tokenizer saved in Hugging Face folder `folder` (never runs remote code)."""
    if not has_tokenizer(folder):
        raise FileNotFoundError(f"{folder}: no tokenizer files (looked for {TOKENIZER_FILES})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def tokenizer_from_gguf(path: str, reader: gguf.GGUFReader | None = None) -> Any:
    """The tokenizer and chat template stored in GGUF file `path`, as a transformers tokenizer.

    Mirrors `transformers...gguf_tokenizer_mapping.get_gguf_tokenizer` (which needs torch), reading
    the metadata with `gguf.GGUFReader` instead. Pass `reader` (already open on `path`, e.g.
    `GGUFSource.reader`) to skip parsing the file again (seconds for a 49k-token vocabulary).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    reader = gguf.GGUFReader(path) if reader is None else reader
    architecture = field_value(reader, "general.architecture")
    grouped: dict[str, dict[str, Any]] = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        grouped[group] = {}
        for key, name in renames.items():
            value = field_value(reader, f"tokenizer.{key}")
            if value is not None:
                grouped[group][name] = value
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens metadata; the file has no tokenizer")
    if tokenizer_dict.get("tokenizer_type") not in ("gpt2",):
        # Only byte-level BPE (SmolLM2, Llama 3, Qwen) is checked against transformers here.
        raise ValueError(f"{path}: tokenizer.ggml.model={tokenizer_dict.get('tokenizer_type')!r} "
                         "is not supported; only 'gpt2' (byte-level BPE)")
    for name, key in _GGUF_SPECIAL.items():
        token_id = field_value(reader, f"tokenizer.ggml.{key}")
        tokenizer_config[name] = None if token_id is None else tokenizer_dict["tokens"][token_id]
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return TokenizersBackend(tokenizer_object=backend, **tokenizer_config, **extra)
