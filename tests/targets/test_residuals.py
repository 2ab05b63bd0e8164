"""Each residual kind's home (targets/residuals.py) against numpy on whole rows.

Statistics are accumulated over two vocabulary blocks through `row_stats.update_stats`; each
kind's <pi, z>-based cross-entropy, H(pi), pi_y and tile pi are compared with pi written out in
numpy, and its saved rows with the shapes it declares (fused_blocks builds shard_map specs
from them).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget_jax.targets import TargetSpec
from qtarget_jax.targets.residuals import RESIDUALS, TopK
from qtarget_jax.targets.row_stats import ROW_STAT_RESIDUALS, RowPlan, init_stats, update_stats

N, V, ETA, K = 5, 13, 0.3, 4
RNG = np.random.default_rng(0)
Z, T = RNG.normal(size=(N, V)), RNG.normal(size=(N, V))
LABELS = np.array([0, 4, 12, 7, -100])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top(x, k):
    keep = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    pi = np.zeros_like(x)
    np.put_along_axis(pi, keep, _softmax(np.take_along_axis(x, keep, -1)), -1)
    return pi


CASES = {  # name: (TargetSpec kwargs, the residual pi [N, V] in numpy)
    "uniform": (dict(residual="uniform"), np.full((N, V), 1.0 / V)),
    "student": (dict(residual="student"), _softmax(Z)),
    "teacher": (dict(residual="teacher"), _softmax(T)),
    "guided": (dict(residual="guided", eta=ETA), _softmax((1 - ETA) * Z + ETA * T)),
    "top_k_teacher": (dict(residual="teacher", top_k=K), _top(T, K)),
    "top_k_guided": (dict(residual="guided", eta=ETA, top_k=K), _top((1 - ETA) * Z + ETA * T, K)),
    "top_k_student": (dict(residual="student", top_k=K), _top(Z, K)),
}


def test_every_row_statistics_residual_has_a_home():
    assert set(ROW_STAT_RESIDUALS) == {"none"} | set(RESIDUALS)
    assert RowPlan(TargetSpec(gamma="one", residual="none"), V).kind == "uniform"
    assert RowPlan(TargetSpec(gamma="p_y", residual="guided", eta=0.0), V).kind == "student"


@pytest.mark.parametrize("name", sorted(CASES))
def test_residual_statistics_equal_numpy(name):
    kwargs, pi = CASES[name]
    plan = RowPlan(TargetSpec(gamma="p_y", **kwargs), V)
    assert isinstance(plan.residual, TopK) == ("top_k" in kwargs)
    z, t = jnp.asarray(Z, jnp.float32), jnp.asarray(T, jnp.float32)
    index = jnp.asarray(np.where(LABELS >= 0, LABELS, -1), jnp.int32)
    st = init_stats(plan, N, jnp.float32)
    for cols in (np.arange(0, 8), np.arange(8, V)):     # two vocabulary blocks
        st = update_stats(plan, st, z[:, cols], t[:, cols], jnp.asarray(cols, jnp.int32),
                          jnp.ones(len(cols), bool), index)
    log_p = Z - np.log(np.exp(Z).sum(-1, keepdims=True))
    in_range = (LABELS >= 0) & (LABELS < V)
    entropy = -(np.exp(log_p) * log_p).sum(-1)
    row = {"lse": jnp.log(jnp.sum(jnp.exp(z), -1)), "entropy": jnp.asarray(entropy, jnp.float32),
           "zy": jnp.asarray(np.where(in_range, Z[np.arange(N), LABELS % V], 0.0), jnp.float32),
           "p_y": jnp.asarray(np.exp(log_p[np.arange(N), LABELS % V]), jnp.float32),
           "in_range": jnp.asarray(in_range), "labels": jnp.asarray(LABELS, jnp.int32)}
    cross, h_pi, pi_y, saved = plan.residual.finish(plan, st, row)
    np.testing.assert_allclose(cross, -(pi * log_p).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(h_pi, -(pi * np.log(np.where(pi > 0, pi, 1))).sum(-1),
                               rtol=1e-5, atol=1e-6)
    want_y = np.where(in_range, pi[np.arange(N), LABELS % V], 0.0)
    if name == "uniform":
        want_y = np.full(N, 1.0 / V)                  # uniform's pi_y does not look at y
    np.testing.assert_allclose(pi_y, want_y, rtol=1e-5, atol=1e-7)
    assert {k: v.ndim for k, v in saved.items()} == plan.residual.saved_ndims(plan)
    saved = {"lse": row["lse"], **saved}
    tile = plan.residual.pi(plan, saved, z, t, jnp.arange(V, dtype=jnp.int32),
                            jnp.exp(z - row["lse"][:, None]))
    np.testing.assert_allclose(np.broadcast_to(tile, (N, V)), pi, rtol=1e-5, atol=1e-7)
