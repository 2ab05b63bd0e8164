"""Every preset against its original loss, written independently of the library.

The Q-target loss and the original loss differ in value by terms that are constant in z (Q is
stop-gradient), so the contract is: equal gradients with respect to the logits, and for losses
that are themselves cross-entropies with a fixed target (SFT, label smoothing, distillation), equal
values too. The references are numpy / optax / plain jax.nn math: none of them imports the library.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qtarget_jax import targets
from qtarget_jax.targets import get_preset, qtarget_loss_sums

B, T, V = 2, 5, 13


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(B, T, V)) * 2.0, dtype)
    teacher = jnp.asarray(rng.normal(size=(B, T, V)) * 2.0, dtype)
    labels = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(B, T)), dtype)
    return logits, teacher, labels, weights


def _log_p_y(z, y):
    return jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], -1)[..., 0]


sg = jax.lax.stop_gradient


def _ref_guided(z, zt, eta, temp=1.0):
    log_pi = (1 - eta) * jax.nn.log_softmax(z) + eta * jax.nn.log_softmax(zt / temp)
    return jax.nn.softmax(log_pi)


# Each entry: preset name, knobs, reference per-token loss (z, teacher, y, w) -> [B, T], and
# whether the values (not only the gradients) must match.
REFERENCES = [
    ("sft", {}, lambda z, zt, y, w: optax.softmax_cross_entropy_with_integer_labels(z, y), True),
    ("dft", {}, lambda z, zt, y, w: -sg(jnp.exp(_log_p_y(z, y))) * _log_p_y(z, y), False),
    ("p_loss", {}, lambda z, zt, y, w: -jnp.exp(_log_p_y(z, y)), False),
    ("token_weighted", {"source": "batch"}, lambda z, zt, y, w: -w * _log_p_y(z, y), False),
    ("token_weighted", {"source": "entropy"},
     lambda z, zt, y, w: -sg(-jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z), -1)
                             / jnp.log(V)) * _log_p_y(z, y), False),
    ("label_smoothing", {"epsilon": 0.2},
     lambda z, zt, y, w: optax.softmax_cross_entropy(
         z, optax.smooth_labels(jax.nn.one_hot(y, V, dtype=z.dtype), 0.2)), True),
    ("kl_anchor", {"kl_weight": 0.3},
     lambda z, zt, y, w: -_log_p_y(z, y) + 0.3 * jnp.sum(
         jax.nn.softmax(zt) * (jax.nn.log_softmax(zt) - jax.nn.log_softmax(z)), -1), False),
    ("distill", {"mix": 0.4, "teacher_temperature": 2.0},
     lambda z, zt, y, w: 0.6 * optax.softmax_cross_entropy_with_integer_labels(z, y)
     + 0.4 * optax.softmax_cross_entropy(z, jax.nn.softmax(zt / 2.0)), True),
    ("target_sft", {"eta": 0.5},
     lambda z, zt, y, w: optax.softmax_cross_entropy(
         z, sg(_q_target_sft(z, zt, y, 0.5))), True),
    ("target_sft", {"eta": 0.0},  # eta = 0 is DFT
     lambda z, zt, y, w: -sg(jnp.exp(_log_p_y(z, y))) * _log_p_y(z, y), False),
    ("target_sft", {"eta": 1.0, "teacher_temperature": 0.7, "gamma_floor": 0.2},
     lambda z, zt, y, w: optax.softmax_cross_entropy(
         z, sg(_q_target_sft(z, zt, y, 1.0, temp=0.7, floor=0.2))), True),
    ("topk", {"k": 3, "eta": 0.5},
     lambda z, zt, y, w: optax.softmax_cross_entropy(z, sg(_q_topk(z, zt, y, 3, 0.5))), True),
]


def _q_target_sft(z, zt, y, eta, temp=1.0, floor=0.0):
    p_y = jnp.clip(jnp.exp(_log_p_y(z, y)), floor, 1.0)[..., None]
    return p_y * jax.nn.one_hot(y, V, dtype=z.dtype) + (1 - p_y) * _ref_guided(z, zt, eta, temp)


def _q_topk(z, zt, y, k, eta):
    pi = _ref_guided(z, zt, eta)
    kth = jnp.sort(pi, axis=-1)[..., -k][..., None]
    pi = jnp.where(pi >= kth, pi, 0.0)
    pi = pi / pi.sum(-1, keepdims=True)
    p_y = jnp.exp(_log_p_y(z, y))[..., None]
    return p_y * jax.nn.one_hot(y, V, dtype=z.dtype) + (1 - p_y) * pi


@pytest.mark.parametrize("name,knobs,reference,values_match", REFERENCES,
                         ids=[f"{r[0]}-{r[1]}" for r in REFERENCES])
@pytest.mark.parametrize("x64", [False, True], ids=["f32", "f64"])
def test_preset_matches_original_loss(name, knobs, reference, values_match, x64):
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        tol = 1e-6 if x64 else 1e-5
        logits, teacher, labels, weights = _inputs(dtype)
        spec = get_preset(name, **knobs)
        extra = {}
        if spec.needs_teacher:
            extra["teacher_logits"] = teacher
        if spec.needs_weights:
            extra["weights"] = weights

        def ours(z):
            return qtarget_loss_sums(z, labels, None, spec, **extra)[0]

        def theirs(z):
            return jnp.sum(reference(z, teacher, labels, weights))

        chex.assert_trees_all_close(jax.grad(ours)(logits), jax.grad(theirs)(logits),
                                    atol=tol, rtol=tol)
        if values_match:
            np.testing.assert_allclose(ours(logits), theirs(logits), rtol=tol, atol=tol)


def test_dft_induced_target_closed_form():
    """The paper's check: DFT's induced target is Q[y] = 2 p_y - p_y^2, Q[k] = (1 - p_y) p_k."""
    logits, _, labels, _ = _inputs(jnp.float32)
    q = targets.induced_target(
        lambda z, y: -sg(jnp.exp(_log_p_y(z, y))) * _log_p_y(z, y), logits, labels)
    p = np.asarray(jax.nn.softmax(logits))
    p_y = np.take_along_axis(p, np.asarray(labels)[..., None], -1)
    expected = (1 - p_y) * p
    np.put_along_axis(expected, np.asarray(labels)[..., None], 2 * p_y - p_y**2, -1)
    np.testing.assert_allclose(q, expected, atol=1e-6)
    # ... and it is exactly the dft preset's target.
    np.testing.assert_allclose(
        targets.qtarget_distribution(logits, labels, "dft"), expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(targets.PRESETS))
def test_induced_target_of_preset_is_its_q(name):
    """induced_target applied to our own loss recovers the dense Q (divided by loss_scale)."""
    logits, teacher, labels, weights = _inputs(jnp.float32, seed=3)
    spec = get_preset(name)
    kw = {"teacher_logits": teacher} if spec.needs_teacher else {}
    if spec.needs_weights:
        kw["weights"] = weights

    def per_token(z, y):
        return targets.per_token_qtarget(z, y, spec, **kw)["loss"] / spec.loss_scale

    q_induced = targets.induced_target(per_token, logits, labels)
    q_dense = targets.qtarget_distribution(logits, labels, spec, **kw)
    np.testing.assert_allclose(q_induced, q_dense, atol=2e-6)


def test_every_preset_has_a_reference():
    assert {r[0] for r in REFERENCES} == set(targets.PRESETS)
