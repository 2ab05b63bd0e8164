"""Q-targets as per-row statistics: what the vocabulary-blocked fused loss keeps per token.

With student logits z [V], teacher logits t [V] (already divided by the temperature tau),
u = (1 - eta) z + eta t (the guided mixture up to a per-row constant), label y:

    lse     = LSE(z)                    p = exp(z - lse)
    entropy = lse - sum_v p_v z_v       (running sum of e^(z - m) z)
    H(pi, p) = lse - <pi, z>            for any residual pi (sum_v pi_v = 1)

so every built-in residual is a handful of running sums over vocabulary blocks:

    kind      <pi, z>                    H(pi)                         pi_y
    uniform   sum z / V                  log V                         1 / V
    student   <p, z>                     entropy                       p_y
    teacher   sum e^(t-m_t) z / s_t      lse_t - sum e^(t-m_t) t / s_t  e^(t_y - lse_t)
    guided    sum e^(u-m_u) z / s_u      lse_u - sum e^(u-m_u) u / s_u  e^(u_y - lse_u)
    top-k     sum_k pi_k z_k             -sum_k pi_k log pi_k           pi at y if kept

(top-k: a running top-k of the residual's ranking key, z, t or u, with the student logit at each
kept index; pi = softmax of the kept keys). Each sum is kept with a running max m and rescaled
when m grows (online logsumexp); across vocabulary shards the partial statistics are combined
with pmax / psum (and an all-gather of the k candidates).

The gradient of loss_scale * H(Q, p) + z_loss * lse^2 with respect to z is closed-form:
loss_scale * (p - Q) + 2 z_loss lse p, Q = gamma onehot(y) + (1 - gamma) pi, so a block of it
needs only the row statistics and the block's logits (`tile_grad`).

A gamma rule is evaluated here when it was registered with `row_stats=True` (it reads only
p_y, entropy, weights); a residual when it is one of `ROW_STAT_RESIDUALS`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from qtarget_jax.targets import rules
from qtarget_jax.targets.losses import rule_gamma, target_terms
from qtarget_jax.targets.spec import TargetSpec

ROW_STAT_RESIDUALS = ("none", "uniform", "student", "teacher", "guided")

sg = jax.lax.stop_gradient


def unsupported_reason(spec: TargetSpec) -> Optional[str]:
    """Why `spec` cannot be written as row statistics, or None when it can."""
    reasons = []
    if not rules.GAMMA_RULES[spec.gamma].row_stats:
        reasons.append(f"gamma rule {spec.gamma!r} was registered without row_stats=True")
    if spec.residual not in ROW_STAT_RESIDUALS:
        reasons.append(f"residual rule {spec.residual!r} is not one of the row-statistics "
                       f"residuals {ROW_STAT_RESIDUALS}")
    return "; ".join(reasons) or None


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """Static description of a target's row statistics (hashable).

    Attributes:
      spec: the target.
      vocab: V, the full (unsharded, unpadded) vocabulary size.
      kind: "uniform" | "student" | "teacher" | "guided".
      top_k: k of the residual's top-k (0 = the whole residual).
    """
    spec: TargetSpec
    vocab: int

    @property
    def kind(self) -> str:
        residual = self.spec.residual
        if residual in ("none", "uniform"):
            return "uniform"
        if residual == "guided" and self.spec.eta == 0:
            return "student"
        return residual

    @property
    def needs_teacher(self) -> bool:
        return self.kind in ("teacher", "guided")

    @property
    def top_k(self) -> int:
        return min(self.spec.top_k, self.vocab) if self.spec.top_k else 0


def init_stats(plan: RowPlan, n: int, dtype) -> dict[str, jax.Array]:
    """Empty statistics of n rows: running maxima -inf, sums 0."""
    neg = jnp.full((n,), -jnp.inf, dtype)
    zero = jnp.zeros((n,), dtype)
    st = {"m": neg, "s": zero, "a": zero, "zy": zero, "amax_v": neg,
          "amax_i": jnp.zeros((n,), jnp.int32)}
    if plan.needs_teacher:
        st["ty"] = zero
    if plan.top_k:
        k = plan.top_k
        st.update(kv=jnp.full((n, k), -jnp.inf, dtype),
                  ki=jnp.full((n, k), plan.vocab, jnp.int32), kz=jnp.zeros((n, k), dtype))
    elif plan.kind == "uniform":
        st["sz"] = zero
    elif plan.kind == "teacher":
        st.update(mt=neg, st=zero, bt=zero, ct=zero)
    elif plan.kind == "guided":
        st.update(mu=neg, su=zero, bu=zero, cu=zero)
    return st


def _online(m, s, x, sums, values):
    """One block of an online logsumexp: (m, s, sums) after the block x [n, Vb] (-inf = skip).

    sums[i] accumulates sum_v e^(x_v - m) values[i]_v; where e^(x - m) is 0 the product is 0
    (a -inf teacher logit adds nothing instead of 0 * -inf = NaN).
    """
    m_new = jnp.maximum(m, jnp.max(x, axis=-1))
    ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(m - ref)
    e = jnp.exp(x - ref[:, None])
    s = s * alpha + jnp.sum(e, axis=-1)
    sums = [acc * alpha + jnp.sum(jnp.where(e > 0, e * v, 0.0), axis=-1)
            for acc, v in zip(sums, values)]
    return m_new, s, sums


def update_stats(plan: RowPlan, st, z, t, cols, colmask, index):
    """Statistics after one [n, Vb] block.

    Args:
      st: the running statistics (`init_stats`).
      z: [n, Vb] student logits (float32 / float64).
      t: [n, Vb] teacher logits / temperature, or None.
      cols: [Vb] int32 global vocabulary ids of the block's columns.
      colmask: [Vb] bool, columns that count (not padding, not seen in an earlier block).
      index: [n] int32 label column (-1 = none).
    """
    st = dict(st)
    keep = colmask[None, :]
    zm = jnp.where(keep, z, -jnp.inf)
    st["m"], st["s"], (st["a"],) = _online(st["m"], st["s"], zm, [st["a"]], [z])
    is_y = keep & (cols[None, :] == index[:, None])
    st["zy"] = st["zy"] + jnp.sum(jnp.where(is_y, z, 0.0), axis=-1)
    # argmax: first occurrence within the block, and only a strictly larger value replaces the
    # running one, so ties resolve to the lowest vocabulary id as jnp.argmax does.
    pos = jnp.argmax(zm, axis=-1)
    bv = jnp.max(zm, axis=-1)
    better = bv > st["amax_v"]
    st["amax_v"] = jnp.where(better, bv, st["amax_v"])
    st["amax_i"] = jnp.where(better, cols[pos], st["amax_i"])
    if plan.needs_teacher:
        st["ty"] = st["ty"] + jnp.sum(jnp.where(is_y, t, 0.0), axis=-1)
    if plan.kind == "guided":
        eta = plan.spec.eta
        u = (1.0 - eta) * z + eta * t
    if plan.top_k:
        key = {"student": z, "teacher": t, "guided": None}[plan.kind]
        key = u if key is None else key
        cat_v = jnp.concatenate([st["kv"], jnp.where(keep, key, -jnp.inf)], axis=-1)
        cat_i = jnp.concatenate([st["ki"], jnp.broadcast_to(cols, z.shape)], axis=-1)
        cat_z = jnp.concatenate([st["kz"], z], axis=-1)
        st["kv"], top = jax.lax.top_k(cat_v, plan.top_k)
        st["ki"] = jnp.take_along_axis(cat_i, top, axis=-1)
        st["kz"] = jnp.take_along_axis(cat_z, top, axis=-1)
    elif plan.kind == "uniform":
        st["sz"] = st["sz"] + jnp.sum(jnp.where(keep, z, 0.0), axis=-1)
    elif plan.kind == "teacher":
        tm = jnp.where(keep, t, -jnp.inf)
        st["mt"], st["st"], (st["bt"], st["ct"]) = _online(
            st["mt"], st["st"], tm, [st["bt"], st["ct"]], [t, z])
    elif plan.kind == "guided":
        um = jnp.where(keep, u, -jnp.inf)
        st["mu"], st["su"], (st["bu"], st["cu"]) = _online(
            st["mu"], st["su"], um, [st["bu"], st["cu"]], [u, z])
    return st


def _combine_lse(m, sums, axis):
    m_all = jax.lax.pmax(m, axis)
    ref = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    alpha = jnp.exp(m - ref)
    return m_all, [jax.lax.psum(x * alpha, axis) for x in sums]


def combine_stats(plan: RowPlan, st, axis: Optional[str]):
    """Statistics of whole rows from per-shard statistics (vocabulary sharded over `axis`)."""
    if axis is None:
        return st
    st = dict(st)
    st["m"], (st["s"], st["a"]) = _combine_lse(st["m"], [st["s"], st["a"]], axis)
    for key in ("zy", "ty", "sz"):
        if key in st:
            st[key] = jax.lax.psum(st[key], axis)
    best = jax.lax.pmax(st["amax_v"], axis)
    big = jnp.iinfo(jnp.int32).max
    st["amax_i"] = jax.lax.pmin(jnp.where(st["amax_v"] == best, st["amax_i"], big), axis)
    st["amax_v"] = best
    if plan.top_k:
        # Shard-major candidates: ties go to the lower vocabulary id, as lax.top_k's.
        cat = {k: jax.lax.all_gather(st[k], axis, axis=1, tiled=True) for k in ("kv", "ki", "kz")}
        st["kv"], top = jax.lax.top_k(cat["kv"], plan.top_k)
        st["ki"] = jnp.take_along_axis(cat["ki"], top, axis=-1)
        st["kz"] = jnp.take_along_axis(cat["kz"], top, axis=-1)
    elif plan.kind == "teacher":
        st["mt"], (st["st"], st["bt"], st["ct"]) = _combine_lse(
            st["mt"], [st["st"], st["bt"], st["ct"]], axis)
    elif plan.kind == "guided":
        st["mu"], (st["su"], st["bu"], st["cu"]) = _combine_lse(
            st["mu"], [st["su"], st["bu"], st["cu"]], axis)
    return st


def _lse(m, s):
    return jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(s)


def finish(plan: RowPlan, st, labels, valid, weights):
    """Per-row loss, diagnostics and what the backward pass needs, from whole-row statistics.

    Args:
      st: combined statistics of n rows.
      labels: [n] int; valid: [n] bool; weights: [n] or None (gamma weights).

    Returns:
      (terms, saved): terms has `loss` and `METRIC_NAMES` ([n] each, as `per_token_qtarget`);
      saved has `lse`, `gamma` and the residual's normaliser (lse_t / lse_u, or the top-k
      probabilities and ids), [n] or [n, k].
    """
    spec, vocab = plan.spec, plan.vocab
    dtype = st["s"].dtype
    lse = _lse(st["m"], st["s"])
    in_range = (labels >= 0) & (labels < vocab)
    # A supervised label outside [0, V) poisons the loss with NaN, as the unfused loss.
    zy = jnp.where(in_range, st["zy"], jnp.where(valid, jnp.nan, 0.0))
    log_p_y = zy - lse
    p_y = jnp.exp(log_p_y)
    entropy = lse - st["a"] / st["s"]
    ctx = rules.RowContext(logits=None, log_p=None, p_y=sg(p_y), entropy=sg(entropy),
                           teacher_logits=None, weights=None if weights is None else sg(weights),
                           spec=spec, vocab=vocab)
    gamma = rule_gamma(ctx, spec, dtype)
    saved = {"lse": lse, "gamma": gamma}
    if plan.top_k:
        probs = jax.nn.softmax(st["kv"], axis=-1)
        cross = -jnp.sum(probs * (st["kz"] - lse[:, None]), axis=-1)
        h_pi = -jnp.sum(xlogy(probs, probs), axis=-1)
        pi_y = jnp.sum(jnp.where(st["ki"] == labels[:, None], probs, 0.0), axis=-1)
        saved.update(probs=probs, ki=st["ki"])
    elif plan.kind == "uniform":
        cross = lse - st["sz"] / vocab
        h_pi = jnp.full(lse.shape, jnp.log(vocab), dtype)
        pi_y = jnp.full(lse.shape, 1.0 / vocab, dtype)
    elif plan.kind == "student":
        cross, h_pi, pi_y = entropy, entropy, p_y
    elif plan.kind == "teacher":
        lse_t = _lse(st["mt"], st["st"])
        cross = lse - st["ct"] / st["st"]
        h_pi = lse_t - st["bt"] / st["st"]
        pi_y = jnp.exp(st["ty"] - lse_t)
        saved["lse_t"] = lse_t
    else:
        eta = spec.eta
        lse_u = _lse(st["mu"], st["su"])
        cross = lse - st["cu"] / st["su"]
        h_pi = lse_u - st["bu"] / st["su"]
        pi_y = jnp.exp((1.0 - eta) * zy + eta * st["ty"] - lse_u)
        saved["lse_u"] = lse_u
    if plan.needs_teacher or plan.kind == "student":
        pi_y = jnp.where(in_range, pi_y, 0.0)
    t = target_terms(spec, gamma, log_p_y, lse, cross, h_pi, pi_y)
    terms = {"loss": t["loss"], "gamma": gamma, "p_y": sg(p_y),
             "accuracy": (st["amax_i"] == labels).astype(dtype), "entropy": sg(entropy),
             "kl_q_p": sg(t["kl"]), "nll": sg(t["nll"])}
    return terms, saved


def tile_grad(plan: RowPlan, saved, z, t, cols, index, scale):
    """d(sum_rows scale * loss) / dz on one [n, Vb] block, closed form (before masking).

    Args:
      saved: `finish`'s saved rows for the block's n rows.
      z: [n, Vb] student logits; t: [n, Vb] teacher logits / temperature or None.
      cols: [Vb] global vocabulary ids; index: [n] label column (-1 = none).
      scale: [n] the cotangent times the token weight (0 for rows that do not count).
    """
    spec = plan.spec
    lse, gamma = saved["lse"][:, None], saved["gamma"][:, None]
    p = jnp.exp(z - lse)
    if plan.top_k:
        pi = jnp.zeros_like(z)
        for j in range(plan.top_k):
            pi = pi + jnp.where(cols[None, :] == saved["ki"][:, j:j + 1],
                                saved["probs"][:, j:j + 1], 0.0)
    elif plan.kind == "uniform":
        pi = 1.0 / plan.vocab
    elif plan.kind == "student":
        pi = p
    elif plan.kind == "teacher":
        pi = jnp.exp(t - saved["lse_t"][:, None])
    else:
        eta = spec.eta
        pi = jnp.exp((1.0 - eta) * z + eta * t - saved["lse_u"][:, None])
    onehot = cols[None, :] == index[:, None]
    grad = spec.loss_scale * (p - (1.0 - gamma) * pi - jnp.where(onehot, gamma, 0.0))
    if spec.z_loss:
        grad = grad + (2.0 * spec.z_loss) * lse * p
    return scale[:, None] * grad
