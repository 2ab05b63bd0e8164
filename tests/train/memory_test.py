"""Memory per chip from the compiled step (train/memory.py) and the paper-setting job."""
import math
import pathlib

import jax
import pytest
from flax import nnx

from qtarget_jax.config import load_config
from qtarget_jax.models import Decoder, ModelConfig
from qtarget_jax.models.sharding import param_shardings
from qtarget_jax.train.memory import compiled_memory
from tests.train.multiprocess_worker import MODEL, TEACHER

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_compiled_memory_counts_student_teacher_and_adam_shards():
    cfg = load_config(REPO / "configs" / "tiny_test.yaml",
                      ("loss.target.preset=target_sft", "mesh.data=1", "mesh.fsdp=8",
                       "data.batch_size=8", "data.seq_len=32")).config
    student = ModelConfig(**MODEL)
    teacher = ModelConfig(**TEACHER, param_dtype="bfloat16")
    mem = compiled_memory(cfg, student, teacher, real_vocab=98)
    n_student = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(
        nnx.eval_shape(lambda: Decoder(student, rngs=nnx.Rngs(0))), nnx.Param)))
    n_teacher = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(
        nnx.eval_shape(lambda: Decoder(teacher, rngs=nnx.Rngs(0))), nnx.Param)))
    assert mem["student_params"] == n_student * 4 // 8
    assert mem["optimizer"] >= 2 * n_student * 4 // 8  # mu, nu (+ counters)
    assert mem["teacher_params"] == n_teacher * 2 // 8  # bfloat16, no optimizer state
    state_bytes = mem["student_params"] + mem["optimizer"] + mem["teacher_params"]
    assert state_bytes <= mem["arguments"] < state_bytes + 8 * 32 * 5 * 4 + 64
    assert mem["temporaries"] > 0 and mem["total"] >= mem["arguments"]


def test_paper_job_loads_and_both_models_shard_on_32_chips():
    cfg = load_config(REPO / "configs" / "tpu_v5p_qwen25_math_target_sft.yaml").config
    assert cfg.model.teacher.endswith("Qwen2.5-Math-7B-Instruct")
    assert cfg.model.teacher_dtype == "bfloat16" and cfg.loss.target["preset"] == "target_sft"
    assert cfg.data.batch_size % (cfg.data.microbatches * 32) == 0
    assert cfg.data.batch_size % (8 * cfg.data.microbatches * 4) == 0  # 8x H100, microbatches=8
    mesh = jax.sharding.AbstractMesh((1, 32, 1), ("data", "fsdp", "tensor"))
    for preset, params in ((ModelConfig.qwen25_math_1_5b, 1.54e9),
                           (ModelConfig.qwen25_math_7b, 7.62e9)):
        model_cfg = preset(**cfg.model.config)
        abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
        n = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
        assert n == pytest.approx(params, rel=0.01)
        param_shardings(abstract, mesh)  # raises if a dim does not divide
