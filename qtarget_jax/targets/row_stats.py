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
p_y, entropy, weights); a residual when it has a class in `RESIDUALS` (`ROW_STAT_RESIDUALS`).

Each residual kind has one home, a `Residual` subclass in residuals.py: the statistics it keeps
(`init`), how a
block updates them (`update`), how vocabulary shards combine them (`combine`), what they
give per row (`finish`: <pi, z>, H(pi), pi_y and the rows it saves for the backward pass, whose
shapes `saved_ndims` declares), and pi on a tile of the backward pass (`pi`). A new residual
is one subclass and one `RESIDUALS` entry. `TopK` wraps the kind whose ranking it keeps.

Legend of the statistics (per row, [n] unless noted; m* are running maxima, the sums are
rescaled to them):
    m, s, a     max_v z, sum e^(z-m), sum e^(z-m) z      (lse, entropy: every kind)
    zy          z at the label                            amax_v, amax_i   argmax of z
    sz          sum z                                     (uniform)
    ty          t at the label                            (teacher, guided)
    mt, st      max_v t, sum e^(t-mt)                     (teacher)
    bt, ct      sum e^(t-mt) t, sum e^(t-mt) z            (teacher)
    mu, su      max_v u, sum e^(u-mu)                     (guided)
    bu, cu      sum e^(u-mu) u, sum e^(u-mu) z            (guided)
    kv, ki, kz  [n, k] top-k ranking keys, their ids, z there (TopK)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from qtarget_jax.targets import rules
from qtarget_jax.targets.losses import rule_gamma, target_terms
from qtarget_jax.targets.residuals import RESIDUALS, TopK, combine_lse, lse_of, online_lse
from qtarget_jax.targets.spec import TargetSpec

ROW_STAT_RESIDUALS = ("none",) + tuple(RESIDUALS)   # spec residuals; "none" is uniform
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
    def residual(self):
        """The home of this plan's residual kind (wrapped in TopK when top_k > 0)."""
        kind = RESIDUALS[self.kind]
        return TopK(kind) if self.top_k else kind

    @property
    def needs_teacher(self) -> bool:
        return self.residual.needs_teacher

    @property
    def top_k(self) -> int:
        return min(self.spec.top_k, self.vocab) if self.spec.top_k else 0


def init_stats(plan: RowPlan, n: int, dtype) -> dict[str, jax.Array]:
    """Empty statistics of n rows: running maxima -inf, sums 0 (see the legend)."""
    neg = jnp.full((n,), -jnp.inf, dtype)
    zero = jnp.zeros((n,), dtype)
    return {"m": neg, "s": zero, "a": zero, "zy": zero, "amax_v": neg,
            "amax_i": jnp.zeros((n,), jnp.int32), **plan.residual.init(plan, n, dtype)}


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
    st["m"], st["s"], (st["a"],) = online_lse(st["m"], st["s"], zm, [st["a"]], [z])
    is_y = keep & (cols[None, :] == index[:, None])
    st["zy"] = st["zy"] + jnp.sum(jnp.where(is_y, z, 0.0), axis=-1)
    # argmax: first occurrence within the block, and only a strictly larger value replaces the
    # running one, so ties resolve to the lowest vocabulary id as jnp.argmax does.
    pos = jnp.argmax(zm, axis=-1)
    bv = jnp.max(zm, axis=-1)
    better = bv > st["amax_v"]
    st["amax_v"] = jnp.where(better, bv, st["amax_v"])
    st["amax_i"] = jnp.where(better, cols[pos], st["amax_i"])
    st.update(plan.residual.update(plan, st, z, t, keep, cols, is_y))
    return st


def combine_stats(plan: RowPlan, st, axis: Optional[str]):
    """Statistics of whole rows from per-shard statistics (vocabulary sharded over `axis`)."""
    if axis is None:
        return st
    st = dict(st)
    st["m"], (st["s"], st["a"]) = combine_lse(st["m"], [st["s"], st["a"]], axis)
    st["zy"] = jax.lax.psum(st["zy"], axis)
    best = jax.lax.pmax(st["amax_v"], axis)
    big = jnp.iinfo(jnp.int32).max
    st["amax_i"] = jax.lax.pmin(jnp.where(st["amax_v"] == best, st["amax_i"], big), axis)
    st["amax_v"] = best
    st.update(plan.residual.combine(plan, st, axis))
    return st


def finish(plan: RowPlan, st, labels, valid, weights):
    """Per-row loss, diagnostics and what the backward pass needs, from whole-row statistics.

    Args:
      st: combined statistics of n rows.
      labels: [n] int; valid: [n] bool; weights: [n] or None (gamma weights).

    Returns:
      (terms, saved): terms has `loss` and `METRIC_NAMES` ([n] each, as `per_token_qtarget`);
      saved has `lse`, `gamma` and the residual's rows (`Residual.saved_ndims`).
    """
    spec, vocab = plan.spec, plan.vocab
    dtype = st["s"].dtype
    lse = lse_of(st["m"], st["s"])
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
    row = {"lse": lse, "entropy": entropy, "zy": zy, "p_y": p_y, "in_range": in_range,
           "labels": labels}
    cross, h_pi, pi_y, saved = plan.residual.finish(plan, st, row)
    t = target_terms(spec, gamma, log_p_y, lse, cross, h_pi, pi_y)
    terms = {"loss": t["loss"], "gamma": gamma, "p_y": sg(p_y),
             "accuracy": (st["amax_i"] == labels).astype(dtype), "entropy": sg(entropy),
             "kl_q_p": sg(t["kl"]), "nll": sg(t["nll"])}
    return terms, {"lse": lse, "gamma": gamma, **saved}


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
    pi = plan.residual.pi(plan, saved, z, t, cols, p)
    onehot = cols[None, :] == index[:, None]
    grad = spec.loss_scale * (p - (1.0 - gamma) * pi - jnp.where(onehot, gamma, 0.0))
    if spec.z_loss:
        grad = grad + (2.0 * spec.z_loss) * lse * p
    return scale[:, None] * grad
