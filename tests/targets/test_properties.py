"""Hypothesis property tests over random shapes, logits and specs."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qtarget_jax.targets import (TargetSpec, qtarget_distribution, qtarget_loss,
                                 qtarget_loss_sums)

GAMMAS = ["one", "constant", "p_y", "weights", "entropy"]
RESIDUALS = ["none", "uniform", "student", "teacher", "guided"]


@st.composite
def specs(draw):
    gamma = draw(st.sampled_from(GAMMAS))
    residual = draw(st.sampled_from(RESIDUALS))
    value = draw(st.floats(0.0, 1.0))
    floor = draw(st.floats(0.0, 1.0))
    cap = draw(st.floats(floor, 1.0))
    if residual == "none":
        gamma, value, floor, cap = "one", 1.0, 0.0, 1.0
    top_k = draw(st.integers(0, 5)) if residual in ("student", "teacher", "guided") else 0
    return TargetSpec(gamma=gamma, residual=residual, gamma_value=value, gamma_floor=floor,
                      gamma_cap=cap, eta=draw(st.floats(0.0, 1.0)), top_k=top_k,
                      teacher_temperature=draw(st.floats(0.25, 4.0)),
                      loss_scale=draw(st.floats(0.5, 2.0)))


@st.composite
def problems(draw):
    # A few shapes, so eager ops compiled for one example are reused by the next.
    b, t = draw(st.sampled_from([(1, 1), (2, 3)]))
    v = draw(st.sampled_from([2, 7, 33]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, t, v)) * scale, jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(b, t, v)) * scale, jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.uniform(size=(b, t)) < 0.8, jnp.float32)
    weights = jnp.asarray(rng.uniform(size=(b, t)), jnp.float32)
    return logits, teacher, labels, mask, weights


@settings(max_examples=40, deadline=None)
@given(spec=specs(), problem=problems())
def test_q_is_a_distribution_and_gradient_is_p_minus_q(spec, problem):
    logits, teacher, labels, mask, weights = problem
    kw = {"teacher_logits": teacher if spec.needs_teacher else None,
          "weights": weights if spec.needs_weights else None}
    q = np.asarray(qtarget_distribution(logits, labels, spec, **kw), np.float64)
    assert np.all(q >= 0)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)

    grad = jax.grad(lambda z: qtarget_loss_sums(z, labels, mask, spec, **kw)[0])(logits)
    expected = (np.asarray(jax.nn.softmax(logits)) - q) * np.asarray(mask)[..., None]
    np.testing.assert_allclose(np.asarray(grad) / spec.loss_scale, expected, atol=1e-5)

    loss, metrics = qtarget_loss(logits, labels, mask, spec, **kw)
    assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    assert float(metrics["kl_q_p"]) >= -1e-4
    assert 0.0 <= float(metrics["gamma"]) <= 1.0
