"""Hugging Face folder I/O against transformers' own files: lazy reads, shards, pickle refusal."""
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from io_helpers import make_hf_folder, torch_state
from qtarget_jax.models import hf_io
from qtarget_jax.models.hf_io import CheckpointError, SafetensorsSource


@pytest.mark.parametrize("kind,shard", [("qwen3", None), ("llama", "20KB")])
def test_reads_equal_torch_state(tmp_path, kind, shard):
    model = make_hf_folder(str(tmp_path), kind, max_shard_size=shard, with_tokenizer=False)
    if shard:
        assert os.path.isfile(tmp_path / hf_io.SAFETENSORS_INDEX)
    src = SafetensorsSource(str(tmp_path))
    ref = torch_state(model)
    assert src.keys() == sorted(ref)
    for name, want in ref.items():
        got = src.read(name)
        assert src.shape(name) == want.shape
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    name = "model.layers.1.mlp.down_proj.weight"  # [D, F]
    np.testing.assert_array_equal(src.read_slice(name, (slice(8, 16), slice(None))),
                                  ref[name][8:16])


def test_bfloat16_bit_exact_and_rewrite_round_trip(tmp_path):
    import torch

    model = make_hf_folder(str(tmp_path / "in"), "qwen3", with_tokenizer=False,
                           dtype=torch.bfloat16)
    src = SafetensorsSource(str(tmp_path / "in"))
    tensors = {k: src.read(k) for k in src.keys()}
    assert tensors["model.norm.weight"].dtype == ml_dtypes.bfloat16
    files = hf_io.write_safetensors(tensors, str(tmp_path / "out"), max_shard_bytes=4096)
    assert hf_io.SAFETENSORS_INDEX in files and len(files) > 3
    back = SafetensorsSource(str(tmp_path / "out"))
    assert back.keys() == src.keys()
    for k in src.keys():
        a, b = tensors[k], back.read(k)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), k
    ref = torch_state(model)
    assert all(ref[k].tobytes() == tensors[k].tobytes() for k in ref)


def test_missing_shard_file_is_named(tmp_path):
    make_hf_folder(str(tmp_path), "llama", max_shard_size="20KB", with_tokenizer=False)
    index = json.loads((tmp_path / hf_io.SAFETENSORS_INDEX).read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / gone)
    with pytest.raises(CheckpointError, match=gone):
        SafetensorsSource(str(tmp_path))


def test_pickle_refused_unless_opted_in(tmp_path):
    import torch

    model = make_hf_folder(str(tmp_path), "llama", with_tokenizer=False)
    os.remove(tmp_path / hf_io.SAFETENSORS_FILE)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        hf_io.open_hf_weights(str(tmp_path))
    src = hf_io.open_hf_weights(str(tmp_path), allow_pickle=True)
    assert isinstance(src, hf_io.PickleSource)
    ref = torch_state(model)
    assert src.keys() == sorted(ref)
    assert all(np.array_equal(src.read(k), ref[k]) for k in ref)


def test_no_weights_and_no_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        SafetensorsSource(str(tmp_path))
    with pytest.raises(CheckpointError, match="no config.json"):
        hf_io.read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        hf_io.read_hf_config(str(tmp_path))


def test_reading_needs_no_torch(tmp_path):
    make_hf_folder(str(tmp_path), "qwen3", max_shard_size="20KB")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from qtarget_jax.models.hf_io import SafetensorsSource, read_hf_config\n"
        "from qtarget_jax.models.tokenizer import load_tokenizer\n"
        f"src = SafetensorsSource({str(tmp_path)!r})\n"
        "x = src.read('model.embed_tokens.weight')\n"
        f"tok = load_tokenizer({str(tmp_path)!r})\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)\n"
        f"print(x.shape, read_hf_config({str(tmp_path)!r})['model_type'], ids.count('im_start'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["(128,", "32)", "qwen3", "1"], out.stdout
