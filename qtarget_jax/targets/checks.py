"""Input checks for the Q-target losses.

Shape and dtype errors are raised at trace time. Value errors (labels out of range, weights
outside [0, 1]) are raised when the values are concrete (eager calls, host-side batches); under
`jit` the loss turns such positions into NaN instead, so they cannot vanish silently.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100


def concrete(x) -> Optional[np.ndarray]:
    """`x` as a numpy array when its value is known now, else None (a tracer under jit)."""
    if x is None:
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_inputs(logits, labels, mask=None, teacher_logits=None, weights=None) -> None:
    """Validate shapes, dtypes and (when concrete) label and weight values.

    Args:
      logits: [..., V] floating.
      labels: [...] integer, in [0, V) or IGNORE_INDEX (-100).
      mask: [...] or None.
      teacher_logits: [..., V] or None; must match logits exactly (same tokenizer).
      weights: [...] or None, in [0, 1].
    """
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be floating, got dtype {logits.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"Incorrect shapes: logits {tuple(logits.shape)} must be labels "
            f"{tuple(labels.shape)} + (vocab,)")
    for name, arr in (("mask", mask), ("weights", weights)):
        if arr is not None and tuple(arr.shape) != tuple(labels.shape):
            raise ValueError(
                f"Incorrect shapes: {name} {tuple(arr.shape)} must equal labels "
                f"{tuple(labels.shape)}")
    if teacher_logits is not None:
        if not jnp.issubdtype(teacher_logits.dtype, jnp.floating):
            raise TypeError(f"teacher_logits must be floating, got dtype {teacher_logits.dtype}")
        if teacher_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"teacher vocabulary {teacher_logits.shape[-1]} differs from the student's "
                f"{logits.shape[-1]}: a teacher must share the student's tokenizer")
        if tuple(teacher_logits.shape) != tuple(logits.shape):
            raise ValueError(
                f"Incorrect shapes: teacher_logits {tuple(teacher_logits.shape)} must equal "
                f"logits {tuple(logits.shape)}")

    vocab = logits.shape[-1]
    labels_np = concrete(labels)
    if labels_np is not None:
        bad = (labels_np != IGNORE_INDEX) & ((labels_np < 0) | (labels_np >= vocab))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"label {int(labels_np[where])} at position {where} is outside the vocabulary "
                f"[0, {vocab}) and is not the ignore index {IGNORE_INDEX}")
    weights_np = concrete(weights)
    if weights_np is not None:
        bad = ~((weights_np >= 0) & (weights_np <= 1))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"weight {float(weights_np[where])} at position {where} is outside [0, 1]: "
                "token weights are label trust gamma_t")


def check_loss_args(spec, labels, *, has_teacher: bool, teacher_hint: str, weights,
                    normalization: str, normalizations, normalizer, segment_ids) -> None:
    """The loss arguments beyond the arrays: spec needs met, normalisation known and complete.

    Args:
      spec: the TargetSpec. labels: [...] int (for the segment_ids shape check).
      has_teacher: whether a teacher was passed; teacher_hint: what to pass when it is missing.
      weights: [...] or None. normalization / normalizations: the choice and the known ones.
      normalizer: the "constant" normalisation's constant. segment_ids: [...] int or None.
    """
    if normalization not in normalizations:
        raise ValueError(f"normalization={normalization!r}; choose one of {normalizations}")
    if spec.needs_teacher and not has_teacher:
        raise ValueError(
            f"target {spec.name!r} needs {teacher_hint} (residual={spec.residual!r}, "
            f"eta={spec.eta}), but none were passed")
    if spec.needs_weights and weights is None:
        raise ValueError(f"target {spec.name!r} needs per-token `weights`, but none were passed")
    if normalization == "constant" and not (normalizer and normalizer > 0):
        raise ValueError(f"normalization='constant' needs normalizer > 0, got {normalizer}")
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(labels.shape):
        raise ValueError(
            f"Incorrect shapes: segment_ids {tuple(segment_ids.shape)} must equal labels "
            f"{tuple(labels.shape)}")


def check_teacher_tokenizer(student_vocab, teacher_vocab) -> None:
    """Raise unless two tokenizers map the same ids to the same token strings.

    Args:
      student_vocab: sequence of token strings indexed by id, or a {token: id} dict.
      teacher_vocab: the same for the teacher.
    """
    def as_list(vocab):
        if isinstance(vocab, dict):
            out = [None] * (max(vocab.values()) + 1 if vocab else 0)
            for token, idx in vocab.items():
                out[idx] = token
            return out
        return list(vocab)

    student, teacher = as_list(student_vocab), as_list(teacher_vocab)
    if len(student) != len(teacher):
        raise ValueError(
            f"teacher vocabulary has {len(teacher)} tokens, the student's {len(student)}: "
            "Q-targets with a teacher need the same tokenizer")
    for idx, (s, t) in enumerate(zip(student, teacher)):
        if s != t:
            raise ValueError(
                f"teacher and student tokenizers differ at id {idx}: teacher {t!r}, "
                f"student {s!r}")
