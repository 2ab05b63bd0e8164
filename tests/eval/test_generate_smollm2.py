"""Greedy generate() on the embedded SmolLM2-135M-Instruct == transformers' `generate` greedy.

Slow (about a minute on 2 CPU cores, conversion included on a cold cache):
    .venv/bin/python -m pytest -s -m slow tests/eval/test_generate_smollm2.py
The torch model is built from the converted HF folder as tests/models/test_io_smollm2.py does.
"""
import os

import pytest

from qtarget_jax.generate import SamplingConfig, generate, prompt_ids
from qtarget_jax.models import gguf_io
from qtarget_jax.models.loading import CACHE_ENV, cached_hf_folder, load_model

pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Tom has 3 apples and gets 4 more. How many apples does he have?"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.environ.get(CACHE_ENV) or str(tmp_path_factory.mktemp("qtarget_cache"))


def test_greedy_equals_transformers_generate(cache_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model, _, tok = load_model("smollm2", cache_dir=cache_dir)
    folder = cached_hf_folder(gguf_io.default_model_path(), cache_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    for prompt, gen in zip(PROMPTS, ours):
        ids = prompt_ids(tok, prompt)
        with torch.no_grad():
            out = ref_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
        ref = [int(t) for t in out[0, len(ids):]]
        if ref and ref[-1] == tok.eos_token_id:
            ref = ref[:-1]
        print(f"\n{prompt!r} -> {gen.text!r} ({gen.finish_reason})")
        assert gen.token_ids == ref, (gen.text, tok.decode(ref))


def test_greedy_equals_transformers_on_the_decode_benchmark_prompts(cache_dir):
    """The 40 prompts of benchmarks/generate.py (held-out synthetic problems), 64 new tokens, in
    one batch on both sides (transformers left-padded with an attention mask, as the benchmark
    runs it): every greedy row equal token for token."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtarget_jax.data import synthetic

    model, _, tok = load_model("smollm2", cache_dir=cache_dir)
    folder = cached_hf_folder(gguf_io.default_model_path(), cache_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chats = [r["messages"][:-1] for r in synthetic.generate(0, 40, seed=0)["test"]]
    ours = generate(model, tok, chats, SamplingConfig(max_new_tokens=64))
    ids = [prompt_ids(tok, c) for c in chats]
    width = max(map(len, ids))
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        batch[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    with torch.no_grad():
        out = ref_model.generate(batch, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
    for i, gen in enumerate(ours):
        ref = [int(t) for t in out[i, width:]]
        ref = ref[:ref.index(eos)] if eos in ref else ref
        assert gen.token_ids == ref, (i, gen.text, tok.decode(ref))
