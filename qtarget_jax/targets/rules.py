"""The two halves of a Q-target: label-trust rules (gamma) and residual rules (pi_tilde).

Each rule is a small function of a `RowContext` (everything known at a position: the student's
logits and log-probabilities, the label, the teacher's logits, per-token weights) registered under
a name. A `TargetSpec` holds only names and numbers, so it stays hashable and static under jit.

A gamma rule returns gamma [...] in [0, 1]. A residual rule returns log pi_tilde [..., V] (a
normalised log-distribution), or `None` for the uniform distribution, which the loss handles in
closed form. The loss applies `stop_gradient` to both: Q is a target, not a function of the
parameters.

A new rule is a few lines:

    @register_gamma_rule("sqrt_p_y")
    def _sqrt_p_y(ctx):
        return jnp.sqrt(ctx.p_y)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RowContext:
    """What a rule may read at each position (all float arrays in the loss's compute dtype).

    Attributes:
      logits: student logits z, [..., V].
      log_p: log softmax(z), [..., V].
      p_y: student probability of the label, [...]; NaN where the label is out of range.
      entropy: entropy of softmax(z) in nats, [...].
      teacher_logits: teacher logits [..., V] or None.
      weights: per-token weights [...] or None.
      spec: the TargetSpec being evaluated.
      vocab: V when `logits` is None (the vocabulary-blocked fused loss evaluates row-statistics
        gamma rules from p_y, entropy and weights only, without a [..., V] row).
    """

    logits: jax.Array
    log_p: jax.Array
    p_y: jax.Array
    entropy: jax.Array
    teacher_logits: Optional[jax.Array]
    weights: Optional[jax.Array]
    spec: object
    vocab: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        return self.vocab if self.logits is None else self.logits.shape[-1]

    def teacher_log_probs(self) -> jax.Array:
        """log softmax(teacher_logits / T), [..., V]. Raises if no teacher logits were given."""
        if self.teacher_logits is None:
            raise ValueError(
                f"target {self.spec.name!r} (residual={self.spec.residual!r}, "
                f"eta={self.spec.eta}) needs teacher_logits, but none were passed")
        scaled = self.teacher_logits.astype(self.logits.dtype) / self.spec.teacher_temperature
        return jax.nn.log_softmax(scaled, axis=-1)


@dataclasses.dataclass(frozen=True)
class GammaRule:
    fn: Callable[[RowContext], jax.Array]
    needs_weights: bool = False
    row_stats: bool = False


@dataclasses.dataclass(frozen=True)
class ResidualRule:
    fn: Callable[[RowContext], Optional[jax.Array]]
    needs_teacher: Callable[[object], bool]


GAMMA_RULES: dict[str, GammaRule] = {}
RESIDUAL_RULES: dict[str, ResidualRule] = {}


def register_gamma_rule(name: str, *, needs_weights: bool = False, row_stats: bool = False):
    """Decorator: register `fn(ctx: RowContext) -> gamma [...]` under `name`.

    `row_stats=True` declares that `fn` reads only ctx.p_y, ctx.entropy, ctx.weights, ctx.spec
    and ctx.vocab_size (no [..., V] array): the vocabulary-blocked fused loss can then evaluate
    it from per-row statistics. Otherwise a fused loss with this rule takes the token-chunk path
    (see `qtarget_jax.targets.fused.fused_path`).
    """

    def decorate(fn):
        if name in GAMMA_RULES:
            raise ValueError(f"gamma rule {name!r} is already registered")
        GAMMA_RULES[name] = GammaRule(fn, needs_weights, row_stats)
        return fn

    return decorate


def register_residual_rule(name: str, *, needs_teacher: bool | Callable[[object], bool] = False):
    """Decorator: register `fn(ctx) -> log pi_tilde [..., V] | None (uniform)` under `name`.

    `needs_teacher` is a bool or a function of the spec (e.g. the guided residual needs a teacher
    only when eta > 0).
    """
    needs = needs_teacher if callable(needs_teacher) else (lambda spec: bool(needs_teacher))

    def decorate(fn):
        if name in RESIDUAL_RULES:
            raise ValueError(f"residual rule {name!r} is already registered")
        RESIDUAL_RULES[name] = ResidualRule(fn, needs)
        return fn

    return decorate


# ----------------------------------------------------------------------------- gamma rules


@register_gamma_rule("one", row_stats=True)
def _gamma_one(ctx: RowContext) -> jax.Array:
    """Full trust in the label: plain SFT."""
    return jnp.ones_like(ctx.p_y)


@register_gamma_rule("constant", row_stats=True)
def _gamma_constant(ctx: RowContext) -> jax.Array:
    """A fixed trust, spec.gamma_value (label smoothing 1 - eps, distillation 1 - c)."""
    return jnp.full_like(ctx.p_y, ctx.spec.gamma_value)


@register_gamma_rule("p_y", row_stats=True)
def _gamma_p_y(ctx: RowContext) -> jax.Array:
    """Adaptive trust: the student's own probability of the label (DFT, p-loss, Target-SFT)."""
    return ctx.p_y


@register_gamma_rule("weights", needs_weights=True, row_stats=True)
def _gamma_weights(ctx: RowContext) -> jax.Array:
    """Per-token weights w_t from the batch (importance-weighted / quality-weighted SFT).

    Weights outside [0, 1] become NaN, so a bad weight shows up in the loss instead of being
    clipped away silently (concrete inputs are also checked eagerly by the loss).
    """
    if ctx.weights is None:
        raise ValueError(
            f"target {ctx.spec.name!r} (gamma='weights') needs per-token `weights` [...], "
            "but none were passed")
    w = ctx.weights.astype(ctx.p_y.dtype)
    return jnp.where((w >= 0) & (w <= 1), w, jnp.nan)


@register_gamma_rule("entropy", row_stats=True)
def _gamma_entropy(ctx: RowContext) -> jax.Array:
    """Entropy-weighted SFT: w_t = H(p_t) / log V, more weight where the student is uncertain."""
    return ctx.entropy / jnp.log(jnp.asarray(ctx.vocab_size, ctx.entropy.dtype))


# ----------------------------------------------------------------------------- residual rules


@register_residual_rule("none")
def _residual_none(ctx: RowContext) -> None:
    """No residual: only valid with gamma == 1 (checked by TargetSpec). Treated as uniform x 0."""
    return None


@register_residual_rule("uniform")
def _residual_uniform(ctx: RowContext) -> None:
    """Uniform over the vocabulary (label smoothing), computed in closed form by the loss."""
    return None


@register_residual_rule("student")
def _residual_student(ctx: RowContext) -> jax.Array:
    """The student's own distribution, stop-gradient (DFT, p-loss, token weighting)."""
    return ctx.log_p


@register_residual_rule("teacher", needs_teacher=True)
def _residual_teacher(ctx: RowContext) -> jax.Array:
    """A teacher's (or frozen reference model's) distribution (distillation, KL anchoring)."""
    return ctx.teacher_log_probs()


@register_residual_rule("guided", needs_teacher=lambda spec: spec.eta > 0)
def _residual_guided(ctx: RowContext) -> jax.Array:
    """Target-SFT's pi_guided ∝ p^(1-eta) * pi_T^eta, normalised in log space."""
    eta = ctx.spec.eta
    if eta == 0:
        return ctx.log_p
    mixed = (1.0 - eta) * ctx.log_p + eta * ctx.teacher_log_probs()
    return mixed - jax.nn.logsumexp(mixed, axis=-1, keepdims=True)
