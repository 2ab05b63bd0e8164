"""The train step: (state, batch) -> (state, metrics), pure, jitted once with explicit shardings.

    for each microbatch m:  (S_m, N_m, sums_m), g_m = grad of S_m = sum_t H(Q_t, p_t) wrt params
                            (LoRA dropout masks from fold_in(state.rng, m): new per microbatch)
    g = (sum_m g_m) / (sum_m N_m)      one division by the global token count (or sequence count)
    params, opt_state = optax(g)       clip -> AdamW with masked decay

so an accumulated step equals one step on the big batch. Q is constant (the loss owns that).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qtarget_jax.models.lora import BaseTeacher, seed_dropout
from qtarget_jax.train.state import TrainState

# loss_fn(model, batch, teacher_model | None) -> (loss_sum f32[], denominator f32[], sums dict)
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]
DIAGNOSTICS = ("gamma", "p_y", "accuracy", "entropy", "kl_q_p")


# Teacher logits of vocabulary padding rows (ids no tokenizer produces) are pushed to this value,
# so the teacher puts no probability on them.
PAD_LOGIT = -1e9


def _fit_columns(x: jax.Array, vocab: int, real_vocab: Optional[int]) -> jax.Array:
    """Last dim cut to `vocab`, or zero-padded to it when shorter (those ids must be padding:
    at or past `real_vocab`, masked by the caller)."""
    if x.shape[-1] >= vocab:
        return x[..., :vocab]
    if real_vocab is None or real_vocab > x.shape[-1]:
        raise ValueError(f"teacher head has {x.shape[-1]} rows, the student's {vocab}: the "
                         f"missing rows must be padding (real_vocab={real_vocab})")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, vocab - x.shape[-1])])


def teacher_logits_for(t_logits: jax.Array, vocab: int, real_vocab: Optional[int]) -> jax.Array:
    """Teacher logits [..., V_T] -> [..., V] aligned with the student's V head rows.

    Rows past V are padding (checked at start-up: the tokenizer has at most V tokens) and are
    dropped (a shorter teacher head is padded); ids in [real_vocab, V) are padding of the
    student's head, masked to PAD_LOGIT.
    """
    t_logits = _fit_columns(t_logits, vocab, real_vocab)
    if real_vocab is None or real_vocab >= vocab:
        return t_logits
    ids = jnp.arange(vocab)
    return jnp.where(ids < real_vocab, t_logits, jnp.asarray(PAD_LOGIT, t_logits.dtype))


def teacher_head_for(t_hidden: jax.Array, t_head: jax.Array, vocab: int,
                     real_vocab: Optional[int]) -> tuple[jax.Array, jax.Array]:
    """(teacher hidden [..., D_T], head [D_T, V_T]) -> inputs of the fused loss whose logits
    equal `teacher_logits_for(hidden @ head)`: columns past V are dropped; padding ids in
    [real_vocab, V) are masked by one extra constant feature (hidden [..., D_T + 1], head row
    0 for real ids and PAD_LOGIT for padding), so the mask costs one more row, not [.., V]."""
    t_head = _fit_columns(t_head, vocab, real_vocab)
    if real_vocab is None or real_vocab >= vocab:
        return t_hidden, t_head
    ones = jnp.ones(t_hidden.shape[:-1] + (1,), t_hidden.dtype)
    bias = jnp.where(jnp.arange(vocab) < real_vocab, 0.0, PAD_LOGIT).astype(t_head.dtype)
    return (jnp.concatenate([t_hidden, ones], -1),
            jnp.concatenate([t_head, bias[None, :]], 0))


def logits_loss(spec, normalization: str, normalizer: float | None = None,
                real_vocab: Optional[int] = None) -> LossFn:
    """The Q-target loss on full logits [B, T, V]; teacher logits from the frozen teacher
    (any architecture with V_T >= V head rows, see `teacher_logits_for`)."""
    from qtarget_jax.targets import qtarget_loss_sums

    def loss_fn(model, batch, teacher):
        def forward(m):
            return m(batch["tokens"], batch["positions"], batch["segment_ids"])
        logits = forward(model)
        teacher_logits = None if teacher is None else jax.lax.stop_gradient(
            teacher_logits_for(forward(teacher), logits.shape[-1], real_vocab))
        return qtarget_loss_sums(logits, batch["labels"], batch["loss_mask"], spec,
                                 teacher_logits=teacher_logits, weights=batch.get("weights"),
                                 normalization=normalization, normalizer=normalizer)
    return loss_fn


def hidden_loss(spec, normalization: str, normalizer: float | None = None,
                sharding=None, real_vocab: Optional[int] = None) -> LossFn:
    """The fused Q-target loss from final hidden states [B, T, D] and the head [D, V]: logits
    exist only chunk by chunk; the teacher's chunks come from its own hidden states
    [B, T, D_T] and head [D_T, V_T] (another width is fine), computed in this step.

    The heads go to the loss in their param dtype with `compute_dtype` = the hidden states'
    dtype: the loss casts them tile by tile for the matmuls and returns dW in the param dtype,
    so float32 master weights with bfloat16 compute get a float32 head (and tied embedding)
    gradient, accumulated in float32, never rounded to bfloat16.
    """
    from qtarget_jax.targets import fused_qtarget_loss_sums

    def loss_fn(model, batch, teacher):
        def hidden(m):
            return m(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
        h = hidden(model)
        head = model.lm_head_kernel()
        kw = {}
        if teacher is not None:
            t_h = jax.lax.stop_gradient(hidden(teacher))
            t_head = jax.lax.stop_gradient(teacher.lm_head_kernel())
            t_h, t_head = teacher_head_for(t_h, t_head, head.shape[-1], real_vocab)
            kw = {"teacher_hidden": t_h, "teacher_lm_head": t_head}
        return fused_qtarget_loss_sums(h, head, batch["labels"], batch["loss_mask"], spec,
                                       weights=batch.get("weights"),
                                       normalization=normalization, normalizer=normalizer,
                                       sharding=sharding, compute_dtype=h.dtype, **kw)
    return loss_fn


def make_loss_fn(spec, normalization: str, *, fused: bool, mesh=None,
                 normalizer: float | None = None, rules=None,
                 real_vocab: Optional[int] = None) -> LossFn:
    """The step's loss, chosen once: fused over hidden states (default) or on full logits.

    Args:
      rules: the logical-axis rules table (default LOGICAL_RULES) giving the fused loss's layout.
      real_vocab: the tokenizer's size when the head has padding rows past it (masked in the
        teacher's distribution); None: every head row is a real token.
    """
    from qtarget_jax.logical_axes import LOGICAL_RULES
    from qtarget_jax.targets import ChunkSharding
    if not fused:
        return logits_loss(spec, normalization, normalizer, real_vocab)
    sharding = None if mesh is None else ChunkSharding.from_rules(
        mesh, LOGICAL_RULES if rules is None else rules)
    return hidden_loss(spec, normalization, normalizer, sharding, real_vocab)


def split_microbatches(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, T] -> [n, B/n, T]; microbatch j takes rows j, n+j, 2n+j... so each device's rows stay
    on that device when its local batch is a multiple of n."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch dim {x.shape[0]} is not divisible by microbatches={n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return {k: split(v) for k, v in batch.items()}


def merge_models(state: TrainState, params: Any, *, graphdef, teacher_graphdef=None):
    """(student, teacher or None) Modules from `params` and the frozen state.

    The teacher's params pass through stop_gradient: it never receives a gradient. No cast
    happens here: params keep their param dtype and each layer casts a weight to its compute
    dtype where it uses it (ModelConfig.compute_dtype), once.
    """
    model = nnx.merge(graphdef, params, state.rest)
    if state.teacher is None:
        return model, None
    if isinstance(teacher_graphdef, BaseTeacher):  # a LoRA student's frozen base, no copy
        return model, teacher_graphdef.view(jax.lax.stop_gradient(state.rest))
    teacher = nnx.merge(teacher_graphdef if teacher_graphdef is not None else graphdef,
                        jax.lax.stop_gradient(state.teacher), state.teacher_rest)
    return model, teacher


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, graphdef, loss_fn: LossFn,
               tx: optax.GradientTransformation, schedule: optax.Schedule, microbatches: int,
               teacher_graphdef: Any = None,
               param_shardings: Any = None) -> tuple[TrainState, dict]:
    """One optimizer step over a global batch of [B, T] arrays (see module docstring).

    Only `state.params` are differentiated; the teacher's params are read, never updated.
    """
    def micro_loss(params, mb, index):
        # Modules are merged inside the differentiated function: nnx refuses graph nodes
        # created at another trace level.
        model, teacher = merge_models(state, params, graphdef=graphdef,
                                      teacher_graphdef=teacher_graphdef)
        # LoRA adapter dropout, in training only: a fresh mask per microbatch `index` i32[].
        seed_dropout(model, jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(state.rng), index)))
        loss_sum, denom, sums = loss_fn(model, mb, teacher)
        return loss_sum, (denom, sums)

    def accumulate(carry, indexed_mb):
        grads_acc, totals = carry
        index, mb = indexed_mb
        (loss_sum, (denom, sums)), grads = jax.value_and_grad(micro_loss, has_aux=True)(
            state.params, mb, index)
        new = {"loss_sum": loss_sum, "denominator": denom, **sums}
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        if param_shardings is not None:
            grads_acc = jax.lax.with_sharding_constraint(grads_acc, param_shardings)
        return (grads_acc, jax.tree.map(jnp.add, totals, new)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    abstract = jax.eval_shape(lambda p, mb: micro_loss(p, mb, 0)[1], state.params,
                              jax.tree.map(lambda x: x[:x.shape[0] // microbatches], batch))
    totals0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                           {"loss_sum": abstract[0], "denominator": abstract[0], **abstract[1]})
    indexed = (jnp.arange(microbatches), split_microbatches(batch, microbatches))
    (grads, totals), _ = jax.lax.scan(accumulate, (zeros, totals0), indexed)

    denom = jnp.maximum(totals["denominator"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    tokens = jnp.maximum(totals["tokens"], 1.0)
    metrics = {"loss": totals["loss_sum"] / denom, "tokens": totals["tokens"],
               "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
               **{f"q/{k}": totals[k] / tokens for k in DIAGNOSTICS if k in totals}}
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def jit_train_step(shardings: TrainState, batch_sharding, rep_sharding, **kwargs):
    """jax.jit of `train_step` with explicit in/out shardings and the state donated.

    kwargs: those of `train_step` (graphdef, teacher_graphdef, loss_fn, tx, schedule,
    microbatches).
    """
    step = functools.partial(train_step, param_shardings=shardings.params, **kwargs)
    return jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, rep_sharding), donate_argnums=(0,))


def eval_sums(state: TrainState, batch: Mapping[str, jax.Array], *, graphdef, loss_fn: LossFn,
              teacher_graphdef: Any = None) -> dict:
    """Summed loss and diagnostics over a [B, T] batch, no gradients: {"loss_sum" f32[],
    "denominator" f32[], "tokens" f32[], <diagnostic> f32[]}."""
    model, teacher = merge_models(state, state.params, graphdef=graphdef,
                                  teacher_graphdef=teacher_graphdef)
    loss_sum, denom, sums = loss_fn(model, batch, teacher)
    return {"loss_sum": loss_sum, "denominator": denom, **sums}


def make_eval_step(shardings: TrainState, batch_sharding, rep_sharding, **kwargs):
    """jax.jit of `eval_sums` with the train step's shardings (the state is not donated).

    kwargs: graphdef, teacher_graphdef, loss_fn (as `train_step`).
    """
    return jax.jit(functools.partial(eval_sums, **kwargs),
                   in_shardings=(shardings, batch_sharding), out_shardings=rep_sharding)
