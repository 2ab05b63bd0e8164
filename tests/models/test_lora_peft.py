"""PEFT-format adapter export: `peft.PeftModel` on the transformers base gives our adapted logits.

Needs the `peft` package (not a project dependency); skipped with that reason when absent.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from model_helpers import assert_rel_close, tiny_config
from qtarget_jax.models import Decoder
from qtarget_jax.models import lora
from qtarget_jax.models.export import export_hf
from qtarget_jax.models.peft_export import export_peft

peft = pytest.importorskip("peft", reason="peft is not installed (optional: pip install peft)")


@pytest.mark.parametrize("family,scan,targets", [
    ("smollm2_tied", False, ("q", "k", "v", "o", "gate", "up", "down")),
    ("qwen2_bias", True, ("q", "v", "down"))])
def test_peft_loads_our_adapters(tmp_path, family, scan, targets):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, scan_layers=scan)
    base = Decoder(cfg, rngs=nnx.Rngs(0))
    export_hf(base, cfg, str(tmp_path / "base"))
    model = lora.add_lora(Decoder(cfg, rngs=nnx.Rngs(0)),
                          lora.LoraConfig(rank=3, alpha=5.0, targets=targets))
    for i, site in enumerate(lora.adapters(model)):
        site.adapter.b.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(i),
                                                         site.adapter.b.shape))
    export_peft(model, str(tmp_path / "peft"), base_model=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32,
                                              attn_implementation="eager")
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(model(tokens))
    assert_rel_close(got, want, msg=family)
    assert np.abs(np.asarray(base(tokens)) - want).max() > 1e-3 * np.abs(want).max()
