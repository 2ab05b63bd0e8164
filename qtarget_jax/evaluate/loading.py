"""Models to evaluate: a `load_model` source (HF folder, .gguf, "smollm2") or a training run's
Orbax checkpoint (`run_dir/config.yaml` says how to build the model and the optimizer state the
checkpoint holds; only its params are used)."""
from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from qtarget_jax import checkpoint as ckpt_lib
from qtarget_jax.config import load_config
from qtarget_jax.models import Decoder, ModelConfig
from qtarget_jax.models.gguf_io import default_model_path
from qtarget_jax.models.loading import load_model
from qtarget_jax.models.tokenizer import load_tokenizer, tokenizer_from_gguf
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.state import abstract_checkpoint_items


def load_source(source: str) -> tuple[nnx.Module, Any]:
    """(model, tokenizer) from a `load_model` source; raises when it has no tokenizer."""
    model, _, tokenizer = load_model(source, param_dtype="float32")
    if tokenizer is None:
        raise ValueError(f"evaluate: model source {source!r} has no tokenizer files")
    return model, tokenizer


def _model_of_run(section) -> tuple[nnx.Module, Any]:
    """(model with placeholder params, tokenizer) shaped as the run's `model` section built it:
    abstract for source=init (nothing allocated until the checkpoint fills it), else loaded."""
    def tokenizer_at(path):
        return tokenizer_from_gguf(path) if path.endswith(".gguf") else load_tokenizer(path)
    changes = {**section.config, "compute_dtype": section.compute_dtype}
    if section.source == "init":
        cfg = ModelConfig(**changes)
        model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
        return model, tokenizer_at(section.tokenizer or default_model_path())
    model, _, tokenizer = load_model(section.source, param_dtype="float32", **changes)
    if section.tokenizer:
        tokenizer = tokenizer_at(section.tokenizer)
    if tokenizer is None:
        raise ValueError(f"evaluate: model.source={section.source!r} has no tokenizer; the "
                         "run's config must set model.tokenizer")
    return model, tokenizer


def load_checkpoint(run_dir: str, step: int | None = None) -> tuple[nnx.Module, Any, int]:
    """(model, tokenizer, step) with the params of checkpoint `step` (default the latest) of the
    training run in `run_dir` (its `config.yaml` and `checkpoints/`, or `checkpoint.dir`).

    The checkpoint's layout comes from the training state itself
    (`train.state.abstract_checkpoint_items`), restored onto one device.
    """
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"evaluate: {config_path} not found; --run-dir must be a "
                                "training run folder")
    cfg = load_config(config_path).config
    ckpt_dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=max(cfg.checkpoint.keep, 1), async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"evaluate: no checkpoint in {ckpt_dir}")
        model, tokenizer = _model_of_run(cfg.model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx, _ = make_optimizer(cfg.optim, cfg.schedule, cfg.run.steps)
        abstract = abstract_checkpoint_items(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params.to_pure_dict()),
            tx, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        restored, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(params, restored["params"])
    return nnx.merge(graphdef, params, rest), tokenizer, int(step)
