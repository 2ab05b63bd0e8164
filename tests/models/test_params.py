"""The HF <-> param table: bit-exact round trip, shape / missing / unexpected errors, tied
heads, and loading straight into NamedShardings on an 8-device mesh."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from model_helpers import random_hf_weights, tiny_config
from qtarget_jax.models.params import DictSource, RULES, expected_hf_shapes, export_params, \
    load_params, match, num_params
from qtarget_jax.models import ModelConfig


@pytest.mark.parametrize("family,scan", [("qwen2_bias", False), ("qwen3_qk_norm", True),
                                         ("llama3_rope_scaling", True)])
def test_round_trip_is_bit_exact(family, scan):
    cfg = tiny_config(family, scan_layers=scan)
    weights = random_hf_weights(cfg)
    exported = export_params(load_params(cfg, DictSource(weights)))
    assert sorted(exported) == sorted(weights)
    for name in weights:
        assert exported[name].dtype == np.float32, name
        np.testing.assert_array_equal(exported[name], weights[name], err_msg=name)


def test_expected_names_follow_config():
    names = set(expected_hf_shapes(tiny_config("qwen2_bias")))
    assert "model.layers.1.self_attn.k_proj.bias" in names and "lm_head.weight" in names
    names = set(expected_hf_shapes(tiny_config("qwen3_qk_norm")))
    assert "model.layers.0.self_attn.q_norm.weight" in names
    assert "lm_head.weight" not in names and not any("bias" in n for n in names)


def test_table_matches_regexes():
    rule, layer = match("model.layers.17.self_attn.q_proj.weight")
    assert (rule.ours, layer) == ("layers.{i}.attn.q_proj", 17)
    assert match("model.layers.1.self_attn.q_proj.weight.extra") is None
    assert {r.hf for r in RULES} >= {"model.embed_tokens.weight", "lm_head.weight"}


def test_shape_mismatch_names_tensor_and_shapes():
    cfg = tiny_config("qwen2_bias")
    weights = random_hf_weights(cfg)
    weights["model.layers.1.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: "
                                         r"checkpoint shape \(8, 32\) != expected \(16, 32\)"):
        load_params(cfg, DictSource(weights))


def test_missing_and_unexpected_listed_together():
    cfg = tiny_config("llama3_rope_scaling", scan_layers=True)
    weights = random_hf_weights(cfg)
    del weights["model.layers.1.mlp.up_proj.weight"]
    del weights["model.norm.weight"]
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # ignored
    weights["model.layers.2.mlp.up_proj.weight"] = np.zeros((64, 32), np.float32)
    weights["vision_tower.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        load_params(cfg, DictSource(weights))
    msg = str(err.value)
    for part in ("layers.mlp.up_proj[layer 1]", "final_norm.scale",
                 "model.layers.2.mlp.up_proj.weight", "vision_tower.weight"):
        assert part in msg, msg
    assert "inv_freq" not in msg


def test_tied_head_absent_or_equal():
    cfg = tiny_config("smollm2_tied")
    weights = random_hf_weights(cfg)
    assert "lm_head.weight" not in weights
    model = load_params(cfg, DictSource(weights))
    np.testing.assert_array_equal(np.asarray(model.lm_head_kernel()),
                                  weights["model.embed_tokens.weight"].T)
    same = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    load_params(cfg, DictSource(same))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_params(cfg, DictSource({**weights, "lm_head.weight": 2 * same["lm_head.weight"]}))


def test_untied_head_required():
    cfg = tiny_config("qwen2_bias")
    weights = random_hf_weights(cfg)
    del weights["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing.*\n  lm_head"):
        load_params(cfg, DictSource(weights))


def test_param_dtype_override():
    cfg = tiny_config("qwen3_qk_norm")
    model = load_params(cfg, DictSource(random_hf_weights(cfg)), param_dtype="bfloat16")
    assert model.cfg.param_dtype == "bfloat16"
    assert model.layers[0].attn.q_proj[...].dtype == jnp.bfloat16


@pytest.mark.parametrize("scan", [False, True])
def test_load_onto_mesh(scan):
    """Each param lands in its LOGICAL_RULES sharding; values equal the unsharded load."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    cfg = tiny_config("qwen2_bias", scan_layers=scan)

    class CountingSource(DictSource):
        reads: dict = {}

        def read(self, name):
            self.reads[name] = self.reads.get(name, 0) + 1
            return super().read(name)

    weights = random_hf_weights(cfg)
    source = CountingSource(weights)
    model = load_params(cfg, source, mesh=mesh)
    assert max(source.reads.values()) == 1, "a tensor was read more than once"
    q = model.layers.attn.q_proj[...] if scan else model.layers[0].attn.q_proj[...]
    want = P(None, "fsdp", "tensor", None) if scan else P("fsdp", "tensor", None)
    assert q.sharding.spec == want
    assert model.embedder.embedding[...].sharding.spec == P("tensor", "fsdp")
    chex.assert_trees_all_equal(export_params(model), export_params(
        load_params(cfg, DictSource(weights))))


# Published parameter counts (model cards / safetensors index totals). A failure means the
# architecture or a preset no longer matches the real checkpoints.
PUBLISHED = {"smollm2_135m": 134_515_008, "llama2_7b": 6_738_415_616,
             "llama3_8b": 8_030_261_248, "llama32_1b": 1_235_814_400,
             "mistral_7b": 7_241_732_096, "qwen25_7b": 7_615_616_512,
             "qwen3_0_6b": 596_049_920}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_num_params_of_published_models(preset):
    cfg = getattr(ModelConfig, preset)(scan_layers=True)
    assert num_params(cfg) == PUBLISHED[preset]


@pytest.mark.parametrize("scan", [False, True])
def test_load_onto_mesh_reads_only_slices(scan):
    """A source with read_slice is never read whole; each distinct shard slice is read once."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    cfg = tiny_config("qwen2_bias", scan_layers=scan)

    class SlicingSource(DictSource):
        whole: list = []
        sliced: list = []

        def read(self, name):
            self.whole.append(name)
            return super().read(name)

        def read_slice(self, name, index):
            self.sliced.append((name, index))
            return super().read(name)[index]

    weights = random_hf_weights(cfg)
    source = SlicingSource(weights)
    model = load_params(cfg, source, mesh=mesh)
    assert source.whole == []
    q_reads = [i for n, i in source.sliced if n == "model.layers.0.self_attn.q_proj.weight"]
    # q_proj [D, H, Dh] on (fsdp=2, tensor=2): 4 distinct boxes of HF [H*Dh, D], 16 x 16 each.
    assert len(q_reads) == 4
    assert all((i[0].stop - i[0].start, i[1].stop - i[1].start) == (16, 16) for i in q_reads)
    chex.assert_trees_all_equal(export_params(model), weights)
