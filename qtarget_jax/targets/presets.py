"""Named presets: every SFT variant of the Q-target table, each a function returning a TargetSpec.

| preset            | gamma_t            | pi_tilde_t                         | original loss                  |
|-------------------|--------------------|------------------------------------|--------------------------------|
| sft               | 1                  | (none)                             | -log p_y                       |
| dft               | sg(p_y)            | sg(p)                              | -sg(p_y) log p_y               |
| p_loss            | sg(p_y)            | sg(p)                              | -p_y                           |
| token_weighted    | w_t (batch/entropy)| sg(p)                              | -w_t log p_y                   |
| label_smoothing   | 1 - eps            | uniform                            | CE(smooth_labels(y, eps), p)   |
| kl_anchor         | 1 / (1 + lambda)   | pi_ref                             | -log p_y + lambda KL(pi_ref||p)|
| distill           | 1 - c              | pi_T (temperature tau)             | (1-c) CE(y) + c CE(pi_T, p)    |
| target_sft        | sg(p_y)            | p^(1-eta) pi_T^eta, normalised     | (Target-SFT)                   |
| topk              | sg(p_y)            | top-k of the guided mix, renorm.   | (our extension)                |

A new target is a few lines:

    @register_preset("confident_smoothing")
    def confident_smoothing(eps: float = 0.1) -> TargetSpec:
        return TargetSpec(gamma="p_y", residual="uniform", gamma_floor=1 - eps,
                          name="confident_smoothing")
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping

from qtarget_jax.targets.spec import TargetSpec

PRESETS: dict[str, Callable[..., TargetSpec]] = {}


def register_preset(name: str):
    """Decorator: register `fn(**knobs) -> TargetSpec` as preset `name`."""

    def decorate(fn):
        if name in PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        PRESETS[name] = fn
        return fn

    return decorate


@register_preset("sft")
def sft(*, z_loss: float = 0.0) -> TargetSpec:
    """Plain SFT: Q = onehot(y)."""
    return TargetSpec(gamma="one", residual="none", z_loss=z_loss, name="sft")


@register_preset("dft")
def dft(*, z_loss: float = 0.0) -> TargetSpec:
    """Dynamic fine-tuning, -sg(p_y) log p_y: Q = p_y onehot(y) + (1 - p_y) sg(p)."""
    return TargetSpec(gamma="p_y", residual="student", z_loss=z_loss, name="dft")


@register_preset("p_loss")
def p_loss(*, z_loss: float = 0.0) -> TargetSpec:
    """The probability loss -p_y ("beyond log-likelihood"): the same target as DFT."""
    return TargetSpec(gamma="p_y", residual="student", z_loss=z_loss, name="p_loss")


@register_preset("token_weighted")
def token_weighted(*, source: str = "batch", z_loss: float = 0.0) -> TargetSpec:
    """-w_t log p_y: Q = w_t onehot(y) + (1 - w_t) sg(p).

    source: "batch" (weights [B, T] passed to the loss, e.g. importance or quality weights) or
    "entropy" (w_t = H(p_t) / log V).
    """
    rules = {"batch": "weights", "entropy": "entropy"}
    if source not in rules:
        raise ValueError(f"token_weighted source={source!r}; choose one of {sorted(rules)}")
    return TargetSpec(gamma=rules[source], residual="student", z_loss=z_loss,
                      name="token_weighted")


@register_preset("label_smoothing")
def label_smoothing(*, epsilon: float = 0.1, z_loss: float = 0.0) -> TargetSpec:
    """Label smoothing: Q = (1 - eps) onehot(y) + eps uniform (optax.smooth_labels)."""
    return TargetSpec(gamma="constant", gamma_value=1.0 - epsilon, residual="uniform",
                      z_loss=z_loss, name="label_smoothing")


@register_preset("kl_anchor")
def kl_anchor(*, kl_weight: float = 0.1, teacher_temperature: float = 1.0,
              z_loss: float = 0.0) -> TargetSpec:
    """NLL + lambda KL(pi_ref || p): Q = (onehot(y) + lambda pi_ref) / (1 + lambda), x (1 + lambda).

    The reference model's logits are passed as teacher_logits. loss_scale = 1 + lambda makes the
    gradient equal the original loss's, not only its direction.
    """
    if kl_weight < 0:
        raise ValueError(f"kl_anchor kl_weight={kl_weight} must be >= 0")
    return TargetSpec(gamma="constant", gamma_value=1.0 / (1.0 + kl_weight), residual="teacher",
                      loss_scale=1.0 + kl_weight, teacher_temperature=teacher_temperature,
                      z_loss=z_loss, name="kl_anchor")


@register_preset("distill")
def distill(*, mix: float = 0.5, teacher_temperature: float = 1.0,
            z_loss: float = 0.0) -> TargetSpec:
    """Knowledge distillation with fixed mix c: Q = (1 - c) onehot(y) + c pi_T."""
    return TargetSpec(gamma="constant", gamma_value=1.0 - mix, residual="teacher",
                      teacher_temperature=teacher_temperature, z_loss=z_loss, name="distill")


@register_preset("target_sft")
def target_sft(*, eta: float = 0.5, teacher_temperature: float = 1.0, gamma_floor: float = 0.0,
               gamma_cap: float = 1.0, z_loss: float = 0.0) -> TargetSpec:
    """Target-SFT: Q = p_y onehot(y) + (1 - p_y) pi_guided, pi_guided ∝ p^(1-eta) pi_T^eta.

    eta = 0 is DFT; gamma_floor / gamma_cap bound the label trust.
    """
    return TargetSpec(gamma="p_y", residual="guided", eta=eta,
                      teacher_temperature=teacher_temperature, gamma_floor=gamma_floor,
                      gamma_cap=gamma_cap, z_loss=z_loss, name="target_sft")


@register_preset("topk")
def topk(*, k: int = 16, eta: float = 0.5, teacher_temperature: float = 1.0,
         gamma_floor: float = 0.0, gamma_cap: float = 1.0, z_loss: float = 0.0) -> TargetSpec:
    """Target-SFT whose residual keeps only the top-k tokens of pi_guided, renormalised."""
    if k < 1:
        raise ValueError(f"topk k={k} must be >= 1")
    return TargetSpec(gamma="p_y", residual="guided", eta=eta, top_k=k,
                      teacher_temperature=teacher_temperature, gamma_floor=gamma_floor,
                      gamma_cap=gamma_cap, z_loss=z_loss, name="topk")


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_preset(name: str, **knobs: Any) -> TargetSpec:
    """The TargetSpec of preset `name` with `knobs` applied.

    Raises:
      ValueError: unknown preset (lists the known ones) or unknown knob (lists the preset's).
    """
    if name not in PRESETS:
        raise ValueError(
            f"unknown target preset {name!r}{_suggest(name, PRESETS)}; known presets: "
            f"{sorted(PRESETS)}")
    fn = PRESETS[name]
    allowed = [p for p in inspect.signature(fn).parameters]
    for knob in knobs:
        if knob not in allowed:
            raise ValueError(
                f"preset {name!r} has no knob {knob!r}{_suggest(knob, allowed)}; its knobs: "
                f"{allowed}")
    return fn(**knobs)


def spec_from_dict(config: Mapping[str, Any]) -> TargetSpec:
    """Build a spec from plain config: {"preset": name, knob: value, ...}.

    Without "preset", the keys are TargetSpec fields (a custom target):
    {"gamma": "p_y", "residual": "uniform", "gamma_floor": 0.5}.
    """
    config = dict(config)
    if "preset" in config:
        name = config.pop("preset")
        return get_preset(name, **config)
    fields = list(TargetSpec.__dataclass_fields__)
    for key in config:
        if key not in fields:
            raise ValueError(
                f"target config key {key!r}{_suggest(key, fields + ['preset'])} is neither "
                f"'preset' nor a TargetSpec field {fields}")
    return TargetSpec(**config)
