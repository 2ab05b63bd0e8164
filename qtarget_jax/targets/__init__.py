"""Q-targets: SFT as the choice of a target distribution, as pure JAX functions.

    Q_t = gamma_t * onehot(y_t) + (1 - gamma_t) * pi_tilde_t,  loss H(Q_t, p_t),  dL/dz = p - Q.
"""

from qtarget_jax.targets.checks import IGNORE_INDEX, check_teacher_tokenizer
from qtarget_jax.targets.fused import fused_path, fused_qtarget_loss, fused_qtarget_loss_sums
from qtarget_jax.targets.fused_chunks import ChunkSharding
from qtarget_jax.targets.induced import induced_target
from qtarget_jax.targets.losses import (
    METRIC_NAMES,
    NORMALIZATIONS,
    per_token_qtarget,
    qtarget_distribution,
    qtarget_loss,
    qtarget_loss_sums,
    safe_divide,
)
from qtarget_jax.targets.presets import PRESETS, get_preset, register_preset, spec_from_dict
from qtarget_jax.targets.rules import RowContext, register_gamma_rule, register_residual_rule
from qtarget_jax.targets.spec import TargetSpec

__all__ = [
    "IGNORE_INDEX", "METRIC_NAMES", "NORMALIZATIONS", "PRESETS", "RowContext", "TargetSpec",
    "ChunkSharding", "fused_path", "fused_qtarget_loss", "fused_qtarget_loss_sums",
    "check_teacher_tokenizer", "get_preset", "induced_target", "per_token_qtarget",
    "qtarget_distribution", "qtarget_loss", "qtarget_loss_sums", "register_gamma_rule",
    "register_preset", "register_residual_rule", "safe_divide", "spec_from_dict",
]
