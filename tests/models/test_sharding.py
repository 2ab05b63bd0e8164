"""LOGICAL_RULES and param_shardings: every param gets its spec; non-dividing dims raise."""
import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from model_helpers import random_model, tiny_config
from qtarget_jax.models import Decoder
from qtarget_jax.models.sharding import LOGICAL_RULES, logical_to_spec, param_shardings, \
    shard_model


def _mesh(shape=(2, 2, 2)):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _abstract(cfg):
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def test_rules_table():
    rules = dict(LOGICAL_RULES)
    assert rules["vocab"] == "tensor" and rules["embed"] == "fsdp" and rules["mlp"] == "tensor"
    assert rules["head_dim"] is None and rules["layers"] is None
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(
        None, "fsdp", "tensor", None)
    with pytest.raises(ValueError, match="'experts' has no rule"):
        logical_to_spec(("experts",))


def test_param_shardings_scan():
    shardings = param_shardings(_abstract(tiny_config("qwen2_bias", scan_layers=True)), _mesh())
    specs = {".".join(map(str, p)): s.spec for p, s in nnx.to_flat_state(shardings)}
    assert specs["layers.attn.q_proj"] == P(None, "fsdp", "tensor", None)
    assert specs["layers.attn.o_proj"] == P(None, "tensor", None, "fsdp")
    assert specs["layers.attn.k_bias"] == P(None, "tensor", None)
    assert specs["layers.mlp.down_proj"] == P(None, "tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["final_norm.scale"] == P("fsdp")


def test_non_dividing_dim_raises_with_name_and_sizes():
    cfg = tiny_config("mistral_window")                # num_kv_heads = 2
    with pytest.raises(ValueError, match=r"param layers\.0\.attn\.k_proj: dim 'kv_heads' of "
                                         r"size 2 does not divide mesh axis 'tensor' of size 4"):
        param_shardings(_abstract(cfg), _mesh((1, 2, 4)))


def test_rule_to_missing_mesh_axis_raises():
    rules = tuple(r for r in LOGICAL_RULES if r[0] != "layers") + (("layers", "pipeline"),)
    with pytest.raises(ValueError, match="'pipeline', not a mesh axis"):
        param_shardings(_abstract(tiny_config("qwen2_bias", scan_layers=True)), _mesh(), rules)


def test_shard_model_places_params_and_keeps_logits():
    model = random_model(tiny_config("qwen2_bias", scan_layers=True))
    tokens = jnp.zeros((2, 6), jnp.int32)
    forward = nnx.jit(lambda m, t: m(t))
    want = forward(model, tokens)
    mesh = _mesh()
    shard_model(model, mesh)
    placed = {".".join(map(str, p)): v[...].sharding.spec
              for p, v in nnx.to_flat_state(nnx.state(model))}
    specs = {".".join(map(str, p)): s.spec
             for p, s in nnx.to_flat_state(param_shardings(model, mesh))}
    assert placed == specs
    chex.assert_trees_all_close(forward(model, tokens), want, rtol=1e-5, atol=1e-5)


def test_one_rules_table_shared_by_models_targets_and_train():
    """models.sharding re-exports the table of qtarget_jax.logical_axes (one object), and the
    fused loss's ChunkSharding takes its default axes from it (no copy of axis names)."""
    from qtarget_jax import logical_axes
    from qtarget_jax.models import sharding
    from qtarget_jax.targets import ChunkSharding
    from qtarget_jax.train import mesh as mesh_lib

    assert sharding.LOGICAL_RULES is logical_axes.LOGICAL_RULES
    rules = dict(LOGICAL_RULES)
    assert logical_axes.token_axes() == tuple(rules["batch"]) == ("data", "fsdp")
    assert logical_axes.vocab_axis() == rules["vocab"] == "tensor"
    mesh = _mesh()
    default = ChunkSharding(mesh)
    assert (default.token_axes, default.vocab_axis) == (("data", "fsdp"), "tensor")
    assert ChunkSharding.from_rules(mesh) == default
    assert mesh_lib.batch_sharding(mesh).spec == P(("data", "fsdp"), None)


@pytest.mark.parametrize("rules, token_axes, vocab_axis", [
    ((("batch", "data"), ("vocab", None)), ("data",), None),
    ((("batch", ("data", "fsdp", "tensor")), ("vocab", "tensor")),
     ("data", "fsdp", "tensor"), "tensor"),
    ((("batch", None),), (), None),
])
def test_chunk_sharding_from_other_rules(rules, token_axes, vocab_axis):
    from qtarget_jax.targets import ChunkSharding
    got = ChunkSharding.from_rules(_mesh(), rules)
    assert (got.token_axes, got.vocab_axis) == (token_axes, vocab_axis)


def test_chunk_sharding_rules_errors():
    from qtarget_jax.targets import ChunkSharding
    with pytest.raises(ValueError, match="one mesh axis, got 'vocab'"):
        ChunkSharding.from_rules(_mesh(), (("batch", "data"), ("vocab", ("fsdp", "tensor"))))
    with pytest.raises(ValueError, match="'batch' has no rule"):
        ChunkSharding.from_rules(_mesh(), (("vocab", "tensor"),))
    with pytest.raises(ValueError, match="'model' is not a mesh axis"):
        ChunkSharding.from_rules(_mesh(), (("batch", "data"), ("vocab", "model")))


def test_targets_import_neither_models_nor_train():
    import subprocess
    import sys
    code = ("import sys, qtarget_jax.targets; "
            "print(sorted({m.split('.')[1] for m in sys.modules "
            "if m.startswith('qtarget_jax.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "['logical_axes', 'targets']", out.stdout
