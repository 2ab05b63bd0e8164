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
