"""LoRA adapters on the Decoder (models/lora.py), on the scanned and unrolled layouts.

References are independent of models/lora.py: the base Decoder itself (B = 0, base view) and a
plain Decoder whose kernels are set to W + (alpha / r) A B computed in numpy.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_helpers import tiny_config
from qtarget_jax.config import ConfigError, load_config
from qtarget_jax.models import Decoder
from qtarget_jax.models import lora
from qtarget_jax.models.sharding import param_shardings
from qtarget_jax.train import mesh as mesh_lib

LAYOUTS = [("qwen2_bias", False), ("qwen2_bias", True), ("smollm2_tied", True),
           ("qwen3_qk_norm", False)]
# target -> (Block attribute, kernel, leading input dims of W), written out independently of lora.py
KERNELS = {"q": ("attn", "q_proj", 1), "k": ("attn", "k_proj", 1), "v": ("attn", "v_proj", 1),
           "o": ("attn", "o_proj", 2), "gate": ("mlp", "gate_proj", 1),
           "up": ("mlp", "up_proj", 1), "down": ("mlp", "down_proj", 1)}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)), jnp.int32)


def _pair(family, scan, targets=lora.TARGETS, rank=4, alpha=8.0):
    """(base Decoder, an independent adapted Decoder with the same base weights)."""
    cfg = tiny_config(family, scan_layers=scan)
    base = Decoder(cfg, rngs=nnx.Rngs(0))
    adapted = Decoder(cfg, rngs=nnx.Rngs(0))
    lora.add_lora(adapted, lora.LoraConfig(rank=rank, alpha=alpha, targets=tuple(targets)))
    return base, adapted


def _randomise_b(model, seed=1):
    for i, site in enumerate(lora.adapters(model)):
        ad = site.adapter
        ad.b.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(seed + i), ad.b.shape))


@pytest.mark.parametrize("family,scan", LAYOUTS)
def test_fresh_adapters_leave_logits_unchanged(family, scan):
    base, adapted = _pair(family, scan)
    assert len(lora.adapters(adapted)) == (1 if scan else 2) * len(lora.TARGETS)
    np.testing.assert_array_equal(np.asarray(adapted(TOKENS)), np.asarray(base(TOKENS)))


@pytest.mark.parametrize("family,scan", LAYOUTS)
def test_adapted_logits_equal_numpy_merged_weights(family, scan):
    """y = x W + (alpha/r) x A B, checked against a plain Decoder with W + (alpha/r) A B (numpy),
    and merge_lora gives that same Decoder."""
    base, adapted = _pair(family, scan, targets=("q", "o", "down", "v"), rank=3, alpha=6.0)
    _randomise_b(adapted)
    layers = range(base.cfg.num_layers)
    for layer in layers:
        blk = adapted.layers if scan else adapted.layers[layer]
        ref = base.layers if scan else base.layers[layer]
        for name in ("q", "o", "down", "v"):
            sub, kernel, n_in = KERNELS[name]
            ad = getattr(getattr(blk, sub), kernel + "_lora")
            a, b = np.asarray(ad.a[...]), np.asarray(ad.b[...])
            w_var = getattr(getattr(ref, sub), kernel)
            w = np.array(w_var[...])
            if scan:
                a, b, w_l = a[layer], b[layer], w[layer]
            else:
                w_l = w
            in_shape, out_shape = w_l.shape[:n_in], w_l.shape[n_in:]
            delta = (a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)).reshape(
                *in_shape, *out_shape)
            if scan:
                w[layer] = w_l + 2.0 * delta
                w_var.set_value(jnp.asarray(w))
            else:
                w_var.set_value(jnp.asarray(w_l + 2.0 * delta))
    got = np.asarray(adapted(TOKENS))
    want = np.asarray(base(TOKENS))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 1e-5
    merged = lora.merge_lora(adapted)
    assert not lora.has_lora(merged)
    assert np.abs(np.asarray(merged(TOKENS)) - want).max() / scale < 1e-5


@pytest.mark.parametrize("scan", [False, True])
def test_base_view_is_the_base_model_sharing_its_arrays(scan):
    base, adapted = _pair("qwen2_bias", scan)
    _randomise_b(adapted)
    _, _, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    view = lora.base_view(lora.base_graphdef(adapted), rest.to_pure_dict())
    np.testing.assert_array_equal(np.asarray(view(TOKENS)), np.asarray(base(TOKENS)))
    assert not np.array_equal(np.asarray(adapted(TOKENS)), np.asarray(base(TOKENS)))
    q_view = (view.layers if scan else view.layers[0]).attn.q_proj[...]
    q_own = (adapted.layers if scan else adapted.layers[0]).attn.q_proj[...]
    assert q_view is q_own  # the same array object: no copy


def test_only_adapters_are_trainable_and_init_as_peft():
    _, adapted = _pair("qwen2_bias", False, rank=8)
    assert lora.trainable_filter(adapted) is nnx.LoRAParam
    trained = nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))
    assert trained and all(str(p[-2]).endswith("_lora") and p[-1] in ("a", "b")
                           for p, _ in trained)
    ad = adapted.layers[0].mlp.down_proj_lora          # A [F, r], fan_in F = 64
    a = np.asarray(ad.a[...])
    assert a.shape == (64, 8) and np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.1
    assert np.abs(np.asarray(ad.b[...])).max() == 0


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_shard_by_their_base_weights_rules(scan):
    _, adapted = _pair("qwen2_bias", scan)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = {".".join(map(str, p)): s.spec for p, s in
             nnx.to_flat_state(param_shardings(nnx.state(adapted, nnx.LoRAParam), mesh))}
    pre = "layers." if scan else "layers.0."
    lead = (None,) if scan else ()
    assert specs[pre + "attn.q_proj_lora.a"] == jax.sharding.PartitionSpec(*lead, "fsdp", None)
    assert specs[pre + "attn.q_proj_lora.b"] == jax.sharding.PartitionSpec(
        *lead, None, "tensor", None)
    assert specs[pre + "attn.o_proj_lora.a"] == jax.sharding.PartitionSpec(
        *lead, "tensor", None, None)
    assert specs[pre + "mlp.down_proj_lora.b"] == jax.sharding.PartitionSpec(*lead, None, "fsdp")


def test_dropout_only_when_seeded_by_the_train_step():
    cfg = tiny_config("qwen2_bias")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    lora.add_lora(model, lora.LoraConfig(rank=4, dropout=0.5, targets=("q",)))
    _randomise_b(model)
    plain = np.asarray(model(TOKENS))
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), plain)  # eval: deterministic
    lora.seed_dropout(model, jax.random.key_data(jax.random.PRNGKey(3)))
    dropped = np.asarray(model(TOKENS))
    assert not np.allclose(dropped, plain)
    ad = model.layers[0].attn.q_proj_lora
    assert not np.array_equal(np.asarray(ad.key[...]),
                              np.asarray(model.layers[1].attn.q_proj_lora.key[...]))


@pytest.mark.parametrize("override,key", [
    ("lora.rank=-1", "lora.rank"), ("lora.alpha=0", "lora.alpha"),
    ("lora.dropout=1.0", "lora.dropout"), ("lora.targets=[q, x]", "lora.targets"),
    ("lora.targets=[]", "lora.targets"), ("lora.targets=[q, q]", "lora.targets"),
    ("lora.rank=abc", "lora.rank")])
def test_bad_lora_settings_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, (override,))
    assert f"{key}=" in str(err.value), str(err.value)


def test_lora_section_loads():
    cfg = load_config(None, ("lora.rank=16", "lora.targets=[q, v]")).config.lora
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.targets) == (16, 16.0, 0.0, ["q", "v"])
    assert load_config(None, ()).config.lora.rank == 0


def test_targets_come_from_the_params_rules():
    assert tuple(lora.TARGETS) == ("q", "k", "v", "o", "gate", "up", "down")
    assert {n: (t.sub, t.kernel, t.n_in) for n, t in lora.TARGETS.items()} == KERNELS
    assert lora.TARGETS["o"].peft_module(3) == "base_model.model.model.layers.3.self_attn.o_proj"
    assert lora.TARGETS["up"].peft_module(0) == "base_model.model.model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("scan", [False, True])
def test_each_adapter_comes_with_its_layer_and_target(scan):
    _, adapted = _pair("qwen2_bias", scan, targets=("down", "q"))
    got = [(s.layer, s.target.name) for s in lora.adapters(adapted)]
    want = [(None, "q"), (None, "down")] if scan else [(0, "q"), (0, "down"), (1, "q"),
                                                        (1, "down")]
    assert got == want
    for s in lora.adapters(adapted):
        block = adapted.layers if scan else adapted.layers[s.layer]
        owner = getattr(block, KERNELS[s.target.name][0])
        assert s.owner is owner
        assert s.adapter is getattr(owner, KERNELS[s.target.name][1] + "_lora")


@pytest.mark.parametrize("scan", [False, True])
def test_peft_tensor_names_and_layers(scan):
    """Names as PEFT writes them for a Llama (written out here), each layer's own A and B."""
    from qtarget_jax.models.peft_export import peft_tensors
    _, adapted = _pair("qwen2_bias", scan, targets=("o", "gate"), rank=3)
    _randomise_b(adapted)
    tensors = peft_tensors(adapted)
    pre = "base_model.model.model.layers."
    assert sorted(tensors) == sorted(
        f"{pre}{i}.{m}.lora_{x}.weight" for i in (0, 1)
        for m in ("self_attn.o_proj", "mlp.gate_proj") for x in "AB")
    for i in (0, 1):
        ad = (adapted.layers if scan else adapted.layers[i]).attn.o_proj_lora
        a, b = np.asarray(ad.a[...]), np.asarray(ad.b[...])
        a, b = (a[i], b[i]) if scan else (a, b)          # A [H, Dh, r], B [r, D]
        np.testing.assert_array_equal(tensors[f"{pre}{i}.self_attn.o_proj.lora_A.weight"],
                                      a.reshape(-1, 3).T)
        np.testing.assert_array_equal(tensors[f"{pre}{i}.self_attn.o_proj.lora_B.weight"], b.T)
    assert not np.array_equal(tensors[f"{pre}0.self_attn.o_proj.lora_B.weight"],
                              tensors[f"{pre}1.self_attn.o_proj.lora_B.weight"])


class _Wrapper(nnx.Module):
    def __init__(self, inner):
        self.inner = inner


def test_an_unrecognised_model_is_an_error_not_a_plain_model():
    _, adapted = _pair("qwen2_bias", False, targets=("q",))
    wrapped = _Wrapper(adapted)
    with pytest.raises(ValueError, match=r"inner\.layers\.0\.attn\.q_proj_lora"):
        lora.adapters(wrapped)
    with pytest.raises(ValueError, match="q_proj_lora"):
        lora.trainable_filter(wrapped)             # would otherwise train the whole base
    with pytest.raises(TypeError, match="add_lora: .*_Wrapper"):
        lora.add_lora(_Wrapper(Decoder(tiny_config("qwen2_bias"), rngs=nnx.Rngs(0))),
                      lora.LoraConfig(rank=2))
    assert lora.adapters(Decoder(tiny_config("qwen2_bias"), rngs=nnx.Rngs(0))) == []
