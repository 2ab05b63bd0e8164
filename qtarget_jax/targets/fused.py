"""The fused Q-target loss: from hidden states and the LM head, never holding [N, V] logits.

    fused_qtarget_loss_sums(h, W, labels, mask, spec, ...) == qtarget_loss_sums(h @ W, labels,
                                                                                mask, spec, ...)

in value and in the gradients with respect to h and W, for every target. Two paths:

- "vocab_blocks" (`fused_blocks`, the default for every preset): [Nb, Vb] tiles of the logits,
  a forward pass that keeps per-row statistics only and a backward pass that forms the logits'
  gradient in closed form and writes each [D, Vb] block of dW once. Needs the target as row
  statistics (`row_stats`): built-in residuals, and gamma rules registered with
  `row_stats=True`.
- "token_chunks" (`fused_chunks`): [C, V] chunks of whole vocabulary rows through
  `per_token_qtarget`, so any user-registered rule is exact; it carries a float32 [D, V] dW
  accumulator. Taken when `path="token_chunks"` is passed, or, with a warning, when `path` is
  None and the target has a rule without row statistics (`fused_path(spec)` tells which).

This module checks inputs, turns the normalisation into per-token loss weights, and lays the
tokens out for the chosen path.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import jax
import jax.numpy as jnp

from qtarget_jax.targets import checks, row_stats
from qtarget_jax.targets.fused_blocks import BlockPlan, blocked_loss_sums
from qtarget_jax.targets.fused_chunks import (
    ChunkPlan, ChunkSharding, chunk_rows, weighted_loss_sums)
from qtarget_jax.targets.losses import (
    IGNORE_INDEX, METRIC_NAMES, NORMALIZATIONS, as_spec, safe_divide)
from qtarget_jax.targets.spec import TargetSpec

# Elements of one [C, V] logits chunk when chunk_size is None: 2**24 floats = 64 MiB in float32.
# A chunk's loss and gradient keep about three such float32 buffers alive (measured with
# memory_analysis, docs/performance.md); larger chunks amortise the per-chunk dW update.
DEFAULT_CHUNK_ELEMENTS = 2 ** 24

# Vocabulary-blocked path: columns per tile, and elements of one [Nb, Vb] tile (2**22 floats =
# 16 MiB in float32; pass 2 keeps about four such buffers alive).
DEFAULT_VOCAB_BLOCK = 2048
DEFAULT_TILE_ELEMENTS = 2 ** 22


def default_chunk_size(n_tokens: int, vocab: int, multiple: int = 8) -> int:
    """Tokens per chunk: at most DEFAULT_CHUNK_ELEMENTS // V, spread so padding stays small.

    The number of chunks is ceil(N / C_max); C is N / chunks rounded up to `multiple`, so the
    last chunk is nearly full (N = 256, C_max = 80 gives 4 chunks of 64, not 4 of 80).

    Args:
      n_tokens: N, the number of token rows.
      vocab: V.
      multiple: C is a multiple of this (the token-shard count under sharding).
    """
    c_max = max(multiple, DEFAULT_CHUNK_ELEMENTS // vocab // multiple * multiple)
    n_chunks = -(-max(n_tokens, 1) // c_max)
    per_chunk = -(-max(n_tokens, 1) // n_chunks)
    return -(-per_chunk // multiple) * multiple


def _check_shapes(hidden, lm_head, labels, teacher_hidden, teacher_lm_head, teacher_logits):
    """Trace-time shape/dtype checks; returns the abstract teacher logits (or None)."""
    if not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise TypeError(f"hidden must be floating, got dtype {hidden.dtype}")
    if hidden.ndim != labels.ndim + 1 or tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"Incorrect shapes: hidden {tuple(hidden.shape)} must be labels "
            f"{tuple(labels.shape)} + (D,)")
    if lm_head.ndim != 2 or lm_head.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"Incorrect shapes: lm_head {tuple(lm_head.shape)} must be (D, V) with "
            f"D = hidden.shape[-1] = {hidden.shape[-1]}")
    if not jnp.issubdtype(lm_head.dtype, jnp.floating):
        raise TypeError(f"lm_head must be floating, got dtype {lm_head.dtype}")
    if teacher_logits is not None and (teacher_hidden is not None or teacher_lm_head is not None):
        raise ValueError("pass the teacher either as teacher_logits or as teacher_hidden + "
                         "teacher_lm_head, not both")
    if (teacher_hidden is None) != (teacher_lm_head is None):
        raise ValueError(
            "teacher_hidden and teacher_lm_head go together: got "
            f"teacher_hidden={'set' if teacher_hidden is not None else None}, "
            f"teacher_lm_head={'set' if teacher_lm_head is not None else None}")
    if teacher_hidden is None:
        return teacher_logits
    if (teacher_hidden.ndim != labels.ndim + 1
            or tuple(teacher_hidden.shape[:-1]) != tuple(labels.shape)):
        raise ValueError(
            f"Incorrect shapes: teacher_hidden {tuple(teacher_hidden.shape)} must be labels "
            f"{tuple(labels.shape)} + (D_teacher,)")
    if teacher_lm_head.ndim != 2 or teacher_lm_head.shape[0] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"Incorrect shapes: teacher_lm_head {tuple(teacher_lm_head.shape)} must be "
            f"(D_teacher, V) with D_teacher = teacher_hidden.shape[-1] = "
            f"{teacher_hidden.shape[-1]}")
    dtype = jnp.promote_types(teacher_hidden.dtype, teacher_lm_head.dtype)
    return jax.ShapeDtypeStruct(tuple(labels.shape) + (teacher_lm_head.shape[1],), dtype)


def _token_weights(valid, normalization, normalizer, segment_ids, dtype):
    """Per-token loss weights w [...] and the denominator for a normalisation.

    token / constant: w = valid. sequence: w = valid / (tokens of the sequence), so that
    sum_t w_t loss_t is the sum over sequences of their mean token loss (as `qtarget_loss_sums`).
    """
    w = valid.astype(dtype)
    if normalization == "token":
        return w, jnp.sum(w)
    if normalization == "constant":
        rows = valid.size // valid.shape[-1] if valid.ndim else 1
        return w, jnp.asarray(normalizer * rows, dtype)
    flat_w = w.reshape(-1, w.shape[-1])
    rows, length = flat_w.shape
    if segment_ids is None:
        keys = jnp.repeat(jnp.arange(rows, dtype=jnp.int32), length)
        n = rows
    else:
        seg = segment_ids.reshape(flat_w.shape).astype(jnp.int32)
        keys = (jnp.arange(rows, dtype=jnp.int32)[:, None] * (length + 1) + seg).reshape(-1)
        n = rows * (length + 1)
    counts = jax.ops.segment_sum(flat_w.reshape(-1), keys, num_segments=n)
    per_token = counts[keys]
    w_seq = jnp.where(per_token > 0, flat_w.reshape(-1) / jnp.where(per_token > 0, per_token, 1),
                      0.0)
    return w_seq.reshape(w.shape), jnp.sum((counts > 0).astype(dtype))


PATHS = ("vocab_blocks", "token_chunks")


def fused_path(spec: Union[TargetSpec, str]) -> str:
    """The path `fused_qtarget_loss_sums` takes for `spec` when `path` is not given.

    "vocab_blocks" when the target is expressible as per-row statistics (every preset, and any
    spec whose gamma rule was registered with `row_stats=True` and whose residual is a built-in
    one); "token_chunks" otherwise (a user-registered residual rule needs whole [C, V] rows).
    """
    return "token_chunks" if row_stats.unsupported_reason(as_spec(spec)) else "vocab_blocks"


def default_blocks(n_tokens: int, vocab: int, multiple: int = 8) -> tuple[int, int]:
    """(Nb, Vb): tokens and vocabulary columns per tile of the vocabulary-blocked path.

    Vb = min(V, DEFAULT_VOCAB_BLOCK); Nb = min(N, DEFAULT_TILE_ELEMENTS // Vb) rounded to
    `multiple`. A tile's float32 buffers (logits, probabilities, gradient) stay near 16 MiB.
    """
    vb = min(vocab, DEFAULT_VOCAB_BLOCK)
    nb = max(multiple, DEFAULT_TILE_ELEMENTS // vb // multiple * multiple)
    return min(n_tokens, nb), vb


def _resolve_path(spec, path):
    reason = row_stats.unsupported_reason(spec)
    if path is None:
        if reason:
            warnings.warn(
                f"fused loss for target {spec.name!r}: {reason}, so it takes the token-chunk "
                "path (whole [C, V] rows, a float32 [D, V] gradient accumulator; "
                "docs/performance.md). Pass path='token_chunks' to choose it explicitly.",
                stacklevel=3)
            return "token_chunks"
        return "vocab_blocks"
    if path not in PATHS:
        raise ValueError(f"path={path!r}; choose one of {PATHS} (or None: `fused_path(spec)`)")
    if path == "vocab_blocks" and reason:
        raise ValueError(f"path='vocab_blocks' cannot evaluate target {spec.name!r}: {reason}; "
                         "use path='token_chunks'")
    return path


def fused_qtarget_loss_sums(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
    spec: Union[TargetSpec, str, None] = None,
    *,
    teacher_hidden: Optional[jax.Array] = None,
    teacher_lm_head: Optional[jax.Array] = None,
    teacher_logits: Optional[jax.Array] = None,
    weights: Optional[jax.Array] = None,
    normalization: str = "token",
    segment_ids: Optional[jax.Array] = None,
    normalizer: Optional[float] = None,
    chunk_size: Optional[int] = None,
    sharding: Optional[ChunkSharding] = None,
    vocab_block_size: Optional[int] = None,
    compute_dtype=None,
    path: Optional[str] = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """`qtarget_loss_sums(hidden @ lm_head, ...)` without materialising the logits.

    Args:
      hidden: [N, D] or [B, T, D] (any leading dims equal to labels') final hidden states, any
        float dtype; dh has this dtype.
      lm_head: [D, V] output projection (for a tied head: the embedding transposed). dW has this
        dtype: pass float32 master weights to get a float32 head gradient.
      labels: [N] or [B, T] int; -100 = not supervised.
      mask: like labels, 0/1, or None = every position with a label.
      spec: TargetSpec or preset name.
      teacher_hidden: [..., D_teacher] teacher hidden states, with teacher_lm_head [D_teacher, V]:
        the teacher logits are computed tile by tile, never whole. No gradient reaches them.
      teacher_lm_head: see teacher_hidden.
      teacher_logits: [..., V] teacher logits (alternative to teacher_hidden; read per tile).
      weights: like labels, in [0, 1], when spec.needs_weights.
      normalization, segment_ids, normalizer: as `qtarget_loss_sums`.
      chunk_size: tokens per tile (Nb) / per chunk (C); None = `default_blocks` /
        `default_chunk_size`. N need not be a multiple.
      sharding: optional `ChunkSharding` (mesh, token axes, vocab axis); hidden and lm_head may
        be sharded on any axes.
      vocab_block_size: Vb, vocabulary columns per tile of the "vocab_blocks" path; None =
        `default_blocks`. V need not be a multiple.
      compute_dtype: dtype of the matmul inputs, student's and teacher's (e.g. jnp.bfloat16
        with a float32 lm_head: cast tile by tile); None = promote(hidden.dtype, lm_head.dtype)
        for the student, promote of the teacher's two for the teacher. Accumulation is always
        float32.
      path: "vocab_blocks" (two passes over [Nb, Vb] tiles, closed-form gradient),
        "token_chunks" (whole [C, V] rows, any user rule) or None = `fused_path(spec)`, with a
        warning when that is "token_chunks".

    Returns:
      (loss_sum f32[], denominator f32[], metric_sums), exactly as `qtarget_loss_sums`.
    """
    if spec is None:
        raise ValueError("fused_qtarget_loss_sums needs a spec (a TargetSpec or a preset name)")
    spec = as_spec(spec)
    checks.check_loss_args(
        spec, labels, has_teacher=teacher_hidden is not None or teacher_logits is not None,
        teacher_hint="a teacher: teacher_hidden + teacher_lm_head, or teacher_logits",
        weights=weights, normalization=normalization, normalizations=NORMALIZATIONS,
        normalizer=normalizer, segment_ids=segment_ids)
    abstract_teacher = _check_shapes(hidden, lm_head, labels, teacher_hidden, teacher_lm_head,
                                     teacher_logits)
    vocab = lm_head.shape[1]
    dtype = jnp.promote_types(jnp.promote_types(hidden.dtype, lm_head.dtype), jnp.float32)
    checks.check_inputs(jax.ShapeDtypeStruct(tuple(labels.shape) + (vocab,), dtype), labels,
                        mask, abstract_teacher, weights)
    for name, value in (("chunk_size", chunk_size), ("vocab_block_size", vocab_block_size)):
        if value is not None and (int(value) != value or value < 1):
            raise ValueError(f"{name}={value} must be a positive integer")
    compute = (jnp.dtype(compute_dtype) if compute_dtype is not None
               else jnp.promote_types(hidden.dtype, lm_head.dtype))
    if not jnp.issubdtype(compute, jnp.floating):
        raise TypeError(f"compute_dtype must be floating, got {compute}")
    t_compute = compute.name if compute_dtype is not None else None
    path = _resolve_path(spec, path)

    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask > 0)
    w, denominator = _token_weights(valid, normalization, normalizer, segment_ids, dtype)
    n_tokens = math.prod(labels.shape)

    if path == "vocab_blocks":
        loss_sum, sums = _vocab_blocks(
            spec, hidden, lm_head, labels, valid, w, weights, teacher_hidden, teacher_lm_head,
            teacher_logits, chunk_size, vocab_block_size, sharding, compute, dtype, t_compute)
        sums["tokens"] = jnp.sum(valid.astype(dtype))
        return loss_sum, denominator.astype(dtype), sums

    shards = (math.prod(sharding.mesh.shape[a] for a in sharding.token_axes)
              if sharding else 1)
    chunk = int(chunk_size) if chunk_size else default_chunk_size(n_tokens, vocab,
                                                                  math.lcm(8, shards))
    n_chunks = max(1, -(-n_tokens // chunk))

    def rows(x, fill):
        flat = x.reshape(n_tokens, *x.shape[labels.ndim:])
        pad = n_chunks * chunk - n_tokens
        widths = [(0, pad)] + [(0, 0)] * (flat.ndim - 1)
        return chunk_rows(jnp.pad(flat, widths, constant_values=fill), n_chunks, chunk)

    teacher = None
    if teacher_hidden is not None:
        teacher = {"hidden": rows(jax.lax.stop_gradient(teacher_hidden), 0),
                   "lm_head": jax.lax.stop_gradient(teacher_lm_head)}
    elif teacher_logits is not None:
        teacher = {"logits": rows(jax.lax.stop_gradient(teacher_logits), 0)}
    plan = ChunkPlan(spec=spec, n_chunks=n_chunks, chunk=chunk, sharding=sharding,
                     grad_dtypes=(jnp.dtype(hidden.dtype).name, jnp.dtype(lm_head.dtype).name),
                     compute=compute.name, teacher_compute=t_compute)
    loss_sum, sums = weighted_loss_sums(
        plan, rows(hidden, 0), lm_head, rows(w, 0), rows(labels, IGNORE_INDEX),
        rows(valid, False), None if weights is None else rows(weights, 0), teacher)
    sums["tokens"] = jnp.sum(valid.astype(dtype))
    return loss_sum, denominator.astype(dtype), sums


def _vocab_blocks(spec, hidden, lm_head, labels, valid, w, weights, teacher_hidden,
                  teacher_lm_head, teacher_logits, chunk_size, vocab_block_size, sharding,
                  compute, dtype, t_compute):
    """Flatten the rows, pad them (and V) only as far as the sharding needs, run the passes."""
    n_tokens, vocab = math.prod(labels.shape), lm_head.shape[1]
    token_shards, vocab_shards, mesh, token_axes, vocab_axis = 1, 1, None, (), None
    if sharding is not None:
        mesh, token_axes, vocab_axis = sharding.mesh, tuple(sharding.token_axes), \
            sharding.vocab_axis
        token_shards = math.prod(mesh.shape[a] for a in token_axes)
        vocab_shards = mesh.shape[vocab_axis] if vocab_axis else 1
    row_pad = -n_tokens % token_shards
    vocab_pad = -vocab % vocab_shards

    def rows(x, fill=0):
        flat = x.reshape(n_tokens, *x.shape[labels.ndim:])
        if not row_pad:
            return flat
        return jnp.pad(flat, [(0, row_pad)] + [(0, 0)] * (flat.ndim - 1), constant_values=fill)

    def cols(x):
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, vocab_pad)]) if vocab_pad else x

    teacher = None
    if teacher_hidden is not None:
        teacher = {"hidden": rows(teacher_hidden), "lm_head": cols(teacher_lm_head)}
    elif teacher_logits is not None:
        teacher = {"logits": cols(rows(teacher_logits))}
    n_local = (n_tokens + row_pad) // token_shards
    v_local = (vocab + vocab_pad) // vocab_shards
    nb, vb = default_blocks(n_local, v_local)
    if chunk_size:
        nb = min(int(chunk_size), n_local)
    if vocab_block_size:
        vb = min(int(vocab_block_size), v_local)
    platform = (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
    plan = BlockPlan(rows=row_stats.RowPlan(spec, vocab), token_block=nb, vocab_block=vb,
                     compute=compute.name, stats=jnp.dtype(dtype).name, mesh=mesh,
                     teacher_compute=t_compute,
                     token_axes=token_axes, vocab_axis=vocab_axis, vocab_pad=vocab_pad,
                     slice_bits=platform == "cpu")
    head = cols(lm_head)
    loss_sum, sums = blocked_loss_sums(
        plan, rows(hidden), head, rows(labels, IGNORE_INDEX), rows(valid, False), rows(w),
        None if weights is None else rows(weights), teacher)
    return loss_sum, sums


def fused_qtarget_loss(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
    spec: Union[TargetSpec, str, None] = None,
    **kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`qtarget_loss(hidden @ lm_head, ...)` without materialising the logits.

    Args: as `fused_qtarget_loss_sums` (hidden [B, T, D] | [N, D], lm_head [D, V], labels).

    Returns:
      (loss f32[], metrics): the token means of `METRIC_NAMES`, `tokens` and `loss`; an
      all-masked batch gives loss 0 and zero gradients.
    """
    loss_sum, denominator, sums = fused_qtarget_loss_sums(hidden, lm_head, labels, mask, spec,
                                                          **kwargs)
    loss = safe_divide(loss_sum, denominator)
    metrics = {name: safe_divide(sums[name], sums["tokens"]) for name in METRIC_NAMES}
    metrics["tokens"] = sums["tokens"]
    metrics["loss"] = loss
    return loss, metrics
