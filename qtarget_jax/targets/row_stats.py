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

Each residual kind has one home, a `Residual` subclass: the statistics it keeps (`init`), how a
block updates them (`update`), how vocabulary shards combine them (`combine`), what they give
per row (`finish`: <pi, z>, H(pi), pi_y and the rows it saves for the backward pass, whose
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
from jax.scipy.special import xlogy

from qtarget_jax.targets import rules
from qtarget_jax.targets.losses import rule_gamma, target_terms
from qtarget_jax.targets.spec import TargetSpec

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
    def residual(self) -> "Residual":
        """The home of this plan's residual kind (wrapped in TopK when top_k > 0)."""
        kind = RESIDUALS[self.kind]
        return TopK(kind) if self.top_k else kind

    @property
    def needs_teacher(self) -> bool:
        return self.residual.needs_teacher

    @property
    def top_k(self) -> int:
        return min(self.spec.top_k, self.vocab) if self.spec.top_k else 0


class Residual:
    """A residual kind's row statistics. The base class is the part every kind shares: no
    statistics of its own, no saved rows."""
    needs_teacher = False

    def init(self, plan: RowPlan, n: int, dtype) -> dict[str, jax.Array]:
        """This kind's statistics of n empty rows."""
        return {}

    def update(self, plan: RowPlan, st, z, t, keep, cols, is_y) -> dict[str, jax.Array]:
        """This kind's statistics after one block (z, t, cols as `update_stats`; keep [1, Vb]
        the columns that count, is_y [n, Vb] the label's column)."""
        return {}

    def combine(self, plan: RowPlan, st, axis: str) -> dict[str, jax.Array]:
        """This kind's statistics of whole rows from per-shard ones (vocab sharded on axis)."""
        return {}

    def finish(self, plan: RowPlan, st, row: dict) -> tuple:
        """(<pi, z> - lse as the cross-entropy H(pi, p), H(pi), pi_y, saved rows) [n] each,
        from whole-row statistics; `row` has lse, entropy, zy (NaN where an out-of-range label
        counts), p_y, in_range [n]."""
        raise NotImplementedError

    def saved_ndims(self, plan: RowPlan) -> dict[str, int]:
        """{name: ndim} of the rows `finish` saves for the backward pass (leading dim n)."""
        return {}

    def pi(self, plan: RowPlan, saved, z, t, cols, p):
        """pi on one [n, Vb] tile (z, t, cols as `tile_grad`; p = softmax(z) there)."""
        raise NotImplementedError

    def rank_key(self, plan: RowPlan, z, t):
        """The [n, Vb] logits whose top-k a `TopK` of this kind keeps."""
        raise ValueError(f"residual kind {plan.kind!r} has no ranking for top_k")


class Uniform(Residual):
    """pi = 1 / V: <pi, z> = sz / V, H(pi) = log V."""

    def init(self, plan, n, dtype):
        return {"sz": jnp.zeros((n,), dtype)}

    def update(self, plan, st, z, t, keep, cols, is_y):
        return {"sz": st["sz"] + jnp.sum(jnp.where(keep, z, 0.0), axis=-1)}

    def combine(self, plan, st, axis):
        return {"sz": jax.lax.psum(st["sz"], axis)}

    def finish(self, plan, st, row):
        lse, dtype = row["lse"], row["lse"].dtype
        return (lse - st["sz"] / plan.vocab, jnp.full(lse.shape, jnp.log(plan.vocab), dtype),
                jnp.full(lse.shape, 1.0 / plan.vocab, dtype), {})

    def pi(self, plan, saved, z, t, cols, p):
        return 1.0 / plan.vocab


class Student(Residual):
    """pi = p: <pi, z> and H(pi) are the entropy; no statistics of its own."""

    def finish(self, plan, st, row):
        pi_y = jnp.where(row["in_range"], row["p_y"], 0.0)
        return row["entropy"], row["entropy"], pi_y, {}

    def pi(self, plan, saved, z, t, cols, p):
        return p

    def rank_key(self, plan, z, t):
        return z


class _Softmax(Residual):
    """pi = softmax(x) of a per-tile x(z, t): one more online logsumexp over x, with the
    statistics (max, sum e^(x-max), sum e^(x-max) x, sum e^(x-max) z) named by NAMES, the
    label teacher logit ty, and lse_x saved as SAVED."""
    needs_teacher = True
    NAMES: tuple[str, str, str, str]
    SAVED: str

    def x(self, plan, z, t):
        raise NotImplementedError

    def init(self, plan, n, dtype):
        m, s, b, c = self.NAMES
        zero = jnp.zeros((n,), dtype)
        return {"ty": zero, m: jnp.full((n,), -jnp.inf, dtype), s: zero, b: zero, c: zero}

    def update(self, plan, st, z, t, keep, cols, is_y):
        m, s, b, c = self.NAMES
        x = self.x(plan, z, t)
        new = {"ty": st["ty"] + jnp.sum(jnp.where(is_y, t, 0.0), axis=-1)}
        new[m], new[s], (new[b], new[c]) = _online(
            st[m], st[s], jnp.where(keep, x, -jnp.inf), [st[b], st[c]], [x, z])
        return new

    def combine(self, plan, st, axis):
        m, s, b, c = self.NAMES
        new = {"ty": jax.lax.psum(st["ty"], axis)}
        new[m], (new[s], new[b], new[c]) = _combine_lse(st[m], [st[s], st[b], st[c]], axis)
        return new

    def saved_ndims(self, plan):
        return {self.SAVED: 1}

    def rank_key(self, plan, z, t):
        return self.x(plan, z, t)


class Teacher(_Softmax):
    """pi = softmax(t): <pi, z> = ct / st, H(pi) = lse_t - bt / st, pi_y = e^(ty - lse_t)."""
    NAMES, SAVED = ("mt", "st", "bt", "ct"), "lse_t"

    def x(self, plan, z, t):
        return t

    def finish(self, plan, st, row):
        lse_t = _lse(st["mt"], st["st"])
        pi_y = jnp.where(row["in_range"], jnp.exp(st["ty"] - lse_t), 0.0)
        return (row["lse"] - st["ct"] / st["st"], lse_t - st["bt"] / st["st"], pi_y,
                {"lse_t": lse_t})

    def pi(self, plan, saved, z, t, cols, p):
        return jnp.exp(t - saved["lse_t"][:, None])


class Guided(_Softmax):
    """pi = softmax(u), u = (1 - eta) z + eta t: as Teacher over u (mu, su, bu, cu)."""
    NAMES, SAVED = ("mu", "su", "bu", "cu"), "lse_u"

    def x(self, plan, z, t):
        eta = plan.spec.eta
        return (1.0 - eta) * z + eta * t

    def finish(self, plan, st, row):
        eta = plan.spec.eta
        lse_u = _lse(st["mu"], st["su"])
        pi_y = jnp.exp((1.0 - eta) * row["zy"] + eta * st["ty"] - lse_u)
        return (row["lse"] - st["cu"] / st["su"], lse_u - st["bu"] / st["su"],
                jnp.where(row["in_range"], pi_y, 0.0), {"lse_u": lse_u})

    def pi(self, plan, saved, z, t, cols, p):
        return jnp.exp(self.x(plan, z, t) - saved["lse_u"][:, None])


@dataclasses.dataclass(frozen=True)
class TopK(Residual):
    """pi = softmax of the k largest ranking keys of `base` (kv), at ids ki, with z there (kz)."""
    base: Residual

    @property
    def needs_teacher(self) -> bool:
        return self.base.needs_teacher

    def init(self, plan, n, dtype):
        k = plan.top_k
        return {"kv": jnp.full((n, k), -jnp.inf, dtype),
                "ki": jnp.full((n, k), plan.vocab, jnp.int32), "kz": jnp.zeros((n, k), dtype)}

    def _keep_top(self, plan, kv, ki, kz):
        kv, top = jax.lax.top_k(kv, plan.top_k)
        return {"kv": kv, "ki": jnp.take_along_axis(ki, top, axis=-1),
                "kz": jnp.take_along_axis(kz, top, axis=-1)}

    def update(self, plan, st, z, t, keep, cols, is_y):
        key = self.base.rank_key(plan, z, t)
        return self._keep_top(
            plan, jnp.concatenate([st["kv"], jnp.where(keep, key, -jnp.inf)], axis=-1),
            jnp.concatenate([st["ki"], jnp.broadcast_to(cols, z.shape)], axis=-1),
            jnp.concatenate([st["kz"], z], axis=-1))

    def combine(self, plan, st, axis):
        # Shard-major candidates: ties go to the lower vocabulary id, as lax.top_k's.
        cat = {k: jax.lax.all_gather(st[k], axis, axis=1, tiled=True) for k in ("kv", "ki", "kz")}
        return self._keep_top(plan, cat["kv"], cat["ki"], cat["kz"])

    def finish(self, plan, st, row):
        probs = jax.nn.softmax(st["kv"], axis=-1)
        cross = -jnp.sum(probs * (st["kz"] - row["lse"][:, None]), axis=-1)
        h_pi = -jnp.sum(xlogy(probs, probs), axis=-1)
        pi_y = jnp.sum(jnp.where(st["ki"] == row["labels"][:, None], probs, 0.0), axis=-1)
        return cross, h_pi, jnp.where(row["in_range"], pi_y, 0.0), {"probs": probs,
                                                                     "ki": st["ki"]}

    def saved_ndims(self, plan):
        return {"probs": 2, "ki": 2}

    def pi(self, plan, saved, z, t, cols, p):
        pi = jnp.zeros_like(z)
        for j in range(plan.top_k):
            pi = pi + jnp.where(cols[None, :] == saved["ki"][:, j:j + 1],
                                saved["probs"][:, j:j + 1], 0.0)
        return pi


# The residual kinds the blocked loss evaluates (RowPlan.kind -> its home).
RESIDUALS: dict[str, Residual] = {"uniform": Uniform(), "student": Student(),
                                  "teacher": Teacher(), "guided": Guided()}
ROW_STAT_RESIDUALS = ("none",) + tuple(RESIDUALS)   # spec residuals; "none" uses uniform


def init_stats(plan: RowPlan, n: int, dtype) -> dict[str, jax.Array]:
    """Empty statistics of n rows: running maxima -inf, sums 0 (see the legend)."""
    neg = jnp.full((n,), -jnp.inf, dtype)
    zero = jnp.zeros((n,), dtype)
    return {"m": neg, "s": zero, "a": zero, "zy": zero, "amax_v": neg,
            "amax_i": jnp.zeros((n,), jnp.int32), **plan.residual.init(plan, n, dtype)}


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
    st.update(plan.residual.update(plan, st, z, t, keep, cols, is_y))
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
    st["zy"] = jax.lax.psum(st["zy"], axis)
    best = jax.lax.pmax(st["amax_v"], axis)
    big = jnp.iinfo(jnp.int32).max
    st["amax_i"] = jax.lax.pmin(jnp.where(st["amax_v"] == best, st["amax_i"], big), axis)
    st["amax_v"] = best
    st.update(plan.residual.combine(plan, st, axis))
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
      saved has `lse`, `gamma` and the residual's rows (`Residual.saved_ndims`).
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
