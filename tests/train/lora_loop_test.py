"""The tiny job with LoRA through the whole loop: resume == uninterrupted, merged HF export.

Target-SFT with the initial model as teacher (the frozen base, adapters off), rank-4 adapters
on every projection, 8 CPU devices as data=4 x tensor=2 (like loop_test.py).
"""
import jax
import numpy as np
import pytest
from flax import nnx

from qtarget_jax import checkpoint as ckpt_lib
from qtarget_jax.config import load_config
from qtarget_jax.train import build, loop
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.state import abstract_checkpoint_items
from tests.train.loop_test import JOB, losses, overrides

LORA = ("lora.rank=4", "lora.alpha=8", "loss.target={preset: target_sft, eta: 0.5}",
        "optim.lr=3e-2")


def _args(run_dir, synth_dataset, char_tokenizer, *extra):
    return (*overrides(run_dir, synth_dataset, char_tokenizer), *LORA, *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synth_dataset, char_tokenizer):
    run_dir = tmp_path_factory.mktemp("lora_uninterrupted")
    args = _args(run_dir, synth_dataset, char_tokenizer, "checkpoint.export_hf=true")
    summary = loop.run(load_config(JOB, args))
    return run_dir, args, summary


def test_lora_run_learns_and_resume_equals_uninterrupted(tmp_path, uninterrupted,
                                                         synth_dataset, char_tokenizer):
    run_dir, _, summary = uninterrupted
    want = losses(run_dir)
    assert summary["eval_after"]["eval/loss"] < summary["eval_before"]["eval/loss"], summary
    args = _args(tmp_path, synth_dataset, char_tokenizer)
    assert loop.run(load_config(JOB, (*args, "run.steps=6")))["final_step"] == 6
    assert loop.run(load_config(JOB, args))["start_step"] == 6
    got = losses(tmp_path)
    np.testing.assert_array_equal([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)])


def _adapted_model_from_checkpoint(run_dir, args):
    """Our adapted model at the last step: the base rebuilt from model.source and the adapters
    (and optimizer state) restored from the run's checkpoint."""
    cfg = load_config(JOB, args).config
    model, _, _ = build.build_model(cfg.model, cfg.run.seed)
    model = build.apply_lora(model, cfg.lora, cfg.run.seed)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    tx, _ = make_optimizer(cfg.optim, cfg.schedule, cfg.run.steps)
    abstract = abstract_checkpoint_items(params.to_pure_dict(), tx,
                                         jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    ckpt = ckpt_lib.Checkpointer(str(run_dir / "checkpoints"), keep=2)
    items, _ = ckpt.restore(ckpt.latest_step(), abstract)
    ckpt.close()
    assert int(items["step"]) == cfg.run.steps
    mu = items["opt_state"][1][0].mu  # clip, then adamw's scale_by_adam state
    assert jax.tree.structure(mu) == jax.tree.structure(items["params"])
    return nnx.merge(graphdef, items["params"], rest)


def test_export_hf_is_merged_and_transformers_logits_equal_ours(uninterrupted):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, args, _ = uninterrupted
    ours = _adapted_model_from_checkpoint(run_dir, args)
    ref = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, 98, (2, 20))
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(ours(tokens))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel
    assert {p.name for p in (run_dir / "peft").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors"}
    # The adapters did change the model: the export is not the base.
    base = build.build_model(load_config(JOB, args).config.model, 0)[0]
    assert np.abs(np.asarray(base(tokens)) - want).max() / np.abs(want).max() > 1e-3
