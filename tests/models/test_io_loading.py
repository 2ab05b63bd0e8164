"""load_hf / load_gguf / load_model / export_hf on tiny random models, against transformers torch.

Reference = the transformers (torch) model that wrote the folder; HF -> ours -> HF is checked
byte for byte.
"""
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from io_helpers import (CHAT_TEMPLATE, make_hf_folder, make_torch_model, torch_state,
                        write_tiny_gguf)
from qtarget_jax.models import hf_io
from qtarget_jax.models.export import export_hf
from qtarget_jax.models.loading import load_gguf, load_hf, load_model
from qtarget_jax.models.tokenizer import tokenizer_from_gguf

TOKENS = np.array([[1, 5, 9, 20, 33, 7, 2, 100, 127, 0], [3, 3, 4, 60, 61, 62, 90, 91, 2, 1]],
                  np.int32)
TEXTS = ["ab abab  b!", "hello\n\nworld", "<|im_start|>user\nxy<|im_end|>"]


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("kind,tie,shard", [("qwen3", False, "20KB"), ("llama", True, None)])
def test_load_hf_matches_torch(tmp_path, kind, tie, shard):
    ref = make_hf_folder(str(tmp_path), kind, tie=tie, max_shard_size=shard)
    model, cfg, tok = load_hf(str(tmp_path))
    assert cfg.model_type == kind and cfg.tie_word_embeddings == tie
    np.testing.assert_allclose(np.asarray(model(TOKENS)), torch_logits(ref), atol=2e-5, rtol=0)
    assert tok.chat_template == CHAT_TEMPLATE


def test_load_hf_into_mesh(tmp_path):
    ref = make_hf_folder(str(tmp_path), "qwen3", max_shard_size="20KB", with_tokenizer=False)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    model, _, tok = load_hf(str(tmp_path), mesh=mesh)
    assert tok is None
    q = model.layers[0].attn.q_proj[...]  # [D, H, Dh] = [32, 4, 8], embed->fsdp, heads->tensor
    assert q.sharding.mesh.shape == mesh.shape
    assert {s.data.shape for s in q.addressable_shards} == {(8, 2, 8)}
    np.testing.assert_allclose(np.asarray(model(TOKENS)), torch_logits(ref), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind,tie,dtype", [("qwen3", False, None), ("llama", True, None),
                                            ("qwen3", True, "bfloat16")])
def test_hf_ours_hf_bit_exact_and_transformers_loads_it(tmp_path, kind, tie, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else None
    ref = make_hf_folder(str(tmp_path / "in"), kind, tie=tie, dtype=torch_dtype)
    model, cfg, tok = load_hf(str(tmp_path / "in"))
    assert cfg.param_dtype == (dtype or "float32")
    export_hf(model, cfg, str(tmp_path / "out"), tokenizer=tok, max_shard_bytes=30_000)
    assert os.path.isfile(tmp_path / "out" / hf_io.SAFETENSORS_INDEX)
    src_in = hf_io.SafetensorsSource(str(tmp_path / "in"))
    src_out = hf_io.SafetensorsSource(str(tmp_path / "out"))
    assert src_out.keys() == src_in.keys()
    for name in src_in.keys():
        a, b = src_in.read(name), src_out.read(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name

    # Compare with the input folder loaded the same way (`ref.to(bf16)` also rounds RoPE buffers).
    orig = AutoModelForCausalLM.from_pretrained(str(tmp_path / "in")).eval()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert back.dtype == orig.dtype == ref.dtype
    np.testing.assert_array_equal(torch_logits(back), torch_logits(orig))
    tok_back = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok_back.chat_template == CHAT_TEMPLATE
    for text in TEXTS:
        assert tok_back(text)["input_ids"] == tok(text)["input_ids"]


def test_export_refuses_a_folder_with_weights(tmp_path):
    make_hf_folder(str(tmp_path), "llama", with_tokenizer=False)
    model, cfg, _ = load_hf(str(tmp_path))
    with pytest.raises(FileExistsError, match="already holds weights"):
        export_hf(model, cfg, str(tmp_path))


def _rewrite(folder, tensors):
    os.remove(os.path.join(folder, hf_io.SAFETENSORS_FILE))
    hf_io.write_safetensors(tensors, folder)


def test_missing_unexpected_and_shape_errors_name_tensors(tmp_path):
    make_hf_folder(str(tmp_path), "llama", with_tokenizer=False)
    src = hf_io.SafetensorsSource(str(tmp_path))
    tensors = {k: src.read(k) for k in src.keys()}
    del src
    gone = "model.layers.1.mlp.up_proj.weight"
    broken = {k: v for k, v in tensors.items() if k != gone}
    broken["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    broken["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    _rewrite(str(tmp_path), broken)
    with pytest.raises(ValueError) as e:
        load_hf(str(tmp_path))
    msg = str(e.value)
    assert "layers.1.mlp.up_proj" in msg  # missing
    assert "model.layers.1.mlp.extra.weight" in msg  # unexpected
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "(8, 32)" in msg
    assert "(16, 32)" in msg  # expected K*Dh x D


def test_pickle_only_folder(tmp_path):
    import torch

    ref = make_hf_folder(str(tmp_path), "qwen3", with_tokenizer=False)
    os.remove(tmp_path / hf_io.SAFETENSORS_FILE)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(hf_io.CheckpointError, match="allow_pickle=True"):
        load_hf(str(tmp_path))
    model, _, _ = load_hf(str(tmp_path), allow_pickle=True)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), torch_logits(ref), atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path to a tiny llama GGUF with a tokenizer, the torch model it was written from)."""
    ref = make_torch_model("llama", tie=False)
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    write_tiny_gguf(path, torch_state(ref), tokenizer=True)
    return path, ref


def test_load_gguf_matches_torch(tiny_gguf):
    path, ref = tiny_gguf
    model, cfg, tok = load_gguf(path)
    assert cfg.model_type == "llama" and cfg.num_layers == 2
    np.testing.assert_allclose(np.asarray(model(TOKENS)), torch_logits(ref), atol=2e-5, rtol=0)
    assert tok.chat_template == CHAT_TEMPLATE


def test_gguf_tokenizer_equals_transformers_gguf_path(tiny_gguf):
    from transformers import AutoTokenizer

    from io_helpers import make_tokenizer

    path, _ = tiny_gguf
    ours = tokenizer_from_gguf(path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    orig = make_tokenizer()
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"] == orig(text)["input_ids"], text
    msgs = [{"role": "user", "content": "ab"}]
    assert (ours.apply_chat_template(msgs, tokenize=False)
            == ref.apply_chat_template(msgs, tokenize=False))
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)


def test_load_model_converts_once_into_cache(tiny_gguf, tmp_path):
    path, ref = tiny_gguf
    model, _, tok = load_model(path, cache_dir=str(tmp_path))
    (folder,) = [f for f in os.listdir(tmp_path) if not f.startswith(".")]
    assert folder.startswith("tiny-llama-") and folder.endswith("-hf")
    config = os.path.join(tmp_path, folder, hf_io.CONFIG_FILE)
    stamp = os.stat(config).st_mtime_ns
    np.testing.assert_allclose(np.asarray(model(TOKENS)), torch_logits(ref), atol=2e-5, rtol=0)
    model2, _, _ = load_model(path, cache_dir=str(tmp_path))
    assert os.stat(config).st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(model2(TOKENS)), np.asarray(model(TOKENS)))
    assert tok("abab")["input_ids"] == [127, 127]


def test_load_model_rejects_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="is not 'smollm2'"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))


def _run(code: str) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_does_not_import_torch():
    out = _run("import sys\n"
               "import qtarget_jax.models.loading, qtarget_jax.models.export\n"
               "import qtarget_jax.models.convert\n"
               "print('torch' in sys.modules)\n")
    assert out.split()[-1] == "False"


def test_load_without_torch_installed(tmp_path, tiny_gguf):
    make_hf_folder(str(tmp_path / "hf"), "qwen3", max_shard_size="20KB")
    path, _ = tiny_gguf
    out = _run("import sys; sys.modules['torch'] = None  # as if not installed\n"
               "from qtarget_jax.models.loading import load_gguf, load_hf\n"
               f"m, cfg, tok = load_hf({str(tmp_path / 'hf')!r})\n"
               f"g, gcfg, gtok = load_gguf({path!r})\n"
               "print(cfg.model_type, gcfg.model_type, tok('ab')['input_ids'],"
               " gtok('ab')['input_ids'])\n")
    assert out.split()[-4:] == ["qwen3", "llama", "[127]", "[127]"], out


def test_mesh_load_reads_each_slice_once_not_per_device(tmp_path, monkeypatch):
    """With a mesh, the bytes read from safetensors stay ~1x the model, not 8x (8 devices)."""
    make_hf_folder(str(tmp_path), "llama", with_tokenizer=False)
    read_elems = []
    read, read_slice = hf_io.SafetensorsSource.read, hf_io.SafetensorsSource.read_slice
    monkeypatch.setattr(hf_io.SafetensorsSource, "read",
                        lambda self, n: read_elems.append(read(self, n).size) or read(self, n))
    monkeypatch.setattr(hf_io.SafetensorsSource, "read_slice",
                        lambda self, n, i: read_elems.append(read_slice(self, n, i).size)
                        or read_slice(self, n, i))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    model, _, _ = load_hf(str(tmp_path), mesh=mesh)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params <= sum(read_elems) <= 1.5 * n_params, (sum(read_elems), n_params)


def test_compute_dtype_reaches_a_loaded_model(tmp_path):
    """model.compute_dtype bfloat16 on a pretrained source: float32 master params, bfloat16
    activations (the layers cast to cfg.compute_dtype), logits within bf16 error of the float32
    ones."""
    from qtarget_jax.config import ModelSection
    from qtarget_jax.train.build import build_model

    make_hf_folder(str(tmp_path), "llama", tie=True)
    f32, _, _ = build_model(ModelSection(source=str(tmp_path)), 0)
    bf16, cfg, _ = build_model(ModelSection(source=str(tmp_path), compute_dtype="bfloat16"), 0)
    assert (cfg.compute_dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert bf16(TOKENS, return_hidden=True).dtype == np.dtype("bfloat16")
    a, b = np.asarray(f32(TOKENS)), np.asarray(bf16(TOKENS))
    assert b.dtype == np.float32 and 0 < np.abs(a - b).max() < 0.05 * np.abs(a).max()
    model, cfg, _ = load_hf(str(tmp_path), compute_dtype="bfloat16")
    assert cfg.compute_dtype == "bfloat16" and model.cfg.compute_dtype == "bfloat16"
