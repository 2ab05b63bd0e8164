"""The Q-target loss: H(Q, p) per position, with Q held constant.

At a position with logits z [V], p = softmax(z), label y and a target
Q = gamma * onehot(y) + (1 - gamma) * pi_tilde, the loss is

    H(Q, p) = gamma * (-log p_y) + (1 - gamma) * H(pi_tilde, p)

and its gradient with respect to z is exactly p - Q, because gamma and pi_tilde are
stop-gradient. Neither the one-hot nor Q is ever built as a [..., V] array: the label term is a
gather, and the residual term is a dot product with log p (uniform residuals in closed form, top-k
residuals as k gathered entries).

All math runs in float32 (or float64 when the inputs are float64), whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from qtarget_jax.targets import checks, rules
from qtarget_jax.targets.spec import TargetSpec

IGNORE_INDEX = checks.IGNORE_INDEX
NORMALIZATIONS = ("token", "sequence", "constant")
METRIC_NAMES = ("gamma", "p_y", "accuracy", "entropy", "kl_q_p", "nll")

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class _Residual:
    """pi_tilde at each position, in one of three forms (none of them a dense Q).

    kind "uniform": nothing stored. kind "dense": log_pi [..., V]. kind "sparse": probs [..., K]
    over token ids idx [..., K].
    """
    kind: str
    log_pi: Optional[jax.Array] = None
    probs: Optional[jax.Array] = None
    idx: Optional[jax.Array] = None


def as_spec(spec: Union[TargetSpec, str]) -> TargetSpec:
    """`spec` itself, or the preset of that name with default knobs."""
    if isinstance(spec, TargetSpec):
        return spec
    if isinstance(spec, str):
        from qtarget_jax.targets.presets import get_preset  # presets import this module
        return get_preset(spec)
    raise TypeError(f"spec must be a TargetSpec or a preset name, got {type(spec).__name__}")


def _gather(x, index, fill):
    """x[..., index] for x [..., V], index [...] -> [...]; out-of-range index gives `fill`."""
    return jnp.take_along_axis(x, index[..., None], axis=-1, mode="fill", fill_value=fill)[..., 0]


def rule_gamma(ctx: rules.RowContext, spec: TargetSpec, dtype) -> jax.Array:
    """gamma [...] of spec's rule at `ctx`: NaN outside [0, 1], clipped to [floor, cap], sg."""
    gamma = rules.GAMMA_RULES[spec.gamma].fn(ctx).astype(dtype)
    tol = 1e-6  # rounding slack (e.g. entropy / log V a hair above 1)
    gamma = jnp.where((gamma >= -tol) & (gamma <= 1 + tol), gamma, jnp.nan)
    return sg(jnp.clip(gamma, spec.gamma_floor, spec.gamma_cap))


def student_residual(spec: TargetSpec) -> bool:
    """True when pi_tilde is the student's own sg(p) in full (DFT, p-loss, token weighting)."""
    plain = spec.residual == "student" or (spec.residual == "guided" and spec.eta == 0)
    return plain and not spec.top_k


def student_residual_kl(gamma: jax.Array, log_p_y: jax.Array) -> jax.Array:
    """KL(Q || p) [...] for Q = gamma onehot(y) + (1 - gamma) p, without cancellation.

    Q_v / p_v = 1 - gamma off the label, so KL = (1 - gamma)(1 - p_y) log(1 - gamma)
    + q_y (log q_y - log p_y) with q_y = gamma + (1 - gamma) p_y (H(Q, p) - H(Q) would subtract
    two numbers of the size of the entropy to get a KL that is often 1000x smaller).
    """
    p_y = jnp.exp(log_p_y)
    one_minus = 1.0 - gamma
    q_y = gamma + one_minus * p_y
    return (xlogy(one_minus, one_minus) * (1.0 - p_y)
            + jnp.where(q_y > 0, q_y * (jnp.log(q_y) - log_p_y), 0.0))


def target_terms(spec: TargetSpec, gamma: jax.Array, log_p_y: jax.Array, lse: jax.Array,
                 cross: jax.Array, h_pi: jax.Array, pi_y: jax.Array) -> dict[str, jax.Array]:
    """The Q-target loss from per-row quantities, shared by the materialised and the fused loss.

    Args (all [...] float, one value per position): gamma; log_p_y = log p at the label;
      lse = logsumexp of the student logits; cross = H(pi, p); h_pi = H(pi); pi_y = the
      residual's probability at the label (0 when the label is outside it).
    Returns:
      {"nll": -log p_y, "ce": H(Q, p), "loss": loss_scale * H(Q, p) + z_loss * lse^2,
      "kl": KL(Q || p)} of [...] arrays (not stop-gradient'ed).
    """
    nll = -log_p_y
    ce = gamma * nll + (1.0 - gamma) * cross
    loss = spec.loss_scale * ce
    if spec.z_loss:
        loss = loss + spec.z_loss * jnp.square(lse)
    if student_residual(spec):
        kl = student_residual_kl(gamma, log_p_y)
    else:
        # KL(Q || p) = H(Q, p) - H(Q), with sum_k Q_k log Q_k written through pi's entropy:
        # r = (1 - gamma) pi, sum_k r_k log r_k = xlogy(1-g, 1-g) - (1-g) H(pi); Q_y = gamma + r_y.
        one_minus = 1.0 - gamma
        r_y = one_minus * pi_y
        q_y = gamma + r_y
        sum_q_log_q = (xlogy(one_minus, one_minus) - one_minus * h_pi
                       - xlogy(r_y, r_y) + xlogy(q_y, q_y))
        kl = ce + sum_q_log_q
    return {"nll": nll, "ce": ce, "loss": loss, "kl": kl}


def _target_parts(logits, labels, spec, teacher_logits, weights, valid):
    """Shared front half: the context, the label index, gamma [...] and the residual."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    z = logits.astype(dtype)
    vocab = z.shape[-1]
    lse = jax.nn.logsumexp(z, axis=-1)
    log_p = z - lse[..., None]
    # Supervised positions with an out-of-range label gather index `vocab`, i.e. NaN: a bad label
    # poisons the loss instead of training on a wrapped-around token.
    in_range = (labels >= 0) & (labels < vocab)
    index = jnp.where(in_range, labels, jnp.where(valid, vocab, 0))
    log_p_y = _gather(log_p, index, jnp.nan)
    p = jnp.exp(log_p)
    entropy = -jnp.sum(p * log_p, axis=-1)
    ctx = rules.RowContext(
        logits=z, log_p=sg(log_p), p_y=sg(jnp.exp(log_p_y)), entropy=sg(entropy),
        teacher_logits=None if teacher_logits is None else sg(teacher_logits),
        weights=None if weights is None else sg(weights), spec=spec)

    gamma = rule_gamma(ctx, spec, dtype)
    log_pi = rules.RESIDUAL_RULES[spec.residual].fn(ctx)
    if log_pi is None:
        residual = _Residual("uniform")
    elif spec.top_k:
        k = min(spec.top_k, vocab)
        vals, idx = jax.lax.top_k(sg(log_pi).astype(dtype), k)
        residual = _Residual("sparse", probs=jax.nn.softmax(vals, axis=-1), idx=idx)
    else:
        residual = _Residual("dense", log_pi=sg(log_pi).astype(dtype))
    return z, lse, log_p, log_p_y, entropy, index, gamma, residual


def _residual_terms(residual, log_p, index):
    """(H(pi, p) [...], H(pi) [...], pi_y [...]) for a residual, without densifying it."""
    vocab = log_p.shape[-1]
    if residual.kind == "uniform":
        cross = -jnp.mean(log_p, axis=-1)
        h_pi = jnp.full(cross.shape, jnp.log(vocab), cross.dtype)
        pi_y = jnp.full(cross.shape, 1.0 / vocab, cross.dtype)
    elif residual.kind == "dense":
        pi = jnp.exp(residual.log_pi)
        cross = -jnp.sum(pi * log_p, axis=-1)
        h_pi = -jnp.sum(jnp.where(pi > 0, pi * residual.log_pi, 0.0), axis=-1)
        pi_y = _gather(pi, index, 0.0)
    else:
        log_p_k = jnp.take_along_axis(log_p, residual.idx, axis=-1)
        cross = -jnp.sum(residual.probs * log_p_k, axis=-1)
        h_pi = -jnp.sum(xlogy(residual.probs, residual.probs), axis=-1)
        pi_y = jnp.sum(jnp.where(residual.idx == index[..., None], residual.probs, 0.0), axis=-1)
    return cross, h_pi, pi_y


def per_token_qtarget(
    logits: jax.Array,
    labels: jax.Array,
    spec: Union[TargetSpec, str],
    *,
    teacher_logits: Optional[jax.Array] = None,
    weights: Optional[jax.Array] = None,
    valid: Optional[jax.Array] = None,
) -> dict[str, jax.Array]:
    """The Q-target loss and its diagnostics at every position, unmasked and unreduced.

    Args:
      logits: [..., V] student logits, any float dtype.
      labels: [...] int token ids; -100 (or `valid` False) marks unsupervised positions.
      spec: a TargetSpec or a preset name.
      teacher_logits: [..., V] teacher logits when spec.needs_teacher.
      weights: [...] per-token weights in [0, 1] when spec.needs_weights.
      valid: [...] bool, positions that count; default labels != -100. Out-of-range labels at
        valid positions give NaN.

    Returns:
      Dict of [...] float32 (float64 for float64 inputs) arrays: `loss` (loss_scale * H(Q, p) +
      z-loss, the differentiable per-token loss), `ce` (H(Q, p)), `gamma`, `p_y`, `accuracy`
      (argmax == label), `entropy` (of p), `kl_q_p` (KL(Q || p)), `nll` (-log p_y), `lse`.
    """
    spec = as_spec(spec)
    if valid is None:
        valid = labels != IGNORE_INDEX
    z, lse, log_p, log_p_y, entropy, index, gamma, residual = _target_parts(
        logits, labels, spec, teacher_logits, weights, valid)
    cross, h_pi, pi_y = _residual_terms(residual, log_p, index)
    t = target_terms(spec, gamma, log_p_y, lse, cross, h_pi, pi_y)
    accuracy = (jnp.argmax(z, axis=-1) == labels).astype(z.dtype)
    return {"loss": t["loss"], "ce": sg(t["ce"]), "gamma": gamma, "p_y": sg(jnp.exp(log_p_y)),
            "accuracy": accuracy, "entropy": sg(entropy), "kl_q_p": sg(t["kl"]),
            "nll": sg(t["nll"]), "lse": sg(lse)}


def qtarget_loss_sums(
    logits: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
    spec: Union[TargetSpec, str, None] = None,
    *,
    teacher_logits: Optional[jax.Array] = None,
    weights: Optional[jax.Array] = None,
    normalization: str = "token",
    segment_ids: Optional[jax.Array] = None,
    normalizer: Optional[float] = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Summed Q-target loss, its denominator, and summed diagnostics.

    Sums add across micro-batches and devices; divide once by the global denominator so gradient
    accumulation and data parallelism give exactly the answer of one big batch.

    Args:
      logits: [B, T, V] (any leading dims [..., V]) student logits.
      labels: [B, T] int; -100 = not supervised.
      mask: [B, T] 0/1 (bool, int or float), or None = every position with a label.
      spec: TargetSpec or preset name.
      teacher_logits: [B, T, V] when spec.needs_teacher.
      weights: [B, T] in [0, 1] when spec.needs_weights.
      normalization: "token" (denominator = supervised tokens), "sequence" (each sequence's mean,
        denominator = sequences with a supervised token; sequences are rows, or packed segments
        when segment_ids is given), "constant" (denominator = normalizer * rows: the fixed-length
        normalisation, additive across micro-batches).
      segment_ids: [B, T] int packed-segment ids for "sequence" normalisation (0 = padding).
      normalizer: the constant for "constant" normalisation.

    Returns:
      (loss_sum f32[], denominator f32[], metric_sums) where metric_sums holds token sums of
      `METRIC_NAMES` plus `tokens` (the number of supervised tokens).
    """
    if spec is None:
        raise ValueError("qtarget_loss_sums needs a spec (a TargetSpec or a preset name)")
    spec = as_spec(spec)
    checks.check_loss_args(
        spec, labels, has_teacher=teacher_logits is not None,
        teacher_hint="teacher_logits [..., V]", weights=weights, normalization=normalization,
        normalizations=NORMALIZATIONS, normalizer=normalizer, segment_ids=segment_ids)
    checks.check_inputs(logits, labels, mask, teacher_logits, weights)

    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask > 0)
    terms = per_token_qtarget(logits, labels, spec, teacher_logits=teacher_logits,
                              weights=weights, valid=valid)
    dtype = terms["loss"].dtype
    w = valid.astype(dtype)

    def masked_sum(x):
        # where() first: masked positions may hold NaN (a junk label) and must not leak.
        return jnp.sum(jnp.where(valid, x, 0.0))

    token_loss = jnp.where(valid, terms["loss"], 0.0)
    tokens = jnp.sum(w)
    if normalization == "token":
        loss_sum, denominator = jnp.sum(token_loss), tokens
    elif normalization == "constant":
        rows = labels.size // labels.shape[-1] if labels.ndim else 1
        loss_sum, denominator = jnp.sum(token_loss), jnp.asarray(normalizer * rows, dtype)
    else:
        loss_sum, denominator = _sequence_mean_sums(token_loss, w, segment_ids)
    metric_sums = {name: masked_sum(terms[name]) for name in METRIC_NAMES}
    metric_sums["tokens"] = tokens
    return loss_sum, denominator, metric_sums


def _sequence_mean_sums(token_loss, w, segment_ids):
    """(sum over sequences of their mean token loss, number of sequences with a token)."""
    flat_loss = token_loss.reshape(-1, token_loss.shape[-1])
    flat_w = w.reshape(flat_loss.shape)
    rows, length = flat_loss.shape
    if segment_ids is None:
        seq_loss, seq_tokens = flat_loss.sum(-1), flat_w.sum(-1)
    else:
        seg = segment_ids.reshape(flat_loss.shape).astype(jnp.int32)
        keys = (jnp.arange(rows, dtype=jnp.int32)[:, None] * (length + 1) + seg).reshape(-1)
        n = rows * (length + 1)
        seq_loss = jax.ops.segment_sum(flat_loss.reshape(-1), keys, num_segments=n)
        seq_tokens = jax.ops.segment_sum(flat_w.reshape(-1), keys, num_segments=n)
    has = seq_tokens > 0
    means = jnp.where(has, seq_loss / jnp.where(has, seq_tokens, 1.0), 0.0)
    return jnp.sum(means), jnp.sum(has.astype(flat_loss.dtype))


def safe_divide(numerator, denominator):
    """numerator / denominator, and 0 (with zero gradient) where the denominator is 0."""
    ok = denominator > 0
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


def qtarget_loss(
    logits: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
    spec: Union[TargetSpec, str, None] = None,
    *,
    teacher_logits: Optional[jax.Array] = None,
    **kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The normalised Q-target loss and mean diagnostics for one batch.

    Args: as `qtarget_loss_sums` (logits [B, T, V], labels [B, T], mask [B, T] | None, spec).

    Returns:
      (loss f32[], metrics) with metrics the token means of `METRIC_NAMES`, `tokens`, and `loss`.
      An all-masked batch gives loss 0, zero gradients and zero metrics, never NaN.
    """
    loss_sum, denominator, sums = qtarget_loss_sums(
        logits, labels, mask, spec, teacher_logits=teacher_logits, **kwargs)
    loss = safe_divide(loss_sum, denominator)
    metrics = {name: safe_divide(sums[name], sums["tokens"]) for name in METRIC_NAMES}
    metrics["tokens"] = sums["tokens"]
    metrics["loss"] = loss
    return loss, metrics


def qtarget_distribution(
    logits: jax.Array,
    labels: jax.Array,
    spec: Union[TargetSpec, str],
    *,
    teacher_logits: Optional[jax.Array] = None,
    weights: Optional[jax.Array] = None,
) -> jax.Array:
    """The dense target Q [..., V], for inspection and tests (the losses never build it).

    Args:
      logits: [..., V]; labels: [...] in [0, V); teacher_logits / weights as for the loss.

    Returns:
      Q [..., V] float32, rows summing to 1.
    """
    spec = as_spec(spec)
    checks.check_inputs(logits, labels, None, teacher_logits, weights)
    valid = labels != IGNORE_INDEX
    z, _, _, _, _, index, gamma, residual = _target_parts(
        logits, labels, spec, teacher_logits, weights, valid)
    vocab = z.shape[-1]
    one_minus = (1.0 - gamma)[..., None]
    if residual.kind == "uniform":
        q = jnp.broadcast_to(one_minus / vocab, z.shape)
    elif residual.kind == "dense":
        q = one_minus * jnp.exp(residual.log_pi)
    else:
        q = jnp.put_along_axis(jnp.zeros_like(z), residual.idx, one_minus * residual.probs,
                               axis=-1, inplace=False)
    vocab_ids = jnp.arange(vocab).reshape((1,) * index.ndim + (vocab,))
    label_mass = jnp.where(vocab_ids == index[..., None], gamma[..., None], 0.0)
    return sg(q + label_mass)
