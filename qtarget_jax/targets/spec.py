"""TargetSpec: the static description of a Q-target.

A Q-target at a supervised position t is

    Q_t = gamma_t * onehot(y_t) + (1 - gamma_t) * pi_tilde_t

`gamma` names the label-trust rule that gives gamma_t, `residual` names the rule that gives the
distribution pi_tilde_t. Both are looked up in the registries of `qtarget_jax.targets.rules`, so a
spec is a handful of strings and numbers: frozen, hashable, and therefore a static argument under
`jax.jit`. Presets (`qtarget_jax.targets.presets`) are functions that return a spec.
"""

from __future__ import annotations

import dataclasses

from qtarget_jax.targets import rules


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What the model is pushed toward at each supervised position.

    Attributes:
      gamma: label-trust rule, a key of `rules.GAMMA_RULES` ("one", "constant", "p_y", "weights",
        "entropy", or one a user registered).
      residual: residual rule, a key of `rules.RESIDUAL_RULES` ("none", "uniform", "student",
        "teacher", "guided", or one a user registered).
      gamma_value: gamma for the "constant" rule, in [0, 1].
      gamma_floor: gamma_t is clipped to [gamma_floor, gamma_cap] after its rule.
      gamma_cap: see gamma_floor.
      eta: teacher intensity of the "guided" residual, p^(1-eta) * teacher^eta, in [0, 1].
      teacher_temperature: teacher logits are divided by this before the softmax; > 0.
      top_k: if > 0, the residual keeps only its k most likely tokens, renormalised.
      loss_scale: multiplies the per-token loss (KL anchoring's implicit 1 + lambda); > 0.
      z_loss: weight of the auxiliary z-loss, z_loss * logsumexp(z)^2 per token; >= 0.
      name: the preset this spec came from, for logs.
    """

    gamma: str = "one"
    residual: str = "none"
    gamma_value: float = 1.0
    gamma_floor: float = 0.0
    gamma_cap: float = 1.0
    eta: float = 0.0
    teacher_temperature: float = 1.0
    top_k: int = 0
    loss_scale: float = 1.0
    z_loss: float = 0.0
    name: str = "custom"

    def __post_init__(self):
        if self.gamma not in rules.GAMMA_RULES:
            raise ValueError(
                f"TargetSpec.gamma={self.gamma!r} is not a known gamma rule; known: "
                f"{sorted(rules.GAMMA_RULES)}")
        if self.residual not in rules.RESIDUAL_RULES:
            raise ValueError(
                f"TargetSpec.residual={self.residual!r} is not a known residual rule; known: "
                f"{sorted(rules.RESIDUAL_RULES)}")
        for field in ("gamma_value", "gamma_floor", "gamma_cap", "eta"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TargetSpec.{field}={value} must lie in [0, 1]")
        if self.gamma_floor > self.gamma_cap:
            raise ValueError(
                f"TargetSpec.gamma_floor={self.gamma_floor} exceeds gamma_cap={self.gamma_cap}")
        if self.teacher_temperature <= 0:
            raise ValueError(
                f"TargetSpec.teacher_temperature={self.teacher_temperature} must be > 0")
        if self.top_k < 0 or int(self.top_k) != self.top_k:
            raise ValueError(f"TargetSpec.top_k={self.top_k} must be a non-negative integer")
        if self.loss_scale <= 0:
            raise ValueError(f"TargetSpec.loss_scale={self.loss_scale} must be > 0")
        if self.z_loss < 0:
            raise ValueError(f"TargetSpec.z_loss={self.z_loss} must be >= 0")
        if self.residual == "none" and not self.always_trusts_label:
            raise ValueError(
                f"TargetSpec(gamma={self.gamma!r}, residual='none'): a target without a residual "
                "must put all its mass on the label (gamma='one', or 'constant' with "
                "gamma_value=1); otherwise Q would not sum to 1")
        if self.top_k and self.residual in ("none", "uniform"):
            raise ValueError(
                f"TargetSpec.top_k={self.top_k} needs a residual that ranks tokens; "
                f"residual={self.residual!r} does not")

    @property
    def always_trusts_label(self) -> bool:
        """True when gamma_t is 1 at every position, whatever the logits."""
        fixed_one = self.gamma == "one" or (self.gamma == "constant" and self.gamma_value == 1.0)
        return (fixed_one and self.gamma_cap == 1.0) or self.gamma_floor == 1.0

    @property
    def needs_teacher(self) -> bool:
        """True when the residual reads teacher (or reference-model) logits."""
        return rules.RESIDUAL_RULES[self.residual].needs_teacher(self)

    @property
    def needs_weights(self) -> bool:
        """True when gamma_t comes from per-token weights in the batch."""
        return rules.GAMMA_RULES[self.gamma].needs_weights

    def replace(self, **changes) -> TargetSpec:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict of every field, the inverse of `TargetSpec(**d)`."""
        return dataclasses.asdict(self)
