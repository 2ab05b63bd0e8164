"""Behaviour of the Q-target loss: exact values, masking, normalisation, accumulation, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget_jax import targets
from qtarget_jax.targets import (IGNORE_INDEX, get_preset, qtarget_distribution, qtarget_loss,
                                 qtarget_loss_sums)

V = 17


def _batch(b=3, t=6, seed=0, scale=2.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, t, V)) * scale, dtype)
    teacher = jnp.asarray(rng.normal(size=(b, t, V)) * scale, dtype)
    labels = jnp.asarray(rng.integers(0, V, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.uniform(size=(b, t)) < 0.7, jnp.float32)
    return logits, teacher, labels, mask


def _kwargs(spec, teacher, shape=None):
    kw = {}
    if spec.needs_teacher:
        kw["teacher_logits"] = teacher
    if spec.needs_weights:
        kw["weights"] = jnp.full(shape or teacher.shape[:-1], 0.5)
    return kw


class QTargetLossTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_uniform_logits_give_log_v(self):
        logits = jnp.zeros((2, 4, V))
        labels = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
        for name in ("sft", "label_smoothing", "dft", "target_sft"):
            spec = get_preset(name)
            kw = _kwargs(spec, jnp.zeros((2, 4, V)))
            loss, metrics = self.variant(
                lambda z, y, kw=kw, spec=spec: qtarget_loss(z, y, None, spec, **kw))(logits, labels)
            np.testing.assert_allclose(loss, np.log(V), rtol=1e-6)
            np.testing.assert_allclose(metrics["entropy"], np.log(V), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_is_p_minus_q(self):
        logits, teacher, labels, _ = _batch()
        for name in sorted(targets.PRESETS):
            spec = get_preset(name)
            kw = _kwargs(spec, teacher)

            @self.variant
            def grad_and_q(z, spec=spec, kw=kw):
                g = jax.grad(lambda x: qtarget_loss_sums(x, labels, None, spec, **kw)[0])(z)
                return g, qtarget_distribution(z, labels, spec, **kw)

            grad, q = grad_and_q(logits)
            chex.assert_tree_all_finite(grad)
            np.testing.assert_allclose(
                grad / spec.loss_scale, jax.nn.softmax(logits) - q, atol=2e-6, err_msg=name)
            assert float(q.min()) >= 0.0, name
            np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5, err_msg=name)

    def test_metrics_match_dense_computation(self):
        logits, teacher, labels, mask = _batch(seed=1)
        spec = get_preset("target_sft", eta=0.5)
        _, m = qtarget_loss(logits, labels, mask, spec, teacher_logits=teacher)
        q = np.asarray(qtarget_distribution(logits, labels, spec, teacher_logits=teacher), np.float64)
        logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
        p = np.exp(logp)
        w = np.asarray(mask, bool)
        kl = np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - logp), 0), -1)
        p_y = np.take_along_axis(p, np.asarray(labels)[..., None], -1)[..., 0]
        entropy = -np.sum(p * logp, -1)
        acc = (p.argmax(-1) == np.asarray(labels))
        for key, ref in [("kl_q_p", kl), ("p_y", p_y), ("gamma", p_y), ("entropy", entropy),
                         ("accuracy", acc), ("nll", -np.log(p_y))]:
            np.testing.assert_allclose(m[key], ref[w].mean(), rtol=1e-5, err_msg=key)
        assert float(m["tokens"]) == w.sum()

    def test_masked_positions_have_no_effect(self):
        logits, teacher, labels, mask = _batch(seed=2)
        spec = get_preset("target_sft")
        junk_logits = jnp.where(mask[..., None] > 0, logits, 1e3 * jnp.sign(logits))
        junk_labels = jnp.where(mask > 0, labels, 5)

        def loss(z, y):
            return qtarget_loss(z, y, mask, spec, teacher_logits=teacher)[0]

        np.testing.assert_allclose(loss(logits, labels), loss(junk_logits, junk_labels), rtol=1e-6)
        g = jax.grad(loss)(logits, labels)
        np.testing.assert_array_equal(np.asarray(g)[np.asarray(mask) == 0], 0.0)
        # -100 labels act exactly like mask 0.
        ignored = jnp.where(mask > 0, labels, IGNORE_INDEX)
        np.testing.assert_allclose(
            loss(logits, labels), qtarget_loss(logits, ignored, None, spec,
                                               teacher_logits=teacher)[0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_masked_batch_is_zero_not_nan(self):
        logits, teacher, labels, _ = _batch()
        for name in sorted(targets.PRESETS):
            spec = get_preset(name)
            kw = _kwargs(spec, teacher)
            for norm in ("token", "sequence") if name == "target_sft" else ("token",):
                fn = self.variant(lambda z, spec=spec, kw=kw, norm=norm: qtarget_loss(
                    z, labels, jnp.zeros(labels.shape), spec, normalization=norm, **kw))
                (loss, metrics), grad = fn(logits), jax.grad(lambda z: fn(z)[0])(logits)
                assert float(loss) == 0.0, (name, norm)
                np.testing.assert_array_equal(grad, 0.0)
                chex.assert_tree_all_finite(metrics)

    def test_large_logits_and_bfloat16_are_finite(self):
        logits, teacher, labels, mask = _batch(scale=1e4)
        for name in sorted(targets.PRESETS):
            spec = get_preset(name)
            for dtype in (jnp.float32, jnp.bfloat16):
                kw = _kwargs(spec, teacher.astype(dtype))
                z = logits.astype(dtype)
                loss, metrics = qtarget_loss(z, labels, mask, spec, **kw)
                grad = jax.grad(lambda x: qtarget_loss(x, labels, mask, spec, **kw)[0])(z)
                assert loss.dtype == jnp.float32
                chex.assert_tree_all_finite((loss, metrics, grad))

    def test_bfloat16_close_to_float32(self):
        logits, teacher, labels, mask = _batch()
        spec = get_preset("target_sft")
        z16, t16 = logits.astype(jnp.bfloat16), teacher.astype(jnp.bfloat16)
        l16, _ = qtarget_loss(z16, labels, mask, spec, teacher_logits=t16)
        l32, _ = qtarget_loss(z16.astype(jnp.float32), labels, mask, spec,
                              teacher_logits=t16.astype(jnp.float32))
        np.testing.assert_allclose(l16, l32, rtol=1e-6)

    def test_z_loss(self):
        logits, _, labels, mask = _batch()
        base = qtarget_loss(logits, labels, mask, get_preset("sft"))[0]
        with_z = qtarget_loss(logits, labels, mask, get_preset("sft", z_loss=1e-3))[0]
        lse = jax.nn.logsumexp(logits, -1)
        expected = base + 1e-3 * jnp.sum(jnp.square(lse) * mask) / jnp.sum(mask)
        np.testing.assert_allclose(with_z, expected, rtol=1e-6)


class NormalisationTest(chex.TestCase):

    def _token_losses(self, logits, labels):
        return np.asarray(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None],
                                               -1)[..., 0])

    def test_token_sequence_constant(self):
        logits, _, labels, mask = _batch(b=4, t=7, seed=4)
        tok = self._token_losses(logits, labels)
        m = np.asarray(mask)
        per_seq = [(tok[i] * m[i]).sum() / m[i].sum() for i in range(4) if m[i].sum() > 0]
        cases = {
            "token": (tok * m).sum() / m.sum(),
            "sequence": np.mean(per_seq),
            "constant": (tok * m).sum() / (10.0 * 4),
        }
        for norm, expected in cases.items():
            loss, _ = qtarget_loss(logits, labels, mask, "sft", normalization=norm,
                                   normalizer=10.0)
            np.testing.assert_allclose(loss, expected, rtol=1e-6, err_msg=norm)

    def test_sequence_normalisation_over_packed_segments(self):
        logits, _, labels, mask = _batch(b=2, t=8, seed=5)
        segs = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 3, 3]], jnp.int32)
        mask = mask * (segs > 0)
        tok, m, s = self._token_losses(logits, labels), np.asarray(mask), np.asarray(segs)
        means = []
        for r in range(2):
            for seg in range(1, 4):
                sel = (s[r] == seg) & (m[r] > 0)
                if sel.any():
                    means.append(tok[r][sel].mean())
        loss, _ = qtarget_loss(logits, labels, mask, "sft", normalization="sequence",
                               segment_ids=segs)
        np.testing.assert_allclose(loss, np.mean(means), rtol=1e-6)


@pytest.mark.parametrize("norm", ["token", "sequence", "constant"])
def test_accumulated_sums_equal_one_big_batch(norm):
    """Micro-batch sums / global denominator == the big batch; mean of means is biased."""
    logits, teacher, labels, _ = _batch(b=4, t=6, seed=6)
    mask = jnp.asarray([[1] * 6, [1, 0, 0, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]], jnp.float32)
    spec = get_preset("target_sft")
    kw = dict(spec=spec, normalization=norm, normalizer=6.0)

    def big(z):
        return qtarget_loss(z, labels, mask, teacher_logits=teacher, **kw)[0]

    def accumulated(z):
        sums = [qtarget_loss_sums(z[i:i + 2], labels[i:i + 2], mask[i:i + 2],
                                  teacher_logits=teacher[i:i + 2], **kw) for i in (0, 2)]
        return sum(s[0] for s in sums) / sum(s[1] for s in sums)

    np.testing.assert_allclose(accumulated(logits), big(logits), rtol=1e-6)
    chex.assert_trees_all_close(jax.grad(accumulated)(logits), jax.grad(big)(logits),
                                atol=1e-7)
    if norm == "token":
        mean_of_means = np.mean([qtarget_loss(logits[i:i + 2], labels[i:i + 2],
                                              mask[i:i + 2], teacher_logits=teacher[i:i + 2],
                                              **kw)[0] for i in (0, 2)])
        assert abs(mean_of_means - float(big(logits))) > 1e-3


def test_spec_is_static_under_jit():
    logits, teacher, labels, mask = _batch()
    fn = jax.jit(lambda z, y, m, t, spec: qtarget_loss(z, y, m, spec, teacher_logits=t),
                 static_argnames=("spec",))
    a = fn(logits, labels, mask, teacher, spec=get_preset("target_sft", eta=0.5))
    b = fn(logits, labels, mask, teacher, spec=get_preset("target_sft", eta=0.5))
    assert hash(get_preset("dft")) == hash(get_preset("dft"))
    assert fn._cache_size() == 1
    chex.assert_trees_all_equal(a, b)


def test_custom_rule_and_preset_in_a_few_lines():
    from qtarget_jax.targets import TargetSpec, register_gamma_rule, register_preset

    @register_gamma_rule("test_sqrt_p_y")
    def _sqrt(ctx):
        return jnp.sqrt(ctx.p_y)

    @register_preset("test_sqrt_dft")
    def _preset() -> TargetSpec:
        return TargetSpec(gamma="test_sqrt_p_y", residual="student", name="test_sqrt_dft")

    try:
        logits, _, labels, _ = _batch()
        q = qtarget_distribution(logits, labels, "test_sqrt_dft")
        p = jax.nn.softmax(logits)
        s = jnp.sqrt(jnp.take_along_axis(p, labels[..., None], -1))
        expected = s * jax.nn.one_hot(labels, V) + (1 - s) * p
        np.testing.assert_allclose(q, expected, atol=1e-6)
    finally:
        targets.PRESETS.pop("test_sqrt_dft")
        targets.rules.GAMMA_RULES.pop("test_sqrt_p_y")


def test_spec_from_dict_round_trip():
    spec = targets.spec_from_dict({"preset": "target_sft", "eta": 0.25, "gamma_floor": 0.1})
    assert (spec.gamma, spec.residual, spec.eta, spec.gamma_floor) == ("p_y", "guided", 0.25, 0.1)
    assert targets.TargetSpec(**spec.to_dict()) == spec
    custom = targets.spec_from_dict({"gamma": "p_y", "residual": "uniform", "gamma_floor": 0.5})
    assert custom.needs_teacher is False and custom.gamma_floor == 0.5
    assert get_preset("target_sft", eta=0.0).needs_teacher is False
    assert get_preset("target_sft", eta=0.5).needs_teacher is True
