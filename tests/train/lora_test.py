"""LoRA training: only adapters trained, the frozen base as the free initial-model teacher.

The student is the tiny 2-layer Llama of multiprocess_worker.py with rank-4 adapters on every
projection, trained with the fused Target-SFT loss (teacher: the initial model).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget_jax.config import OptimSection, ScheduleSection
from qtarget_jax.models import Decoder, ModelConfig
from qtarget_jax.models import lora
from qtarget_jax.models.sharding import LOGICAL_RULES
from qtarget_jax.targets import spec_from_dict
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.state import INITIAL, init_state
from qtarget_jax.train.step import jit_train_step, make_loss_fn, merge_models
from tests.train.multiprocess_worker import MODEL, global_batches

STEPS = 6
# The learning test uses SFT: Target-SFT's Q is close to p itself on a near-uniform random
# model, so its loss moves little in a few steps; the teacher tests use Target-SFT.
SFT, TARGET_SFT = {"preset": "sft"}, {"preset": "target_sft", "eta": 0.5}


def _student(scan=False, rank=4, base_dtype="float32"):
    model = Decoder(ModelConfig(**MODEL, scan_layers=scan, param_dtype=base_dtype),
                    rngs=nnx.Rngs(0))
    return lora.add_lora(model, lora.LoraConfig(rank=rank, alpha=8.0), seed=0,
                         param_dtype="float32")


def _built(student, teacher=INITIAL, devices=None, mesh_sizes=None, target=TARGET_SFT):
    mesh = mesh_lib.make_mesh(mesh_sizes or {"data": 1}, devices or jax.devices()[:1])
    tx, sched = make_optimizer(OptimSection(lr=3e-2), ScheduleSection(kind="constant"), STEPS)
    built = init_state(student, tx, mesh, LOGICAL_RULES, seed=0, teacher=teacher)
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh),
                          mesh_lib.replicated(mesh), graphdef=built.graphdef,
                          teacher_graphdef=built.teacher_graphdef, tx=tx, schedule=sched,
                          microbatches=1,
                          loss_fn=make_loss_fn(spec_from_dict(target), "token", fused=True,
                                               mesh=mesh))
    return built, step, mesh


def _train(scan=False, base_dtype="float32", **kw):
    built, step, mesh = _built(_student(scan, base_dtype=base_dtype), **kw)
    state = built.state
    initial = jax.tree.map(np.array, (state.params, state.rest))
    batch = mesh_lib.global_batch(global_batches()[0], mesh)  # one batch: the loss must fall
    losses = []
    for _ in range(STEPS):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return built, state, initial, losses


@pytest.mark.parametrize("scan,base_dtype", [(False, "float32"), (True, "float32"),
                                             (True, "bfloat16")])
def test_only_adapters_train_and_the_base_stays_bit_identical(scan, base_dtype):
    built, state, (params0, rest0), losses = _train(scan, base_dtype, target=SFT)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert jnp.dtype(base_dtype) in {x.dtype for x in jax.tree.leaves(state.rest)}
    assert losses[-1] < losses[0] - 0.05, losses
    # Trainable params and optimizer state: adapters only.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
    assert paths and all("_lora']" in p for p in paths), paths
    param_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    big = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert big == sorted(param_shapes * 2)  # Adam mu and nu of the adapters, nothing else
    # Base weights unchanged, bit for bit; every B moved off zero.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.rest), rest0)
    for path, b in jax.tree_util.tree_leaves_with_path(state.params):
        if jax.tree_util.keystr(path).endswith("['b']"):
            assert np.abs(np.asarray(b)).max() > 0, path


def test_teacher_is_the_base_model_with_adapters_off():
    built, state, _, _ = _train()
    assert state.teacher == {}  # the teacher is the base itself: no second copy
    base = Decoder(ModelConfig(**MODEL), rngs=nnx.Rngs(0))  # the same init: the initial model
    tokens = jnp.asarray(global_batches()[1]["tokens"])
    student, teacher = merge_models(state, state.params, graphdef=built.graphdef,
                                    teacher_graphdef=built.teacher_graphdef)
    np.testing.assert_array_equal(np.asarray(teacher(tokens)), np.asarray(base(tokens)))
    assert not np.allclose(np.asarray(student(tokens)), np.asarray(base(tokens)))


def test_base_teacher_saves_a_second_copy_of_the_weights():
    """Compiled step arguments: the base-as-teacher step holds one copy of the base weights,
    a step with a separate frozen teacher (the same base, copied) one more."""
    batch = global_batches()[0]

    def arg_bytes(teacher):
        built, step, mesh = _built(_student(), teacher=teacher)
        compiled = step.lower(built.state, mesh_lib.global_batch(batch, mesh)).compile()
        return compiled.memory_analysis().argument_size_in_bytes, built
    shared, built = arg_bytes(INITIAL)
    copied, _ = arg_bytes(Decoder(ModelConfig(**MODEL), rngs=nnx.Rngs(0)))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(built.state.rest)
                     if x.dtype == jnp.float32)
    assert copied - shared == base_bytes, (copied, shared, base_bytes)


def test_eight_devices_equal_one():
    _, one, _, losses_one = _train(target=SFT)
    _, eight, _, losses_eight = _train(target=SFT, devices=jax.devices(),
                                       mesh_sizes={"data": 2, "fsdp": 2, "tensor": 2})
    # Losses as the other 8-vs-1 tests judge them. (Single adapter elements differ more, up
    # to 1e-3 relative after 6 steps: Adam divides by sqrt(nu), so elements whose gradients are
    # near zero amplify the last-bit differences of the split sums.)
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
    a = eight.params["layers"][0]["attn"]["q_proj_lora"]["a"]
    assert a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert eight.rest["layers"][0]["attn"]["q_proj"].sharding.spec[0] == "fsdp"


def test_dropout_acts_in_training_steps_only():
    """B = 0 at step 1, so dropout cannot change the first loss; it changes the later ones.
    Evaluation (merge_models without the step's seeding) is deterministic."""
    def run(dropout):
        model = Decoder(ModelConfig(**MODEL), rngs=nnx.Rngs(0))
        lora.add_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=dropout), seed=0)
        built, step, mesh = _built(model, target=SFT)
        state, losses = built.state, []
        batch = mesh_lib.global_batch(global_batches()[0], mesh)
        for _ in range(3):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        return built, state, losses
    _, _, plain = run(0.0)
    built, state, dropped = run(0.5)
    assert dropped[0] == plain[0] and dropped[2] != plain[2], (plain, dropped)
    student, _ = merge_models(state, state.params, graphdef=built.graphdef,
                              teacher_graphdef=built.teacher_graphdef)
    tokens = jnp.asarray(global_batches()[1]["tokens"])
    got, want = np.asarray(student(tokens)), np.asarray(lora.merge_lora(student)(tokens))
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()  # no dropout outside the step
