"""The vocabulary-blocked fused Q-target loss: two passes over [Nb, Vb] tiles of the logits.

Pass 1 (forward) visits token blocks of Nb rows and, inside each, vocabulary blocks of Vb
columns: z = h_i @ W_j [Nb, Vb] (float32 accumulation, and the teacher's tile t likewise) only
updates per-row statistics (`row_stats`): online logsumexp, label logit, argmax, the residual's
sums or running top-k. From whole-row statistics come the per-token loss and diagnostics.

Pass 2 (the `custom_vjp` backward, when the incoming cotangent g is known) visits vocabulary
blocks j and, inside each, token blocks i: it recomputes z (and t), forms
dz = g w (loss_scale (p - Q) + 2 z_loss lse p) in closed form, adds dz W_j^T to the rows of a
float32 dh and h_i^T dz to a float32 [D, Vb] block of dW, which is cast to the gradient dtype
and written into dW once. No [N, V] array and no second [D, V] buffer exist at any time.

Blocks need no padding: the last block of each axis starts at N - Nb (V - Vb) and masks the
rows (columns) an earlier block already covered, so h and W are never copied whole. (The last
vocabulary block rewrites the dW columns it shares with the block before, with equal values.)

Matmuls: 1 (forward) + 3 (backward) [N, D] x [D, V]-sized products, plus the same for a
teacher given as hidden states + head (its logits are recomputed in the backward).

Vocab-parallel (`ChunkSharding` with a `vocab_axis`): each pass runs under `shard_map` on the
local rows (token axes) and the local columns of W (vocab axis); the partial row statistics are
combined with pmax / psum over the vocab axis, dh is summed over it, dW over the token axes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qtarget_jax.targets.losses import METRIC_NAMES
from qtarget_jax.targets.row_stats import (
    RowPlan, combine_stats, finish, init_stats, tile_grad, update_stats)

try:  # jax >= 0.6 exposes shard_map at the top level
    from jax import shard_map as _shard_map
    _SHARD_MAP_KW = {"check_vma": False}
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map
    _SHARD_MAP_KW = {"check_rep": False}


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static description of the two passes (hashable).

    Attributes:
      rows: the target's row statistics (`RowPlan`, with the global V).
      token_block: Nb, rows per tile (<= local rows).
      vocab_block: Vb, columns per tile (<= local columns).
      compute: dtype name of the matmul inputs (e.g. "bfloat16"); accumulation is float32.
      teacher_compute: dtype name of the teacher's matmul inputs; None = promote(teacher
        hidden, teacher head).
      stats: dtype name of the row math ("float32", or "float64" for float64 inputs).
      mesh, token_axes, vocab_axis: the sharding, or mesh None.
      vocab_pad: zero columns appended to W so that V divides over the vocab axis.
      slice_bits: slice 16-bit floats as uint16 (XLA CPU; see `_slice`).
    """
    rows: RowPlan
    token_block: int
    vocab_block: int
    compute: str
    stats: str = "float32"
    teacher_compute: Optional[str] = None
    mesh: Optional[object] = None
    token_axes: tuple[str, ...] = ()
    vocab_axis: Optional[str] = None
    vocab_pad: int = 0
    slice_bits: bool = False


def _as_bits(x, on):
    """16-bit floats as uint16 (a bitcast) when `on`, other arrays unchanged."""
    if on and jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _slice(plan, x, start, size, axis):
    """x[start:start + size] along `axis`.

    With plan.slice_bits (the CPU backend), 16-bit floats are sliced as uint16 bits: XLA's CPU
    backend upcasts a bfloat16 dynamic-slice to float32 and hoists that conversion of the whole
    of x (a [D, V] float32 copy of the head) out of the loop; the bitcast costs one 16-bit copy.
    """
    part = jax.lax.dynamic_slice_in_dim(_as_bits(x, plan.slice_bits), start, size, axis)
    return jax.lax.bitcast_convert_type(part, x.dtype) if part.dtype != x.dtype else part


def _write(plan, x, part, start, axis):
    """x with `part` written at `start` along `axis` (16-bit floats as bits, see _slice)."""
    bits = plan.slice_bits
    out = jax.lax.dynamic_update_slice_in_dim(_as_bits(x, bits), _as_bits(part.astype(x.dtype),
                                              bits), start, axis)
    return jax.lax.bitcast_convert_type(out, x.dtype) if out.dtype != x.dtype else out


def _block_start(b, block, total):
    """Start of block b: b * block, the last one moved back to end at `total`."""
    return jnp.minimum(b * block, total - block)


def _tiles(n, block):
    return -(-n // block)


def _teacher_tile(plan, teacher, r0, c0, nb, vb, tau):
    """Teacher logits / tau of rows [r0, r0 + nb) x local columns [c0, c0 + vb), or None."""
    if teacher is None:
        return None
    dtype = jnp.dtype(plan.stats)
    if "lm_head" in teacher:
        th = _slice(plan, teacher["hidden"], r0, nb, 0)
        tw = _slice(plan, teacher["lm_head"], c0, vb, 1)
        dt = (jnp.dtype(plan.teacher_compute) if plan.teacher_compute
              else jnp.promote_types(th.dtype, tw.dtype))
        t = jnp.dot(th.astype(dt), tw.astype(dt), preferred_element_type=dtype)
    else:
        logits = teacher["logits"]
        t = jax.lax.dynamic_slice(_as_bits(logits, plan.slice_bits), (r0, c0), (nb, vb))
        t = jax.lax.bitcast_convert_type(t, logits.dtype) if t.dtype != logits.dtype else t
        t = t.astype(dtype)
    return jax.lax.stop_gradient(t) / tau


def _column_ids(plan, j, v_local):
    """(local start c0, global ids [Vb], mask [Vb]) of vocabulary block j of this shard."""
    vb = plan.vocab_block
    c0 = _block_start(j, vb, v_local)
    local = c0 + jnp.arange(vb, dtype=jnp.int32)
    offset = 0
    if plan.vocab_axis is not None:
        offset = jax.lax.axis_index(plan.vocab_axis) * v_local
    cols = offset + local
    return c0, cols, (local >= j * vb) & (cols < plan.rows.vocab)


def _label_index(plan, labels):
    vocab = plan.rows.vocab
    return jnp.where((labels >= 0) & (labels < vocab), labels, -1).astype(jnp.int32)


def _pass1(plan: BlockPlan, h, lm_head, teacher, labels, valid, weights):
    """Local rows' (terms, saved) from the whole (possibly vocab-sharded) rows."""
    n, v_local = h.shape[0], lm_head.shape[1]
    nb, vb = plan.token_block, plan.vocab_block
    dtype, compute = jnp.dtype(plan.stats), jnp.dtype(plan.compute)
    tau = plan.rows.spec.teacher_temperature
    index = _label_index(plan, labels)

    def token_block(i, full):
        r0 = _block_start(i, nb, n)
        h_i = _slice(plan, h, r0, nb, 0).astype(compute)
        index_i = jax.lax.dynamic_slice_in_dim(index, r0, nb, 0)

        def vocab_block(j, st):
            c0, cols, colmask = _column_ids(plan, j, v_local)
            w_j = _slice(plan, lm_head, c0, vb, 1).astype(compute)
            z = jnp.dot(h_i, w_j, preferred_element_type=dtype)
            t = _teacher_tile(plan, teacher, r0, c0, nb, vb, tau)
            return update_stats(plan.rows, st, z, t, cols, colmask, index_i)

        st = jax.lax.fori_loop(0, _tiles(v_local, vb), vocab_block,
                               init_stats(plan.rows, nb, dtype))
        # Rows of an overlapping last block are recomputed and rewritten with the same values.
        return jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, r0, 0),
                            full, st)

    st = jax.lax.fori_loop(0, _tiles(n, nb), token_block, init_stats(plan.rows, n, dtype))
    st = combine_stats(plan.rows, st, plan.vocab_axis)
    return finish(plan.rows, st, labels, valid, weights)


def _pass2(plan: BlockPlan, saved, scale, h, lm_head, teacher, labels, valid):
    """(dh [n, D] float32, summed over the vocab axis; dW [D, V_local] in lm_head's dtype)."""
    n, v_local = h.shape[0], lm_head.shape[1]
    nb, vb = plan.token_block, plan.vocab_block
    dtype, compute = jnp.dtype(plan.stats), jnp.dtype(plan.compute)
    tau = plan.rows.spec.teacher_temperature
    index = _label_index(plan, labels)
    rows = {"saved": saved, "scale": scale, "index": index, "ok": valid}
    contract_v = (((1,), (1,)), ((), ()))  # dz [Nb, Vb] . W_j [D, Vb] over Vb

    def vocab_block(j, carry):
        dh, dw = carry
        c0, cols, colmask = _column_ids(plan, j, v_local)
        w_j = _slice(plan, lm_head, c0, vb, 1).astype(compute)

        def token_block(i, inner):
            dh, dw_j = inner
            r0 = _block_start(i, nb, n)
            h_i = _slice(plan, h, r0, nb, 0).astype(compute)
            r = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, r0, nb, 0), rows)
            fresh = r0 + jnp.arange(nb) >= i * nb  # rows no earlier token block covered
            z = jnp.dot(h_i, w_j, preferred_element_type=dtype)
            t = _teacher_tile(plan, teacher, r0, c0, nb, vb, tau)
            dz = tile_grad(plan.rows, r["saved"], z, t, cols, r["index"], r["scale"])
            # Rows an earlier token block covered, and rows that do not count, get no gradient.
            # Columns an earlier vocabulary block covered keep theirs for dW (this block
            # rewrites those dW columns with the same values) but not for dh (already added).
            dz = jnp.where((fresh & r["ok"] & (r["scale"] != 0))[:, None], dz, 0.0)
            dz_h = jnp.where(colmask[None, :], dz, 0.0).astype(compute)
            dz = dz.astype(compute)
            dh_i = jax.lax.dot_general(dz_h, w_j, contract_v, preferred_element_type=dtype)
            old = jax.lax.dynamic_slice_in_dim(dh, r0, nb, 0)
            dh = jax.lax.dynamic_update_slice_in_dim(dh, old + dh_i, r0, 0)
            # h_i^T as its own [D, Nb] buffer: a plain [D, Nb] x [Nb, Vb] product runs ~1.5x
            # faster on XLA CPU than the transposed-operand one XLA would fold it back into.
            h_t = jax.lax.optimization_barrier(h_i.T)
            dw_j = dw_j + jnp.dot(h_t, dz, preferred_element_type=dtype)
            return dh, dw_j

        dh, dw_j = jax.lax.fori_loop(0, _tiles(n, nb), token_block,
                                     (dh, jnp.zeros((h.shape[1], vb), dtype)))
        return dh, _write(plan, dw, dw_j, c0, 1)

    carry = (jnp.zeros(h.shape, dtype), jnp.zeros(lm_head.shape, lm_head.dtype))
    dh, dw = jax.lax.fori_loop(0, _tiles(v_local, vb), vocab_block, carry)
    if plan.vocab_axis is not None:
        dh = jax.lax.psum(dh, plan.vocab_axis)
    if plan.token_axes:
        dw = jax.lax.psum(dw, plan.token_axes)
    return dh, dw


def _specs(plan: BlockPlan, teacher):
    tok = plan.token_axes or None
    row, vocab = P(tok), P(None, plan.vocab_axis)
    teacher_spec = None
    if teacher is not None:
        teacher_spec = ({"hidden": P(tok, None), "lm_head": vocab} if "lm_head" in teacher
                        else {"logits": P(tok, plan.vocab_axis)})
    return row, P(tok, None), vocab, teacher_spec


def _sharded(plan: BlockPlan, fn, in_specs, out_specs):
    if plan.mesh is None:
        return fn
    return _shard_map(fn, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs,
                      **_SHARD_MAP_KW)


def _forward(plan, h, lm_head, teacher, rows):
    row, hid, vocab, t_spec = _specs(plan, teacher)
    fn = functools.partial(_pass1, plan)
    terms_spec = {name: row for name in ("loss",) + METRIC_NAMES}
    saved_spec = {"lse": row, "gamma": row, **{  # the residual's rows, as it declares them
        name: P(plan.token_axes or None, *[None] * (ndim - 1))
        for name, ndim in plan.rows.residual.saved_ndims(plan.rows).items()}}
    weights_spec = None if rows["weights"] is None else row
    fn = _sharded(plan, fn, (hid, vocab, t_spec, row, row, weights_spec),
                  (terms_spec, saved_spec))
    terms, saved = fn(h, lm_head, teacher, rows["labels"], rows["valid"], rows["weights"])
    valid, w = rows["valid"], rows["w"]
    loss_sum = jnp.sum(jnp.where(valid, w * terms["loss"], 0.0))
    sums = {name: jnp.sum(jnp.where(valid, terms[name], 0.0)) for name in METRIC_NAMES}
    return loss_sum, sums, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_sums(plan, h, lm_head, teacher, rows):
    loss_sum, sums, _ = _forward(plan, h, lm_head, teacher, rows)
    return loss_sum, sums


def _blocked_fwd(plan, h, lm_head, teacher, rows):
    loss_sum, sums, saved = _forward(plan, h, lm_head, teacher, rows)
    return (loss_sum, sums), (h, lm_head, teacher, rows, saved)


def _blocked_bwd(plan, res, cotangents):
    h, lm_head, teacher, rows, saved = res
    g = cotangents[0]  # the metric sums are stop-gradient diagnostics: their cotangent is dropped
    scale = jnp.where(rows["valid"], g * rows["w"], 0.0).astype(plan.stats)
    row, hid, vocab, t_spec = _specs(plan, teacher)
    saved_spec = jax.tree.map(lambda x: P(plan.token_axes or None, *([None] * (x.ndim - 1))),
                              saved)
    fn = _sharded(plan, functools.partial(_pass2, plan),
                  (saved_spec, row, hid, vocab, t_spec, row, row), (hid, vocab))
    dh, dw = fn(saved, scale, h, lm_head, teacher, rows["labels"], rows["valid"])
    return dh.astype(h.dtype), dw.astype(lm_head.dtype), None, None


_blocked_sums.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_loss_sums(plan: BlockPlan, h, lm_head, labels, valid, w, weights=None,
                      teacher=None):
    """sum_t w_t * loss_t and the masked sums of `METRIC_NAMES`, tile by tile.

    Args:
      plan: the static description (`BlockPlan`).
      h: [N, D] hidden states (any float dtype; N a multiple of the token shards when sharded).
      lm_head: [D, V (+ plan.vocab_pad)] head in the dtype its gradient should have.
      labels: [N] int; valid: [N] bool; w: [N] float loss weights; weights: [N] gamma weights
        or None.
      teacher: None, {"hidden": [N, Dt], "lm_head": [Dt, V (+pad)]} or {"logits": [N, V (+pad)]};
        never differentiated.

    Returns:
      (loss_sum, metric sums) as float32 scalars (float64 for float64 inputs), differentiable in
      h and lm_head through loss_sum; dh has h's dtype, dW lm_head's (float32 accumulation).
    """
    rows = {"labels": labels, "valid": valid, "w": w, "weights": weights}
    if teacher is not None:
        teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
    return _blocked_sums(plan, h, lm_head, teacher, rows)
