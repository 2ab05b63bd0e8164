"""The fused loss equals `qtarget_loss_sums(hidden @ lm_head, ...)`: value, dh, dW, metrics.

The reference is the unfused library loss on materialised logits (autodiff through
`per_token_qtarget`), plus an independent numpy cross-entropy for plain SFT. Sizes are tiny and
odd (N = 37 tokens, V = 101, chunks of 8) so padding and partial chunks are exercised; each
test compiles a handful of functions at most.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget_jax.targets import (
    PRESETS, fused_qtarget_loss, fused_qtarget_loss_sums, get_preset, qtarget_loss,
    qtarget_loss_sums)

N, D, V, DT, CHUNK = 37, 16, 101, 12, 8
RTOL_F32 = 1e-5


def _inputs(n=N, d=D, v=V, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    arrays = {
        "h": rng.normal(size=(n, d)), "w": rng.normal(size=(d, v)) * 0.4,
        "th": rng.normal(size=(n, DT)), "tw": rng.normal(size=(DT, v)) * 0.4,
    }
    out = {k: jnp.asarray(a, dtype) for k, a in arrays.items()}
    labels = rng.integers(0, v, size=n)
    labels[3] = -100
    out["labels"] = jnp.asarray(labels, jnp.int32)
    out["mask"] = jnp.asarray(rng.uniform(size=n) > 0.25, jnp.float32)
    out["weights"] = jnp.asarray(rng.uniform(size=n), jnp.float32)
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _pair(spec, x, logits_fn=jnp.matmul, chunk=CHUNK, **kw):
    """run(h, w) -> ((loss, metrics), (dh, dW)) of the unfused and of the fused loss."""
    extra = {"weights": x["weights"]} if spec.needs_weights else {}

    def unfused(h, w):
        teacher = logits_fn(x["th"], x["tw"]) if spec.needs_teacher else None
        return qtarget_loss(logits_fn(h, w), x["labels"], x["mask"], spec,
                            teacher_logits=teacher, **extra, **kw)

    def fused(h, w):
        teacher = ({"teacher_hidden": x["th"], "teacher_lm_head": x["tw"]}
                   if spec.needs_teacher else {})
        return fused_qtarget_loss(h, w, x["labels"], x["mask"], spec, chunk_size=chunk,
                                  **teacher, **extra, **kw)

    def run(h, w):
        grad = lambda f: jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)  # noqa: E731
        return grad(unfused), grad(fused)

    return run


@pytest.fixture(scope="module")
def preset_results():
    """Every preset's unfused and fused results, from one compiled function."""
    x = _inputs()
    run_all = jax.jit(lambda h, w: {name: _pair(get_preset(name), x)(h, w) for name in PRESETS})
    return run_all(x["h"], x["w"])


def _assert_close(ref, got, rtol):
    (l_ref, m_ref), g_ref = ref
    (l_got, m_got), g_got = got
    assert _rel(l_got, l_ref) <= rtol, (float(l_got), float(l_ref))
    for name, a, b in (("dh", g_got[0], g_ref[0]), ("dW", g_got[1], g_ref[1])):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert np.all(np.isfinite(np.asarray(a, np.float32))), name
        assert _rel(a, b) <= rtol, (name, _rel(a, b))
    assert set(m_got) == set(m_ref)
    for name in m_ref:
        assert _rel(m_got[name], m_ref[name]) <= rtol, (name, m_got[name], m_ref[name])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_matches_unfused_float32(name, preset_results):
    """Loss, dh, dW and metrics within 1e-5 relative; N=37, V=101 are not multiples of C=8."""
    ref, got = preset_results[name]
    _assert_close(ref, got, RTOL_F32)


def test_sft_against_numpy_cross_entropy():
    x = _inputs()
    loss, _ = jax.jit(lambda h, w: fused_qtarget_loss(h, w, x["labels"], x["mask"], "sft",
                                                      chunk_size=CHUNK))(x["h"], x["w"])
    z = np.asarray(x["h"], np.float64) @ np.asarray(x["w"], np.float64)
    log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - z.max(-1, keepdims=True)
    labels, mask = np.asarray(x["labels"]), np.asarray(x["mask"]) > 0
    keep = mask & (labels != -100)
    nll = -log_p[np.arange(N), np.where(keep, labels, 0)]
    np.testing.assert_allclose(float(loss), nll[keep].mean(), rtol=1e-5)


def test_normalizations_with_batch_dims():
    """[B, T, D] hidden, packed segments, "sequence" and "constant" normalisation: same sums,
    denominator and gradients as the unfused loss (one compiled function for both)."""
    x = _inputs(n=3 * 13)
    b, t = 3, 13
    seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 6 + [0] * 2], b, axis=0), jnp.int32)
    spec = get_preset("target_sft")
    common = {"segment_ids": seg, "normalizer": 7.0}
    h, lab, mask = x["h"].reshape(b, t, D), x["labels"].reshape(b, t), x["mask"].reshape(b, t)
    th = x["th"].reshape(b, t, DT)

    def run(h, w, normalization):
        kw = dict(common, normalization=normalization)

        def unfused(h, w):
            s, d, m = qtarget_loss_sums(h @ w, lab, mask, spec, teacher_logits=th @ x["tw"], **kw)
            return s / d, (d, m)

        def fused(h, w):
            s, d, m = fused_qtarget_loss_sums(h, w, lab, mask, spec, teacher_hidden=th,
                                              teacher_lm_head=x["tw"], chunk_size=CHUNK, **kw)
            return s / d, (d, m)
        grad = lambda f: jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)  # noqa: E731
        return grad(unfused), grad(fused)

    both = jax.jit(lambda h, w: [run(h, w, n) for n in ("sequence", "constant")])(h, x["w"])
    for ref, got in both:
        ((l_ref, (d_ref, m_ref)), g_ref), ((l_got, (d_got, m_got)), g_got) = ref, got
        assert float(d_got) == float(d_ref)
        _assert_close(((l_ref, m_ref), g_ref), ((l_got, m_got), g_got), RTOL_F32)


def test_bfloat16_inputs():
    """bf16 hidden and head. The fused logits are bf16 x bf16 with f32 accumulation (as the
    model's own head). Against the unfused loss on the same f32-accumulated logits: 1e-5 on the
    loss and 1e-2 on the bf16 gradients (one bf16 rounding of dz before the gradient matmuls);
    against `h @ W` rounded to bf16 logits: 2e-2."""
    x = _inputs(dtype=jnp.bfloat16)
    f32_acc = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)  # noqa: E731
    specs = [get_preset("sft"), get_preset("topk")]
    results = jax.jit(lambda h, w: [(_pair(spec, x, logits_fn=f32_acc)(h, w),
                                     _pair(spec, x, logits_fn=jnp.matmul)(h, w)[0])
                                    for spec in specs])(x["h"], x["w"])
    for (ref, got), ref16 in results:
        _check_bf16(ref, got, ref16)


def _check_bf16(ref, got, ref16):
    (l_ref, _), g_ref = ref
    (l_got, _), g_got = got
    assert _rel(l_got, l_ref) <= 1e-5
    for a, b in zip(g_got, g_ref):
        assert a.dtype == jnp.bfloat16
        assert _rel(a, b) <= 1e-2
    assert _rel(l_got, ref16[0][0]) <= 2e-2
    for a, b in zip(g_got, ref16[1]):
        assert _rel(a, b) <= 2e-2


def test_all_masked_gives_zero_loss_and_zero_grads():
    x = _inputs()
    mask = jnp.zeros((N,), jnp.float32)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda h, w: fused_qtarget_loss(h, w, x["labels"], mask, "target_sft",
                                        teacher_logits=x["th"] @ x["tw"], chunk_size=CHUNK),
        (0, 1), has_aux=True))(x["h"], x["w"])
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0
    for g in grads:
        assert not np.any(np.asarray(g))


def test_teacher_gets_no_gradient_and_logits_form_agrees():
    x = _inputs()
    spec = get_preset("distill")

    def by_hidden(h, th, tw):
        return fused_qtarget_loss(h, x["w"], x["labels"], x["mask"], spec, teacher_hidden=th,
                                  teacher_lm_head=tw, chunk_size=CHUNK)[0]

    def by_logits(h, tl):
        return fused_qtarget_loss(h, x["w"], x["labels"], x["mask"], spec, teacher_logits=tl,
                                  chunk_size=CHUNK)[0]

    run = jax.jit(lambda h, th, tw: (jax.value_and_grad(by_hidden, (0, 1, 2))(h, th, tw),
                                     jax.value_and_grad(by_logits, (0, 1))(h, th @ tw)))
    (loss_h, (dh_h, dth, dtw)), (loss_l, (dh_l, dtl)) = run(x["h"], x["th"], x["tw"])
    assert _rel(loss_h, loss_l) <= RTOL_F32 and _rel(dh_h, dh_l) <= RTOL_F32
    for g in (dth, dtw, dtl):
        assert not np.any(np.asarray(g))


def test_no_value_of_shape_tokens_by_vocab_in_the_jaxpr():
    """Neither the forward nor the backward holds an [N, V] array, nor a [C, V] row chunk:
    the vocabulary-blocked path works on [C, Vb] tiles."""
    n, v, chunk = 512, 4096, 32
    h = jax.ShapeDtypeStruct((n, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, v), jnp.float32)
    labels = jnp.zeros((n,), jnp.int32)
    th = jax.ShapeDtypeStruct((n, DT), jnp.float32)
    tw = jax.ShapeDtypeStruct((DT, v), jnp.float32)
    vb = 256
    jaxpr = jax.make_jaxpr(jax.value_and_grad(
        lambda h, w, th, tw: fused_qtarget_loss(h, w, labels, None, "topk", chunk_size=chunk,
                                                vocab_block_size=vb, teacher_hidden=th,
                                                teacher_lm_head=tw)[0],
        (0, 1)))(h, w, th, tw)
    shapes = set()

    def walk(jpr):
        for eqn in jpr.eqns:
            for var in eqn.outvars:
                shapes.add(tuple(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (list, tuple)) else [param]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)
    walk(jaxpr.jaxpr)
    big = [s for s in shapes if int(np.prod(s)) >= n * v]
    assert not big, big
    assert (chunk, vb) in shapes and (chunk, v) not in shapes


class FusedEagerTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_only_matches_unfused(self):
        x = _inputs()
        fn = self.variant(lambda h, w: fused_qtarget_loss(h, w, x["labels"], x["mask"],
                                                          "label_smoothing", chunk_size=16))
        loss, metrics = fn(x["h"], x["w"])
        ref, ref_m = qtarget_loss(x["h"] @ x["w"], x["labels"], x["mask"], "label_smoothing")
        assert _rel(loss, ref) <= RTOL_F32 and _rel(metrics["nll"], ref_m["nll"]) <= RTOL_F32


@pytest.mark.parametrize("kwargs, match", [
    ({"spec": "distill"}, "needs a teacher: teacher_hidden"),
    ({"spec": "token_weighted"}, "needs per-token `weights`"),
    ({"spec": "sft", "chunk_size": 0}, "chunk_size=0"),
    ({"spec": "sft", "teacher_hidden": jnp.zeros((N, DT))}, "go together"),
    ({"spec": "distill", "teacher_logits": jnp.zeros((N, V)), "teacher_hidden":
      jnp.zeros((N, DT)), "teacher_lm_head": jnp.zeros((DT, V))}, "not both"),
    ({"spec": "distill", "teacher_hidden": jnp.zeros((N, DT)),
      "teacher_lm_head": jnp.zeros((DT, V + 1))}, "same tokenizer|differs"),
    ({"spec": "sft", "lm_head": jnp.zeros((D + 1, V))}, "lm_head"),
    ({"spec": "sft", "hidden": jnp.zeros((N + 1, D))}, "hidden"),
])
def test_errors_name_the_problem(kwargs, match):
    x = _inputs()
    args = {"hidden": x["h"], "lm_head": x["w"], "labels": x["labels"], "mask": x["mask"]}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_qtarget_loss_sums(**args)


def test_vocab_parallel_on_eight_devices_matches_one_device():
    """Mesh data=2 x fsdp=2 x tensor=2: tokens over (data, fsdp), the head's V over tensor."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from qtarget_jax.targets import ChunkSharding

    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    b, t, v = 4, 10, 102
    x = _inputs(n=b * t, v=v, seed=1)
    h, th = x["h"].reshape(b, t, D), x["th"].reshape(b, t, DT)
    lab, mask = x["labels"].reshape(b, t), x["mask"].reshape(b, t)
    spec = get_preset("topk", k=5)

    def loss(h, w, th, tw, sharding):
        return fused_qtarget_loss(h, w, lab, mask, spec, teacher_hidden=th, teacher_lm_head=tw,
                                  chunk_size=CHUNK, sharding=sharding)

    grad = jax.value_and_grad(loss, (0, 1), has_aux=True)
    (l1, m1), g1 = jax.jit(lambda *a: grad(*a, None))(h, x["w"], th, x["tw"])

    rows, cols = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P(None, "tensor"))
    args = [jax.device_put(a, s) for a, s in ((h, rows), (x["w"], cols), (th, rows),
                                              (x["tw"], cols))]
    sharded = jax.jit(lambda *a: grad(*a, ChunkSharding(mesh)),
                      out_shardings=((None, None), (rows, cols)))
    (l8, m8), g8 = sharded(*args)
    assert len(g8[1].sharding.device_set) == 8
    assert _rel(l8, l1) <= RTOL_F32
    for a, b_ in zip(g8, g1):
        assert _rel(a, b_) <= RTOL_F32
    for name in m1:
        assert _rel(m8[name], m1[name]) <= RTOL_F32, name
