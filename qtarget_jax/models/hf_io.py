"""Hugging Face checkpoint folders: lazy safetensors reads, config.json, and writing them back.

A folder holds either one `model.safetensors` or shards listed in `model.safetensors.index.json`
(`weight_map`: tensor name -> shard file). Tensors keep their Hugging Face names and layouts here
(e.g. `model.layers.0.self_attn.q_proj.weight` is [out, in] = [H*Dh, D]); mapping them onto our
parameters is `params.load_params`' job.

Pickle checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`) can run arbitrary code when loaded and
are refused unless the caller passes `allow_pickle=True`; even then they are read with
`torch.load(weights_only=True)`, and torch is imported only on that path.

Every source here follows the `TensorSource` protocol of `params.py`: `keys()`, `shape(name)`,
`read(name) -> np.ndarray`; `SafetensorsSource.read_slice(name, index)` reads only part of a
tensor, which `load_params` uses to give each device shard only its slice.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"
# transformers' own default shard size; a 135M model in float32 (~0.5 GB) stays in one file.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as asked; the message names the file."""


def _pickle_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e


def read_hf_config(folder: str) -> dict[str, Any]:
    """The `config.json` of a Hugging Face folder as a dict (never runs remote code)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; a Hugging Face model folder needs one")
    return _read_json(path)


class SafetensorsSource:
    """Lazy reader of the safetensors weights in a Hugging Face folder.

    Args:
      folder: holds `model.safetensors`, or shards plus `model.safetensors.index.json`.

    Each shard is opened once (memory-mapped) on first use; `read` copies one tensor out, in the
    dtype it is stored in (bfloat16 comes back as `ml_dtypes.bfloat16`).
    """

    def __init__(self, folder: str) -> None:
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: not a directory")
        self.folder = folder
        self._handles: dict[str, Any] = {}
        index_path = os.path.join(folder, SAFETENSORS_INDEX)
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
            missing = sorted({f for f in weight_map.values()
                              if not os.path.isfile(os.path.join(folder, f))})
            if missing:
                raise CheckpointError(
                    f"{index_path}: {len(missing)} shard file(s) listed but not in the folder: "
                    f"{missing}")
            self._file_of: dict[str, str] = dict(weight_map)
        elif os.path.isfile(os.path.join(folder, SAFETENSORS_FILE)):
            with safe_open(os.path.join(folder, SAFETENSORS_FILE), framework="numpy") as f:
                self._file_of = {k: SAFETENSORS_FILE for k in f.keys()}
        else:
            pickles = _pickle_files(folder)
            hint = (f" It holds pickle checkpoint(s) {pickles}, which can run code when loaded: "
                    "pass allow_pickle=True to read them with torch.load(weights_only=True), or "
                    "convert them to safetensors." if pickles else "")
            raise CheckpointError(
                f"{folder}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} found.{hint}")

    def _handle(self, name: str) -> Any:
        if name not in self._file_of:
            raise KeyError(f"{self.folder}: no tensor named {name!r}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.folder, file), framework="numpy")
        return self._handles[file]

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        """The whole tensor `name`, in its stored dtype and Hugging Face layout."""
        return self._handle(name).get_tensor(name)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only `tensor[index]`, read from the memory map without loading the rest."""
        return self._handle(name).get_slice(name)[index]


class PickleSource:
    """Reader of `pytorch_model*.bin` / `*.pt` / `*.pth` files (opt-in: pickle can run code).

    Loads every file with `torch.load(weights_only=True, mmap=True)`; torch is imported here only.
    """

    def __init__(self, folder: str) -> None:
        import torch  # Only this opt-in path needs torch.

        self.folder = folder
        index_path = os.path.join(folder, PICKLE_INDEX)
        if os.path.isfile(index_path):
            files = sorted(set(_read_json(index_path)["weight_map"].values()))
        else:
            files = _pickle_files(folder)
        if not files:
            raise CheckpointError(f"{folder}: no pickle checkpoint ({PICKLE_SUFFIXES}) found")
        self._tensors: dict[str, Any] = {}
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path}: shard file {file!r} not in the folder")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
            self._tensors.update(state)

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        import torch

        t = self._tensors[name].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy().copy()


def open_hf_weights(folder: str, *, allow_pickle: bool = False) -> SafetensorsSource | PickleSource:
    """The weights of a Hugging Face folder: safetensors, or pickle only when allowed."""
    has_safetensors = any(os.path.isfile(os.path.join(folder, f))
                          for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX))
    if not has_safetensors and allow_pickle and os.path.isdir(folder) and _pickle_files(folder):
        return PickleSource(folder)
    return SafetensorsSource(folder)


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _save(arrays: Mapping[str, np.ndarray], path: str) -> None:
    # transformers expects the "format" tag; safetensors creates files 0600, so apply the umask.
    save_file(dict(arrays), path, metadata={"format": "pt"})
    os.chmod(path, _default_file_mode())


def _shard_groups(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        n = tensors[name].nbytes
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def write_safetensors(tensors: Mapping[str, np.ndarray], folder: str, *,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors` (HF name -> array, any shape/dtype) as safetensors; returns the file names.

    One `model.safetensors` when the total fits in `max_shard_bytes`, else
    `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`, as
    transformers writes them. Arrays are written byte for byte, in their own dtype.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    os.makedirs(folder, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    groups = _shard_groups(arrays, max_shard_bytes)
    if len(groups) == 1:
        _save(arrays, os.path.join(folder, SAFETENSORS_FILE))
        return [SAFETENSORS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for file, group in zip(names, groups):
        _save({k: arrays[k] for k in group}, os.path.join(folder, file))
        weight_map.update({k: file for k in group})
    index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return names + [SAFETENSORS_INDEX]


def write_json(obj: Mapping[str, Any], path: str) -> None:
    """Write `obj` as indented, key-sorted JSON (how transformers writes config files)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def generation_config_from_hf_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """A minimal `generation_config.json`: the special token ids of `hf_config`, when set."""
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            out[key] = hf_config[key]
    return out
