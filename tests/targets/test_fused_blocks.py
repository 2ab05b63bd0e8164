"""The vocabulary-blocked fused loss: every target as row statistics, tiles that overlap.

N = 37 tokens in blocks of 8 and V = 101 in blocks of 16: the last token block and the last
vocabulary block both start early and overlap the one before, so the masking of covered rows
and columns is exercised in both passes. The reference is the unfused library loss on
materialised logits (autodiff through `per_token_qtarget`), and, for the explicit token-chunk
path, the chunked loss.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget_jax.targets import (
    PRESETS, TargetSpec, fused_path, fused_qtarget_loss, get_preset, qtarget_loss,
    register_gamma_rule, register_residual_rule)

N, D, V, DT, NB, VB = 37, 16, 101, 12, 8, 16
RTOL = 1e-5


def _inputs(n=N, d=D, v=V, seed=0):
    rng = np.random.default_rng(seed)
    x = {"h": rng.normal(size=(n, d)), "w": rng.normal(size=(d, v)) * 0.4,
         "th": rng.normal(size=(n, DT)), "tw": rng.normal(size=(DT, v)) * 0.4}
    x = {k: jnp.asarray(a, jnp.float32) for k, a in x.items()}
    labels = rng.integers(0, v, size=n)
    labels[3] = -100
    x["labels"] = jnp.asarray(labels, jnp.int32)
    x["mask"] = jnp.asarray(rng.uniform(size=n) > 0.25, jnp.float32)
    x["weights"] = jnp.asarray(rng.uniform(size=n), jnp.float32)
    return x


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _unfused(spec, x):
    extra = {"weights": x["weights"]} if spec.needs_weights else {}

    def f(h, w):
        teacher = x["th"] @ x["tw"] if spec.needs_teacher else None
        return qtarget_loss(h @ w, x["labels"], x["mask"], spec, teacher_logits=teacher,
                            **extra)
    return f


def _fused(spec, x, **kw):
    extra = {"weights": x["weights"]} if spec.needs_weights else {}
    if spec.needs_teacher:
        extra.update(teacher_hidden=x["th"], teacher_lm_head=x["tw"])

    def f(h, w):
        return fused_qtarget_loss(h, w, x["labels"], x["mask"], spec, **extra, **kw)
    return f


def _grad(f, h, w):
    return jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)


def _assert_close(ref, got, rtol=RTOL):
    (l_ref, m_ref), g_ref = ref
    (l_got, m_got), g_got = got
    assert _rel(l_got, l_ref) <= rtol, (float(l_got), float(l_ref))
    for name, a, b in (("dh", g_got[0], g_ref[0]), ("dW", g_got[1], g_ref[1])):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
        assert _rel(a, b) <= rtol, (name, _rel(a, b))
    assert set(m_got) == set(m_ref)
    for name in m_ref:
        assert _rel(m_got[name], m_ref[name]) <= rtol, (name, m_got[name], m_ref[name])


@register_gamma_rule("test_blocks_sqrt_p_y", row_stats=True)
def _sqrt_p_y(ctx):
    return jnp.sqrt(ctx.p_y)


@register_gamma_rule("test_blocks_max_logit")
def _max_logit(ctx):
    return jax.nn.sigmoid(jnp.max(ctx.logits, axis=-1))


@register_residual_rule("test_blocks_sharpened")
def _sharpened(ctx):
    return jax.nn.log_softmax(2.0 * ctx.log_p, axis=-1)


SPECS = {name: get_preset(name) for name in PRESETS}
SPECS.update({
    "topk_k20_wider_than_a_block": get_preset("topk", k=20, teacher_temperature=1.7),
    "target_sft_eta1_tau2_zloss": get_preset("target_sft", eta=1.0, teacher_temperature=2.0,
                                             z_loss=1e-2),
    "target_sft_eta0": get_preset("target_sft", eta=0.0, gamma_floor=0.2),
    "entropy_gamma_teacher": TargetSpec(gamma="entropy", residual="teacher",
                                        teacher_temperature=0.7, gamma_cap=0.9),
    "label_smoothing_scaled": TargetSpec(gamma="constant", gamma_value=0.8,
                                         residual="uniform", loss_scale=1.5, z_loss=1e-3),
    "student_topk": TargetSpec(gamma="p_y", residual="student", top_k=7),
    "token_weighted_entropy": get_preset("token_weighted", source="entropy"),
})


@pytest.fixture(scope="module")
def spec_results():
    """Every spec's unfused and vocab-blocked results, from one compiled function."""
    x = _inputs()

    def run(h, w):
        return {name: (_grad(_unfused(spec, x), h, w),
                       _grad(_fused(spec, x, chunk_size=NB, vocab_block_size=VB,
                                    path="vocab_blocks"), h, w))
                for name, spec in SPECS.items()}
    return jax.jit(run)(x["h"], x["w"])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_target_matches_unfused_with_overlapping_tiles(name, spec_results):
    """Loss, dh, dW and every metric within 1e-5 relative, N = 37 / 8 and V = 101 / 16."""
    assert fused_path(SPECS[name]) == "vocab_blocks"
    ref, got = spec_results[name]
    _assert_close(ref, got)


def test_token_chunk_path_on_request_agrees():
    x = _inputs()
    spec = get_preset("topk", k=5)
    both = jax.jit(lambda h, w: [
        _grad(_fused(spec, x, chunk_size=NB, path=p), h, w)
        for p in ("vocab_blocks", "token_chunks")])(x["h"], x["w"])
    _assert_close(both[1], both[0])


def test_float32_head_gradient_with_bfloat16_compute():
    """bf16 hidden and matmuls, float32 master head: dW is float32 (not bf16-rounded values)
    and within bf16 rounding of the float32 gradient of the bf16-rounded logits."""
    x = _inputs()
    h16 = x["h"].astype(jnp.bfloat16)
    spec = get_preset("sft")

    def fused(h, w):
        return fused_qtarget_loss(h, w, x["labels"], x["mask"], spec, chunk_size=NB,
                                  vocab_block_size=VB, compute_dtype=jnp.bfloat16)[0]

    def reference(h, w):  # float32 math on the same bf16-rounded operands
        logits = jnp.dot(h.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32))
        return qtarget_loss(logits, x["labels"], x["mask"], spec)[0]

    (_, (dh, dw)), (_, (dh_ref, dw_ref)) = jax.jit(lambda h, w: (
        jax.value_and_grad(fused, (0, 1))(h, w),
        jax.value_and_grad(reference, (0, 1))(h, w)))(h16, x["w"])
    assert dw.dtype == jnp.float32 and dh.dtype == jnp.bfloat16
    assert _rel(dw, dw_ref) <= 1e-2
    dw = np.asarray(dw)
    rounded = np.asarray(jnp.asarray(dw).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(dw != rounded) > 0.9  # float32 values, not bf16 values stored as float32


@pytest.mark.parametrize("path", ["vocab_blocks", "token_chunks"])
def test_compute_dtype_sets_the_teacher_matmul_too(path):
    """A float32 teacher head with bf16 teacher hidden states and compute_dtype=bf16 gives the
    teacher logits of the bf16-cast head (cast tile by tile), exactly; without compute_dtype
    the teacher matmul runs in the promoted dtype (float32), which differs."""
    x = _inputs()
    th16 = x["th"].astype(jnp.bfloat16)
    spec = get_preset("target_sft")

    def loss(tw, **kw):
        # The student's inputs are bf16 in every call: only the teacher matmul can differ.
        return fused_qtarget_loss(x["h"].astype(jnp.bfloat16), x["w"].astype(jnp.bfloat16),
                                  x["labels"], x["mask"],
                                  spec, teacher_hidden=th16, teacher_lm_head=tw,
                                  chunk_size=NB, vocab_block_size=VB, path=path, **kw)[0]

    got, cast, promoted = jax.jit(lambda tw: (
        loss(tw, compute_dtype=jnp.bfloat16), loss(tw.astype(jnp.bfloat16),
                                                   compute_dtype=jnp.bfloat16),
        loss(tw)))(x["tw"])
    assert float(got) == float(cast)
    assert float(promoted) != float(cast)


def test_scratch_holds_no_head_sized_buffer():
    """Value and gradient of target_sft at N=512, D=64, V=8192 with 32 x 256 tiles: XLA's
    scratch stays well below one float32 [D, V] (the token-chunk path carries one as its dW
    accumulator, and more). bfloat16 on CPU: the head is sliced as uint16 bits, which XLA's
    CPU backend copies once (0.5 of a float32 head); a float32 conversion would be 1.0 more."""
    n, d, v = 512, 64, 8192
    sds = jax.ShapeDtypeStruct
    labels = jnp.zeros((n,), jnp.int32)

    def scratch(path, dtype):
        f = jax.value_and_grad(lambda h, w, th, tw: fused_qtarget_loss(
            h, w, labels, None, "target_sft", teacher_hidden=th, teacher_lm_head=tw,
            chunk_size=32, vocab_block_size=256, path=path)[0], (0, 1))
        stats = jax.jit(f).lower(sds((n, d), dtype), sds((d, v), dtype), sds((n, DT), dtype),
                                 sds((DT, v), dtype)).compile()
        return stats.memory_analysis().temp_size_in_bytes / (d * v * 4)

    assert scratch("vocab_blocks", jnp.float32) < 0.25
    assert scratch("vocab_blocks", jnp.bfloat16) < 1.0
    assert scratch("token_chunks", jnp.float32) >= 1.0  # what the blocked path removes


def test_user_rules_choose_the_path_explicitly():
    x = _inputs()
    row_rule = TargetSpec(gamma="test_blocks_sqrt_p_y", residual="uniform")
    whole_row_gamma = TargetSpec(gamma="test_blocks_max_logit", residual="uniform")
    whole_row_residual = TargetSpec(gamma="p_y", residual="test_blocks_sharpened")
    assert fused_path(row_rule) == "vocab_blocks"
    assert fused_path(whole_row_gamma) == fused_path(whole_row_residual) == "token_chunks"

    ref = _grad(_unfused(row_rule, x), x["h"], x["w"])
    got = _grad(_fused(row_rule, x, chunk_size=NB, vocab_block_size=VB), x["h"], x["w"])
    _assert_close(ref, got)

    with pytest.raises(ValueError, match="test_blocks_sharpened.*path='token_chunks'"):
        _fused(whole_row_residual, x, path="vocab_blocks")(x["h"], x["w"])
    with pytest.warns(UserWarning, match="test_blocks_max_logit.*token-chunk path"):
        got = _grad(_fused(whole_row_gamma, x, chunk_size=NB), x["h"], x["w"])
    _assert_close(_grad(_unfused(whole_row_gamma, x), x["h"], x["w"]), got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fused(whole_row_residual, x, chunk_size=NB, path="token_chunks")(x["h"], x["w"])
    with pytest.raises(ValueError, match="path='tiles'"):
        _fused(row_rule, x, path="tiles")(x["h"], x["w"])


@pytest.mark.parametrize("names", [("sft", "label_smoothing", "dft"),
                                   ("target_sft", "topk", "kl_anchor")])
def test_eight_devices_match_one_device(names):
    """Mesh data=2 x fsdp=2 x tensor=2. N = 37 (not a multiple of the 4 token shards) and
    V = 101 (not a multiple of the 2 vocab shards) are padded; row statistics are combined
    over the tensor axis. Loss, dh, dW and metrics equal the one-device run and the unfused
    loss within 1e-5."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from qtarget_jax.targets import ChunkSharding

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    x = _inputs(seed=2)
    specs = [get_preset(n) for n in names]

    def run(h, w, sharding):
        return [(_grad(_unfused(s, x), h, w) if sharding is None else None,
                 _grad(_fused(s, x, chunk_size=4, vocab_block_size=VB, sharding=sharding), h, w))
                for s in specs]

    one = jax.jit(lambda h, w: run(h, w, None))(x["h"], x["w"])
    replicated = NamedSharding(mesh, P())  # V = 101 cannot be laid out over 2 devices
    sharded = jax.jit(lambda h, w: run(h, w, ChunkSharding(mesh)))(
        jax.device_put(x["h"], replicated), jax.device_put(x["w"], replicated))
    for name, (ref, single), (_, multi) in zip(names, one, sharded):
        _assert_close(single, multi)
        _assert_close(ref, multi)
