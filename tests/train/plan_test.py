"""Planning a job without its hardware (train/plan.py, aot.py, hlo_stats.py): the step compiled
by libtpu's TPU compiler for slices that are not attached, and by XLA:CPU on fake devices."""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qtarget_jax.config import load_config
from qtarget_jax.models import Decoder, ModelConfig
from qtarget_jax.models.sharding import param_shardings
from qtarget_jax.train import plan
from qtarget_jax.train.aot import compile_step
from qtarget_jax.train.hlo_stats import hlo_stats
from tests.train.multiprocess_worker import MODEL, TEACHER

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_test.yaml"
JOB = ("loss.target.preset=target_sft", "mesh.data=1", "mesh.fsdp=-1", "data.batch_size=8",
       "data.seq_len=32", "model.compute_dtype=bfloat16", "model.remat=full")


def _n_params(model_cfg) -> int:
    abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def _check_state_split(step, student, teacher, chips):
    """Per-chip state = the model's parameter count split over `chips` (FSDP on every weight)."""
    assert step.state_bytes["student_params"] == _n_params(student) * 4 // chips
    assert step.state_bytes["optimizer"] >= 2 * _n_params(student) * 4 // chips  # mu, nu
    assert step.state_bytes["teacher_params"] == _n_params(teacher) * 2 // chips  # bf16
    state = sum(step.state_bytes.values())
    assert state <= step.memory["arguments"] <= step.memory["total"]


@pytest.mark.parametrize("topology, chips", [("v5p:2x2x1", 4), ("v5e:2x2", 4)])
def test_tiny_step_compiles_for_a_tpu_slice_and_state_is_the_shards(topology, chips):
    cfg = load_config(TINY, JOB).config
    student = ModelConfig(**MODEL, compute_dtype="bfloat16", remat_policy="full")
    teacher = ModelConfig(**TEACHER, param_dtype="bfloat16", compute_dtype="bfloat16")
    devices = plan.tpu_devices(topology)
    assert len(devices) == chips and all(d.platform == "tpu" for d in devices)
    step = compile_step(cfg, student, teacher, real_vocab=98, devices=devices)
    _check_state_split(step, student, teacher, chips)
    assert "TPU" in step.compiled.as_text() or step.compiled.cost_analysis()["flops"] > 0


def test_xla_cpu_path_on_fake_devices_counts_the_same_shards():
    cfg = load_config(TINY, JOB).config
    student = ModelConfig(**MODEL)
    teacher = ModelConfig(**TEACHER, param_dtype="bfloat16")
    step = compile_step(cfg, student, teacher, real_vocab=98)  # the 8 fake CPU devices
    _check_state_split(step, student, teacher, 8)
    assert step.memory["temporaries"] > 0


def _plan(capsys, *args):
    rc = plan.main(["--config", str(TINY), *args])
    return rc, capsys.readouterr().out


def test_plan_prints_memory_flops_and_an_estimated_mfu_in_range(capsys):
    rc, out = _plan(capsys, "--topology", "v5p:2x2x1", *JOB)
    assert rc == 0, out
    values = dict(line.strip().split(": ", 1) for line in out.splitlines()
                  if line.startswith("  ") and ": " in line)
    mfu = float(values["mfu"])
    assert 0 < mfu <= 1, out
    model_flops = float(values["model"].split()[0])
    assert float(values["compiled"].split()[0]) >= model_flops  # remat adds a forward
    assert float(values["total"]) <= 95 and out.splitlines()[-1].startswith("fit: yes")
    assert "cost model" in out and "not a measurement" in out


def test_a_job_too_large_for_v5e_is_refused_in_one_line(capsys):
    # 3 x 1024 x 2^21 MLP params in f32 with Adam: ~25 GiB per chip of a v5e's 16.
    rc, out = _plan(capsys, "--topology", "v5e:2x2", *JOB, "model.config.hidden_size=1024",
                    "model.config.intermediate_size=2097152", "model.config.num_layers=1")
    assert rc == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("does not fit: v5e chip needs ") and last.endswith("has 16.0 GiB")
    needed = float(last.split("needs at least ")[1].split(" GiB")[0])
    assert needed > 16 and "Traceback" not in out


def test_a_model_name_that_is_no_preset_is_refused_in_one_line_with_the_presets(capsys):
    rc, out = _plan(capsys, "--devices", "1", *JOB, "model.source=smollm2",
                    "model.name=smollm2")
    assert rc == 2 and "Traceback" not in out
    line, = out.strip().splitlines()
    assert line.startswith("plan: the config's model.name (or pass --student) 'smollm2' is not")
    assert "smollm2_135m" in line and "llama3_8b" in line
    rc, out = _plan(capsys, "--devices", "1", *JOB, "--student", "gpt5")
    assert rc == 2 and out.strip().startswith("plan: --student 'gpt5' is not a ModelConfig")


def test_without_libtpu_the_command_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setattr(plan, "libtpu_missing", lambda: True)
    rc, out = _plan(capsys, "--topology", "v5p:2x2x1")
    assert rc == 2 and out.strip().splitlines() == [plan.INSTALL] and ".[tpu]" in out


def test_resource_exhausted_becomes_the_same_line():
    e = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
                     "in memory space hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity.")
    assert str(plan._exhausted(e, "v5e", 16.0)) == (
        "does not fit: v5e chip needs at least 20.5 GiB, has 16.0 GiB")
    e = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                     "for HLO temporaries (42.01G) exceeds available HBM (15.75G).")
    assert str(plan._exhausted(e, "v5e", 16.0)).startswith("does not fit: v5e chip needs at "
                                                           "least 42.0 GiB")
    assert plan._exhausted(RuntimeError("INVALID_ARGUMENT: x"), "v5e", 16.0) is None


@pytest.mark.parametrize("budget", [0.5, 10, 33, 100, 1000])
def test_fit_search_finds_the_largest_batch_under_the_budget(budget):
    calls = []

    def total(batch):  # linear memory, as the compiler's totals are
        calls.append(batch)
        return 3.0 + 4.0 * batch
    batch, t = plan.fit_batch(total, unit=2, budget=budget)
    fitting = [b for b in range(2, 2000, 2) if 3.0 + 4.0 * b <= budget]
    assert batch == (max(fitting) if fitting else None)
    assert t == total(batch if batch else 2) and len(calls) <= 6


def test_loop_trip_counts_scale_the_matmul_flops():
    """A scan of 8 matmuls: cost_analysis counts its body once; hlo_stats counts 8, exactly the
    FLOPs of the same 8 matmuls unrolled (2 M K N each, per chip)."""
    devices = plan.tpu_devices("v5p:2x2x1")
    mesh = Mesh(np.array(devices), ("x",))
    a = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    b = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=8)[0]
    compiled = jax.jit(scanned).lower(a, b).compile()
    stats = hlo_stats(compiled.as_text())
    per_chip = 2 * (512 // 4) * 256 * 256
    assert stats.trip_counts == (8,) and stats.unknown_trip_counts == 0
    assert stats.dot_flops == 8 * per_chip and stats.dot_flops_once == per_chip
    assert compiled.cost_analysis()["flops"] == pytest.approx(per_chip, rel=0.05)


def test_paper_job_loads_and_both_models_shard_on_its_v5p_8():
    cfg = load_config(REPO / "configs" / "tpu_v5p_qwen25_math_target_sft.yaml").config
    assert cfg.model.teacher.endswith("Qwen2.5-Math-7B-Instruct")
    assert cfg.model.teacher_dtype == "bfloat16" and cfg.loss.target["preset"] == "target_sft"
    assert cfg.data.batch_size % (cfg.data.microbatches * 4) == 0  # v5p-8: 4 chips
    assert cfg.data.batch_size % (cfg.data.microbatches * 4 * 8) == 0  # 8x H100, microbatches=8
    mesh = jax.sharding.AbstractMesh((1, 4, 1), ("data", "fsdp", "tensor"))
    for preset, params in ((ModelConfig.qwen25_math_1_5b, 1.54e9),
                           (ModelConfig.qwen25_math_7b, 7.62e9)):
        model_cfg = preset(**cfg.model.config)
        abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
        assert _n_params(model_cfg) == pytest.approx(params, rel=0.01)
        param_shardings(abstract, mesh)  # raises if a dim does not divide
