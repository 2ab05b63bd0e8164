"""From config sections to objects: processes, the student/teacher models, the tokenizer, data.

Kept apart from the loop so each piece can be built (and tested) alone.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
from flax import nnx

from qtarget_jax.config import DataSection, LoraSection, ModelSection, RunSection


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


def resolve_source(source: str) -> str:
    """A model source as `load_model` reads it: an exported training run (a folder holding
    `hf/config.json`, written by checkpoint.export_hf) becomes its `hf/` folder."""
    exported = os.path.join(source, "hf")
    if (os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json"))
            and os.path.isfile(os.path.join(exported, "config.json"))):
        return exported
    return source


def check_vocab(tokenizer: Any, vocab_size: int, where: str) -> None:
    """Token ids must fit the embedding: a gather past the end would silently clamp."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {vocab_size}; set model.tokenizer or model.config")


def init_model(cfg, seed: int, mesh=None, rules=None) -> nnx.Module:
    """A random Decoder(cfg), created directly in its NamedShardings when `mesh` is given:
    nnx.eval_shape gives the abstract params, a jit with out_shardings creates each shard on
    its device (no host ever holds the whole model)."""
    from qtarget_jax.models import Decoder
    from qtarget_jax.models.sharding import LOGICAL_RULES, param_shardings

    def create():
        return Decoder(cfg, rngs=nnx.Rngs(seed))
    if mesh is None:
        return create()
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = param_shardings(abstract, mesh, LOGICAL_RULES if rules is None else rules)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def build_model(section: ModelSection, seed: int, source: Optional[str] = None, *,
                mesh=None, param_dtype: str = "float32", config: Optional[dict] = None,
                remat: Optional[str] = None):
    """Returns (model, ModelConfig, tokenizer) for `source` (default section.source).

    "init": a random Decoder from ModelConfig(**config); otherwise load_model(source) with
    `config` applied as ModelConfig overrides (default section.config). Params are created in
    `param_dtype` (float32 master weights for the student), directly sharded over `mesh` when
    given; activations run in section.compute_dtype; remat defaults to section.remat.
    """
    from qtarget_jax.models import ModelConfig
    from qtarget_jax.models.gguf_io import default_model_path

    source = resolve_source(source or section.source)
    changes = {**(section.config if config is None else config),
               "compute_dtype": section.compute_dtype,
               "remat_policy": section.remat if remat is None else remat}
    if source == "init":
        try:
            cfg = ModelConfig(**{**changes, "param_dtype": param_dtype})
        except TypeError as e:
            raise ValueError(f"model.config: {e}") from None
        model = init_model(cfg, seed, mesh)
        tokenizer = _tokenizer(section.tokenizer or default_model_path())
        check_vocab(tokenizer, cfg.vocab_size, "model.source=init")
        return model, cfg, tokenizer
    from qtarget_jax.models.loading import load_model
    model, cfg, tokenizer = load_model(source, mesh=mesh, param_dtype=param_dtype, **changes)
    if tokenizer is None and not section.tokenizer:
        raise ValueError(f"model.source={source}: no tokenizer found; set model.tokenizer")
    if section.tokenizer:
        tokenizer = _tokenizer(section.tokenizer)
    check_vocab(tokenizer, cfg.vocab_size, f"model.source={source}")
    return model, cfg, tokenizer


def apply_lora(model: nnx.Module, section: LoraSection, seed: int) -> nnx.Module:
    """Adds LoRA adapters per the `lora` section (rank 0: `model` unchanged), in place; the
    optimizer then trains only the adapters (models/lora.py)."""
    if section.rank == 0:
        return model
    from qtarget_jax.models.lora import LoraConfig, add_lora
    return add_lora(model, LoraConfig(rank=section.rank, alpha=section.alpha,
                                      dropout=section.dropout,
                                      targets=tuple(section.targets)), seed,
                    param_dtype="float32")


def student_param_dtype(section: LoraSection) -> str:
    """The student's param dtype: float32 master weights, except a LoRA model's frozen base
    when lora.base_dtype is set (its adapters stay float32)."""
    return section.base_dtype if section.rank and section.base_dtype else "float32"


def teacher_param_dtype(section: ModelSection) -> str:
    """model.teacher_dtype, or (null) model.compute_dtype: a frozen teacher needs no float32
    master weights when the step computes in bfloat16."""
    return section.teacher_dtype or section.compute_dtype


def check_teacher_tokenizer(student_tok: Any, teacher_tok: Any, student_src: str,
                            teacher_src: str) -> None:
    """Same token -> id map, or a ValueError naming both sources and the first difference."""
    from qtarget_jax.targets import check_teacher_tokenizer as check
    try:
        check(student_tok.get_vocab(), teacher_tok.get_vocab())
    except ValueError as e:
        raise ValueError(f"model.teacher={teacher_src!r} does not share the tokenizer of "
                         f"model.source={student_src!r} (model.tokenizer when set): {e}") from None


def build_teacher(section: ModelSection, seed: int, student_tokenizer: Any, *, mesh=None):
    """The frozen teacher: (teacher, teacher ModelConfig or None).

    model.teacher null: `state.INITIAL` (the frozen initial student, copied on device by
    init_state in teacher_param_dtype). Otherwise the model at model.teacher (HF folder, GGUF,
    "smollm2", exported run), any architecture, loaded straight into its shardings over `mesh`
    in `teacher_param_dtype`, with model.teacher_config as ModelConfig overrides. Its
    tokenizer must map every token to the same id as the student's (checked here, before any
    training); head rows past the tokenizer are padding, masked in the loss.
    """
    from qtarget_jax.train.state import INITIAL
    if section.teacher is None:
        return INITIAL, None
    config = dict(section.teacher_config)
    if "scan_layers" in section.config and "scan_layers" not in config:
        config["scan_layers"] = section.config["scan_layers"]
    teacher_section = dataclasses.replace(section, tokenizer=None)
    try:
        teacher, cfg, teacher_tok = build_model(
            teacher_section, seed, source=section.teacher, mesh=mesh,
            param_dtype=teacher_param_dtype(section), config=config, remat="none")
    except ValueError as e:
        if "no tokenizer found" in str(e):
            raise ValueError(f"model.teacher={section.teacher!r}: no tokenizer files; the "
                             "teacher's tokenizer is needed to check it matches the "
                             "student's") from None
        raise
    student_src = section.tokenizer or section.source
    check_teacher_tokenizer(student_tokenizer, teacher_tok, student_src, section.teacher)
    if len(student_tokenizer) > cfg.vocab_size:
        raise ValueError(f"model.teacher={section.teacher!r}: head has {cfg.vocab_size} rows "
                         f"but the tokenizer {len(student_tokenizer)} tokens")
    return teacher, cfg


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
