"""Export a LoRA model's adapters as a PEFT adapter folder (what `peft.PeftModel` loads).

    folder/
      adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules
      adapter_model.safetensors    base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>
                                   .lora_A.weight [r, in] and .lora_B.weight [out, r], float32

Our A [*in, r] and B [r, *out] flatten their in / out dims in the order of the HF weight
(params.RULES: W_ours = W_hf.T reshaped), so lora_A = A.reshape(-1, r).T and
lora_B = B.reshape(r, -1).T. The base model itself is not written: PEFT applies the folder to
the base (e.g. the model.source folder) with `PeftModel.from_pretrained(base, folder)`.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from qtarget_jax.models import hf_io
from qtarget_jax.models.lora import adapters


def peft_tensors(model: Any) -> dict[str, np.ndarray]:
    """PEFT-named float32 arrays (lora_A [r, in], lora_B [out, r] per layer and projection),
    named by `lora.Target.peft_module` (params.RULES)."""
    sites = adapters(model)
    if not sites:
        raise ValueError("peft_tensors: the model has no LoRA adapters")
    out: dict[str, np.ndarray] = {}
    for site in sites:
        a = np.asarray(site.adapter.a[...], np.float32)
        b = np.asarray(site.adapter.b[...], np.float32)
        # A stacked adapter (scan_layers) holds every layer as a row; else one layer.
        rows = enumerate(zip(a, b)) if site.layer is None else [(site.layer, (a, b))]
        for i, (a_i, b_i) in rows:
            r = a_i.shape[-1]
            name = site.target.peft_module(i)
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, r).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(r, -1).T)
    return out


def export_peft(model: Any, folder: str, *, base_model: str = "") -> list[str]:
    """Write `model`'s adapters as a PEFT LoRA folder; returns the file names written.

    base_model: recorded as `base_model_name_or_path` (the base PEFT applies them to).
    """
    sites = adapters(model)
    if not sites:
        raise ValueError("export_peft: the model has no LoRA adapters")
    ad = sites[0].adapter
    rank = int(ad.a.shape[-1])
    os.makedirs(folder, exist_ok=True)
    hf_io._save(peft_tensors(model), os.path.join(folder, "adapter_model.safetensors"))
    modules = sorted({site.target.peft_module(0).rsplit(".", 1)[-1] for site in sites})
    hf_io.write_json({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": float(ad.alpha), "lora_dropout": float(ad.dropout),
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model}, os.path.join(folder, "adapter_config.json"))
    return ["adapter_model.safetensors", "adapter_config.json"]
