"""Train step: 1 device == 8 devices (fsdp=4 x tensor=2), accumulation == big batch, one compile."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget_jax.config import OptimSection, ScheduleSection
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.state import init_state
from qtarget_jax.train.step import jit_train_step, split_microbatches
from tests.train.tiny_lm import RULES, TinyLM, ce_loss, make_batch


def run_steps(sizes, microbatches=1, steps=3, devices=None, batches=None,
              compute_dtype=np.float32):
    mesh = mesh_lib.make_mesh(sizes, devices)
    tx, sched = make_optimizer(OptimSection(lr=1e-2, weight_decay=0.1, clip_norm=1.0),
                               ScheduleSection(warmup_steps=1), steps)
    built = init_state(TinyLM(rngs=nnx.Rngs(0)), tx, mesh, RULES, seed=0)
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh),
                          graphdef=built.graphdef, loss_fn=ce_loss, tx=tx, schedule=sched,
                          microbatches=microbatches, compute_dtype=compute_dtype)
    state, losses = built.state, []
    for i in range(steps):
        batch = batches[i] if batches else make_batch(i)
        state, metrics = step(state, mesh_lib.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses, step


def test_one_vs_eight_devices_same_losses():
    assert jax.device_count() == 8
    _, one, _ = run_steps({"data": 1}, devices=jax.devices()[:1])
    state, eight, step = run_steps({"data": -1, "fsdp": 4, "tensor": 2})
    np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)
    assert one[-1] < one[0]  # it learns
    assert step._cache_size() == 1  # compiled once across steps
    emb = state.params["embed"].sharding.spec
    assert tuple(emb) == ("tensor", "fsdp"), emb


def test_accumulated_equals_big_batch():
    _, big, _ = run_steps({"data": -1, "fsdp": 4, "tensor": 2}, microbatches=1)
    _, acc, _ = run_steps({"data": -1, "fsdp": 4, "tensor": 2}, microbatches=2)
    # Microbatches with unequal token counts: only the global token mean makes these agree.
    np.testing.assert_allclose(big, acc, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_tracks_float32_and_keeps_f32_master_weights():
    _, f32, _ = run_steps({"data": 1}, devices=jax.devices()[:1])
    state, bf16, _ = run_steps({"data": 1}, devices=jax.devices()[:1],
                               compute_dtype=jnp.bfloat16)
    np.testing.assert_allclose(bf16, f32, rtol=2e-2)
    assert bf16 != f32  # the cast happened
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_split_microbatches_keeps_rows():
    x = np.arange(8)[:, None] * np.ones((1, 3), np.int32)
    out = split_microbatches({"x": x}, 2)["x"]
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 2, 4, 6])
    with pytest.raises(ValueError, match="microbatches=3"):
        split_microbatches({"x": x}, 3)
