"""Models to evaluate: a `load_model` source (HF folder, .gguf, "smollm2") or a training run's
Orbax checkpoint (`run_dir/config.yaml` says how to build the model and the optimizer state the
checkpoint holds; only its params are used)."""
from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx


def load_source(source: str) -> tuple[nnx.Module, Any]:
    """(model, tokenizer) from a `load_model` source; raises when it has no tokenizer."""
    from qtarget_jax.models.loading import load_model

    model, _, tokenizer = load_model(source, param_dtype="float32")
    if tokenizer is None:
        raise ValueError(f"evaluate: model source {source!r} has no tokenizer files")
    return model, tokenizer


def load_checkpoint(run_dir: str, step: int | None = None) -> tuple[nnx.Module, Any, int]:
    """(model, tokenizer, step) with the params of checkpoint `step` (default the latest) of the
    training run in `run_dir` (its `config.yaml` and `checkpoints/`, or `checkpoint.dir`)."""
    from qtarget_jax import checkpoint as ckpt_lib
    from qtarget_jax.config import load_config
    from qtarget_jax.train import build
    from qtarget_jax.train.optim import make_optimizer

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
        model, _, tokenizer = build.build_model(cfg.model, cfg.run.seed)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx, _ = make_optimizer(cfg.optim, cfg.schedule, cfg.run.steps)
        pure = params.to_pure_dict()
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        items = {"step": jax.ShapeDtypeStruct((), "int32"), "params": pure,
                 "opt_state": jax.eval_shape(tx.init, pure),
                 "rng": jax.ShapeDtypeStruct((2,), "uint32")}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                                items)
        restored, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(params, restored["params"])
    return nnx.merge(graphdef, params, rest), tokenizer, int(step)
