"""The token-chunk path of the fused Q-target loss (`path="token_chunks"`): any target, rows whole.

The default path for targets expressible as row statistics is `fused_blocks` (no [D, V]
accumulator); this one serves targets with user-registered rules that read whole rows.

Tokens are split into chunks of C rows. For each chunk the logits z = h_c @ W [C, V] are
computed (float32 accumulation), `per_token_qtarget` gives the per-token loss and diagnostics of
full vocabulary rows (so every target, top-k and user-registered rules included, is exact), and
the chunk's logits die before the next chunk starts. Peak extra memory is a few [C, V] buffers.

The result is a weighted sum S = sum_t w_t * loss_t, with per-token weights w [N] fixed in advance
(1 per supervised token, or 1 / |sequence| for sequence normalisation). Because w is known in the
forward pass, the gradient is computed there too (as Liger's fused linear cross-entropy does):
dS/dz_c = vjp of the chunk's loss with cotangent w_c, then dh_c = dz_c @ W^T and dW += h_c^T dz_c.
The `custom_vjp` backward only scales (dh, dW) by the incoming scalar cotangent, so a training
step does three [C, D] x [D, V]-sized matmuls per chunk, like an unfused loss, instead of four
(forward, recompute, two gradients). Called without differentiation, the loop computes no
gradients.

Layout: `chunk_rows` maps [N_pad, ...] to [n_chunks, C, ...] with chunk j holding rows
j, j + n_chunks, j + 2 n_chunks, ... so that, when rows are sharded over devices in contiguous
blocks, every chunk has rows on every device (no chunk lives on one device only).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qtarget_jax import logical_axes
from qtarget_jax.targets.losses import METRIC_NAMES, per_token_qtarget
from qtarget_jax.targets.spec import TargetSpec


@dataclasses.dataclass(frozen=True)
class ChunkSharding:
    """How one [C, V] logits chunk is laid out over a mesh (hashable: static under jit).

    Attributes:
      mesh: the device mesh.
      token_axes: mesh axes that shard the C token rows of a chunk; default the "batch" rule
        of `logical_axes.LOGICAL_RULES` (("data", "fsdp")).
      vocab_axis: mesh axis that shards the vocabulary (vocab-parallel head), or None; default
        the "vocab" rule ("tensor").
    """
    mesh: Mesh
    token_axes: tuple[str, ...] = logical_axes.token_axes()
    vocab_axis: Optional[str] = logical_axes.vocab_axis()

    @classmethod
    def from_rules(cls, mesh: Mesh, rules: logical_axes.Rules = logical_axes.LOGICAL_RULES
                   ) -> "ChunkSharding":
        """Token rows by the "batch" rule, the vocabulary by the "vocab" rule of `rules`."""
        return cls(mesh, token_axes=logical_axes.token_axes(rules),
                   vocab_axis=logical_axes.vocab_axis(rules))

    def __post_init__(self):
        names = self.token_axes + ((self.vocab_axis,) if self.vocab_axis else ())
        for name in names:
            if name not in self.mesh.shape:
                raise ValueError(
                    f"ChunkSharding: axis {name!r} is not a mesh axis; mesh axes: "
                    f"{self.mesh.axis_names}")

    def constrain(self, x: jax.Array, *spec) -> jax.Array:
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, PartitionSpec(*spec)))


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Static description of the loop (hashable)."""
    spec: TargetSpec
    n_chunks: int
    chunk: int
    sharding: Optional[ChunkSharding] = None
    grad_dtypes: tuple[str, str] = ("float32", "float32")  # dtypes of (h, lm_head)
    compute: Optional[str] = None  # matmul input dtype; None = promote(h, lm_head)
    teacher_compute: Optional[str] = None  # teacher's; None = promote(its hidden, its head)


def chunk_rows(x: jax.Array, n_chunks: int, chunk: int) -> jax.Array:
    """[n_chunks * C, ...] -> [n_chunks, C, ...]; chunk j holds rows j, j + n_chunks, ..."""
    return jnp.swapaxes(x.reshape(chunk, n_chunks, *x.shape[1:]), 0, 1)


def unchunk_rows(x: jax.Array) -> jax.Array:
    """Inverse of `chunk_rows`: [n_chunks, C, ...] -> [n_chunks * C, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _teacher_chunk(teacher, t_c, dtype, compute=None):
    """Teacher logits [C, V] of one chunk, stop-gradient, or None (matmul inputs in `compute`,
    None = their promoted dtype)."""
    if teacher is None:
        return None
    if "lm_head" in teacher:
        th, tw = t_c["hidden"], teacher["lm_head"]
        dt = jnp.dtype(compute) if compute else jnp.promote_types(th.dtype, tw.dtype)
        z = jnp.dot(th.astype(dt), tw.astype(dt), preferred_element_type=dtype)
    else:
        z = t_c["logits"]
    return jax.lax.stop_gradient(z)


def _loop(plan: ChunkPlan, with_grads: bool, h, lm_head, w, labels, valid, weights, teacher):
    """The chunk scan. Returns (loss_sum, metric_sums, dh [n, C, D] f32 | None, dW | None)."""
    dtype = jnp.promote_types(jnp.promote_types(h.dtype, lm_head.dtype), jnp.float32)
    compute = (jnp.dtype(plan.compute) if plan.compute  # matmul input dtype (bf16 stays bf16)
               else jnp.promote_types(h.dtype, lm_head.dtype))
    sh = plan.sharding
    tok = sh.token_axes if sh else None
    voc = sh.vocab_axis if sh else None
    head = lm_head.astype(compute)
    if sh:
        head = sh.constrain(head, None, voc)
    per_chunk = {"h": h, "w": w, "labels": labels, "valid": valid}
    if weights is not None:
        per_chunk["weights"] = weights
    if teacher is not None:
        per_chunk["teacher"] = {k: v for k, v in teacher.items() if k != "lm_head"}

    def body(carry, xs):
        h_c = xs["h"].astype(compute)
        z = jnp.dot(h_c, head, preferred_element_type=dtype)
        if sh:
            z = sh.constrain(z, tok, voc)
        t_logits = _teacher_chunk(teacher, xs.get("teacher"), dtype, plan.teacher_compute)
        if sh and t_logits is not None:
            t_logits = sh.constrain(t_logits, tok, voc)

        def loss_of(logits):
            terms = per_token_qtarget(logits, xs["labels"], plan.spec, teacher_logits=t_logits,
                                      weights=xs.get("weights"), valid=xs["valid"])
            return terms["loss"], terms

        valid_c, w_c = xs["valid"], xs["w"].astype(dtype)
        if with_grads:
            loss_c, vjp_fn, terms = jax.vjp(loss_of, z, has_aux=True)
            (dz,) = vjp_fn(jnp.where(valid_c, w_c, 0.0))
            # Masked rows get no gradient even where their (unused) loss is NaN.
            dz = jnp.where(valid_c[:, None], dz, 0.0).astype(compute)
            if sh:
                dz = sh.constrain(dz, tok, voc)
            dh_c = jnp.dot(dz, head.T, preferred_element_type=dtype)
            dw_c = jnp.dot(h_c.T, dz, preferred_element_type=dtype)
        else:
            loss_c, terms = loss_of(z)
            dh_c = dw_c = None
        sums = {"loss": jnp.sum(jnp.where(valid_c, w_c * loss_c, 0.0))}
        for name in METRIC_NAMES:
            sums[name] = jnp.sum(jnp.where(valid_c, terms[name], 0.0))
        new = jax.tree.map(jnp.add, carry["sums"], sums)
        out = {"sums": new}
        if with_grads:
            dw = carry["dw"] + dw_c
            out["dw"] = sh.constrain(dw, None, voc) if sh else dw
        return out, dh_c

    zero = jnp.zeros((), dtype)
    carry0 = {"sums": {name: zero for name in ("loss",) + METRIC_NAMES}}
    if with_grads:
        carry0["dw"] = jnp.zeros(lm_head.shape, dtype)
    carry, dh = jax.lax.scan(body, carry0, per_chunk)
    sums = carry["sums"]
    loss_sum = sums.pop("loss")
    return loss_sum, sums, dh, carry.get("dw")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_sums(plan, h, lm_head, w, labels, valid, weights, teacher):
    loss_sum, sums, _, _ = _loop(plan, False, h, lm_head, w, labels, valid, weights, teacher)
    return loss_sum, sums


def _weighted_sums_fwd(plan, h, lm_head, w, labels, valid, weights, teacher):
    loss_sum, sums, dh, dw = _loop(plan, True, h, lm_head, w, labels, valid, weights, teacher)
    return (loss_sum, sums), (dh, dw)


def _weighted_sums_bwd(plan, res, cotangents):
    dh, dw = res
    h_dtype, w_dtype = plan.grad_dtypes
    g = cotangents[0]  # the metric sums are stop-gradient diagnostics: their cotangent is dropped
    return ((g * dh).astype(h_dtype), (g * dw).astype(w_dtype), None, None, None, None, None)


_weighted_sums.defvjp(_weighted_sums_fwd, _weighted_sums_bwd)


def weighted_loss_sums(
    plan: ChunkPlan,
    h: jax.Array,
    lm_head: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    weights: Optional[jax.Array] = None,
    teacher: Optional[dict] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_t w_t * loss_t and the masked sums of `METRIC_NAMES`, chunk by chunk.

    Args:
      plan: the static loop description (spec, n_chunks, chunk size C, sharding).
      h: [n_chunks, C, D] hidden states (any float dtype), rows laid out by `chunk_rows`.
      lm_head: [D, V] output projection.
      w: [n_chunks, C] float per-token weights of the loss (0 at masked / padded rows).
      labels: [n_chunks, C] int token ids.
      valid: [n_chunks, C] bool, rows that count.
      weights: [n_chunks, C] per-token gamma weights, or None.
      teacher: None, {"hidden": [n_chunks, C, Dt], "lm_head": [Dt, V]} or
        {"logits": [n_chunks, C, V]}; never differentiated.

    Returns:
      (loss_sum f32[], metric sums dict[str, f32[]]) (float64 for float64 inputs). Differentiable
      in h and lm_head (through loss_sum only; the metrics are diagnostics).
    """
    return _weighted_sums(plan, h, lm_head, w, labels, valid, weights, teacher)
