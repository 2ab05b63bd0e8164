"""Optimizer chain (schedules, decay mask) and mesh building (-1 = the rest, validation)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from qtarget_jax.config import OptimSection, ScheduleSection
from qtarget_jax.models.sharding import LOGICAL_RULES, logical_to_spec, spec_for
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.optim import decay_mask, make_optimizer, make_schedule


def test_warmup_then_cosine_and_linear():
    optim = OptimSection(lr=1.0)
    cos = make_schedule(optim, ScheduleSection("cosine", warmup_steps=4, end_lr_ratio=0.1), 14)
    np.testing.assert_allclose([cos(0), cos(2), cos(4), cos(9), cos(14)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    lin = make_schedule(optim, ScheduleSection("linear", warmup_steps=0, end_lr_ratio=0.0), 10)
    np.testing.assert_allclose([lin(0), lin(5), lin(10)], [1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="warmup_steps=20"):
        make_schedule(optim, ScheduleSection(warmup_steps=20), 10)


def test_weight_decay_skips_norms_and_biases():
    params = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
              "final_norm": {"scale": jnp.ones((2,))}, "embed_norm": {"w": jnp.ones((2, 2))}}
    mask = decay_mask(params)
    assert mask == {"layer": {"kernel": True, "bias": False}, "final_norm": {"scale": False},
                    "embed_norm": {"w": False}}
    tx, _ = make_optimizer(OptimSection(lr=0.1, weight_decay=0.5, clip_norm=None),
                           ScheduleSection("constant"), 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradient: only decoupled decay moves weights, and only the masked-in ones.
    np.testing.assert_allclose(updates["layer"]["kernel"], -0.05)
    np.testing.assert_allclose(updates["layer"]["bias"], 0.0)
    np.testing.assert_allclose(updates["final_norm"]["scale"], 0.0)


def test_clipping_bounds_global_norm():
    tx, _ = make_optimizer(OptimSection(name="sgd", lr=1.0, clip_norm=1.0),
                           ScheduleSection("constant"), 10)
    params = {"w": jnp.zeros((3, 3))}
    updates, _ = tx.update({"w": jnp.full((3, 3), 10.0)}, tx.init(params), params)
    np.testing.assert_allclose(optax.global_norm(updates), 1.0, rtol=1e-5)


@pytest.mark.parametrize("sizes, n, shape", [
    ({"data": -1}, 8, (8, 1, 1)),
    ({"data": -1, "fsdp": 4, "tensor": 2}, 8, (1, 4, 2)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
    ({"data": 1, "fsdp": 1, "tensor": 1}, 1, (1, 1, 1)),
])
def test_mesh_shape_rest(sizes, n, shape):
    assert mesh_lib.mesh_shape(sizes, n) == shape


@pytest.mark.parametrize("sizes, message", [
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 3}, "do not divide"),
    ({"data": 2, "fsdp": 2}, "set one axis to -1"),
    ({"dat": 8}, "unknown axes ['dat']"),
    ({"data": 0}, "sizes must be >= 1"),
])
def test_mesh_shape_errors(sizes, message):
    with pytest.raises(ValueError) as err:
        mesh_lib.mesh_shape(sizes, 8)
    assert message in str(err.value)


def test_one_rules_table_for_params_and_batches():
    """Params and batches are laid out by the same table (models/sharding.py), strictly."""
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": -1})
    rules = {"vocab": "tensor", "embed": "fsdp", "batch": ("data", "fsdp"), "seq": None}
    assert spec_for("w", (6, 8), ("vocab", "embed"), mesh, rules) == P("tensor", "fsdp")
    assert mesh_lib.batch_sharding(mesh, rules).spec == P(("data", "fsdp"), None)
    assert mesh_lib.batch_sharding(mesh).spec == logical_to_spec(("batch", "seq"), LOGICAL_RULES)
    with pytest.raises(ValueError, match="param w: dim 'embed' of size 6 does not divide"):
        spec_for("w", (6,), ("embed",), mesh, rules)
    with pytest.raises(ValueError, match="'mlp' has no rule"):
        spec_for("w", (8,), ("mlp",), mesh, rules)
    with pytest.raises(ValueError, match="param w .* has no logical axis names"):
        spec_for("w", (8,), None, mesh, rules)


def test_global_batch_is_sharded_over_data_and_fsdp():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = mesh_lib.global_batch({"tokens": np.arange(8 * 3).reshape(8, 3)}, mesh)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["tokens"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), np.arange(24).reshape(8, 3))
