"""From config sections to objects: processes, the student/teacher models, the tokenizer, data.

Kept apart from the loop so each piece can be built (and tested) alone.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
from flax import nnx

from qtarget_jax.config import DataSection, ModelSection, RunSection


def init_distributed(run: RunSection) -> None:
    """jax.distributed.initialize only when several processes are configured or detected.

    Configured: run.processes > 1 (with run.coordinator and run.process_id). Detected: the
    JAX_COORDINATOR_ADDRESS environment variable (set by launchers). On CPU the collectives go
    through gloo. Must run before anything touches a JAX backend.
    """
    detected = "JAX_COORDINATOR_ADDRESS" in os.environ
    if run.processes <= 1 and not detected:
        return
    if os.environ.get("JAX_PLATFORMS", "") in ("cpu", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if run.processes > 1:
        if run.coordinator is None or run.process_id is None:
            raise ValueError(f"run.processes={run.processes} needs run.coordinator (host:port) "
                             f"and run.process_id; got {run.coordinator!r}, {run.process_id!r}")
        jax.distributed.initialize(run.coordinator, run.processes, run.process_id)
    else:
        jax.distributed.initialize()


def _tokenizer(path: str) -> Any:
    from qtarget_jax.models.tokenizer import load_tokenizer, tokenizer_from_gguf
    return tokenizer_from_gguf(path) if path.endswith(".gguf") else load_tokenizer(path)


def _model_config_changes(section: ModelSection) -> dict:
    return {"dtype": section.compute_dtype, "remat_policy": section.remat}


def check_vocab(tokenizer: Any, vocab_size: int, where: str) -> None:
    """Token ids must fit the embedding: a gather past the end would silently clamp."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {vocab_size}; set model.tokenizer or model.config")


def build_model(section: ModelSection, seed: int, source: Optional[str] = None):
    """Returns (model, ModelConfig, tokenizer) for `source` (default section.source).

    "init": a random Decoder from ModelConfig(**section.config); otherwise load_model(source)
    with section.config applied as ModelConfig overrides. compute dtype and remat come from the
    section in both cases.
    """
    from qtarget_jax.models import Decoder, ModelConfig
    from qtarget_jax.models.gguf_io import default_model_path

    source = source or section.source
    changes = {**section.config, **_model_config_changes(section)}
    if source == "init":
        try:
            cfg = ModelConfig(**changes)
        except TypeError as e:
            raise ValueError(f"model.config: {e}") from None
        model = Decoder(cfg, rngs=nnx.Rngs(seed))
        tokenizer = _tokenizer(section.tokenizer or default_model_path())
        check_vocab(tokenizer, cfg.vocab_size, "model.source=init")
        return model, cfg, tokenizer
    from qtarget_jax.models.loading import load_model
    # Master weights stay float32 (load_model's `dtype` is the param dtype); activations run in
    # model.compute_dtype, and the step casts the weights to it.
    compute = changes.pop("dtype")
    model, cfg, tokenizer = load_model(source, dtype="float32", compute_dtype=compute, **changes)
    if tokenizer is None and not section.tokenizer:
        raise ValueError(f"model.source={source}: no tokenizer found; set model.tokenizer")
    if section.tokenizer:
        tokenizer = _tokenizer(section.tokenizer)
    check_vocab(tokenizer, cfg.vocab_size, f"model.source={source}")
    return model, cfg, tokenizer


def build_teacher(section: ModelSection, student: nnx.Module, seed: int) -> nnx.Module:
    """The frozen teacher: model.teacher's source, or (null) a copy of the initial student."""
    if section.teacher is None:
        return nnx.clone(student)
    teacher, _, _ = build_model(section, seed, source=section.teacher)
    return teacher


def train_iterator(data: DataSection, tokenizer: Any):
    """This process's shard of the training stream (global batch data.batch_size)."""
    from qtarget_jax.data import make_sft_iterator
    return make_sft_iterator(data.path, tokenizer, seq_len=data.seq_len,
                             batch_size=data.batch_size, seed=data.seed, pack=data.pack,
                             split=data.train_split, truncate=data.truncate,
                             num_workers=data.tokenize_workers)


def eval_batches(data: DataSection, tokenizer: Any, max_batches: int) -> list[dict]:
    """The first `max_batches` held-out batches of this process (fixed across the run)."""
    from qtarget_jax.data import make_eval_iterator
    it = make_eval_iterator(data.path, tokenizer, seq_len=data.seq_len,
                            batch_size=data.batch_size, split=data.eval_split,
                            truncate=data.truncate, num_workers=data.tokenize_workers)
    out = []
    for batch in it:
        if len(out) == max_batches:
            break
        out.append(batch)
    return out
