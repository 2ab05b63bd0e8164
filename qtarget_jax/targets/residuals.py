"""The residual kinds of the blocked fused loss, one class each (see row_stats.py).

A `Residual` keeps its own per-row statistics beside the shared ones (m, s, a, zy, argmax):
`init`, `update` per vocabulary block, `combine` across vocabulary shards, `finish` into
<pi, z>-based cross-entropy, H(pi), pi_y and the rows saved for the backward pass
(`saved_ndims` declares their shapes, for shard_map), and `pi` on a tile of that pass. The
statistics' names are in row_stats.py's legend. A new residual is one subclass here and one
entry of `RESIDUALS`; `TopK` wraps the kind whose ranking it keeps.
"""
from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy


def online_lse(m, s, x, sums, values):
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


def combine_lse(m, sums, axis):
    """(max over `axis`, each of `sums` [n] rescaled to it and summed over `axis`)."""
    m_all = jax.lax.pmax(m, axis)
    ref = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    alpha = jnp.exp(m - ref)
    return m_all, [jax.lax.psum(x * alpha, axis) for x in sums]


def lse_of(m, s):
    """log-sum-exp [n] from a running max m and sum s = sum e^(x - m) (m = -inf: log s)."""
    return jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(s)


class Residual(abc.ABC):
    """A residual kind's row statistics. The base class is the part every kind shares: no
    statistics of its own, no saved rows."""
    needs_teacher = False

    def init(self, plan: "RowPlan", n: int, dtype) -> dict[str, jax.Array]:
        """This kind's statistics of n empty rows."""
        return {}

    def update(self, plan: "RowPlan", st, z, t, keep, cols, is_y) -> dict[str, jax.Array]:
        """This kind's statistics after one block (z, t, cols as `update_stats`; keep [1, Vb]
        the columns that count, is_y [n, Vb] the label's column)."""
        return {}

    def combine(self, plan: "RowPlan", st, axis: str) -> dict[str, jax.Array]:
        """This kind's statistics of whole rows from per-shard ones (vocab sharded on axis)."""
        return {}

    @abc.abstractmethod
    def finish(self, plan: "RowPlan", st, row: dict) -> tuple:
        """(H(pi, p) = lse - <pi, z>, H(pi), pi_y: [n] each; {saved rows}) from whole-row
        statistics; `row` has lse, entropy, zy (NaN where an out-of-range label counts), p_y,
        in_range, labels [n]."""

    def saved_ndims(self, plan: "RowPlan") -> dict[str, int]:
        """{name: ndim} of the rows `finish` saves for the backward pass (leading dim n)."""
        return {}

    @abc.abstractmethod
    def pi(self, plan: "RowPlan", saved, z, t, cols, p):
        """pi on one [n, Vb] tile (z, t, cols as `tile_grad`; p = softmax(z) there)."""

    def rank_key(self, plan: "RowPlan", z, t):
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

    @abc.abstractmethod
    def x(self, plan, z, t):
        """The [n, Vb] logits x(z, t) whose softmax is pi on one tile."""

    def init(self, plan, n, dtype):
        m, s, b, c = self.NAMES
        zero = jnp.zeros((n,), dtype)
        return {"ty": zero, m: jnp.full((n,), -jnp.inf, dtype), s: zero, b: zero, c: zero}

    def update(self, plan, st, z, t, keep, cols, is_y):
        m, s, b, c = self.NAMES
        x = self.x(plan, z, t)
        new = {"ty": st["ty"] + jnp.sum(jnp.where(is_y, t, 0.0), axis=-1)}
        new[m], new[s], (new[b], new[c]) = online_lse(
            st[m], st[s], jnp.where(keep, x, -jnp.inf), [st[b], st[c]], [x, z])
        return new

    def combine(self, plan, st, axis):
        m, s, b, c = self.NAMES
        new = {"ty": jax.lax.psum(st["ty"], axis)}
        new[m], (new[s], new[b], new[c]) = combine_lse(st[m], [st[s], st[b], st[c]], axis)
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
        lse_t = lse_of(st["mt"], st["st"])
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
        lse_u = lse_of(st["mu"], st["su"])
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
