"""The train step: (state, batch) -> (state, metrics), pure, jitted once with explicit shardings.

    for each microbatch m:  (S_m, N_m, sums_m), g_m = grad of S_m = sum_t H(Q_t, p_t) wrt params
    g = (sum_m g_m) / (sum_m N_m)      one division by the global token count (or sequence count)
    params, opt_state = optax(g)       clip -> AdamW with masked decay

so an accumulated step equals one step on the big batch. Q is constant (the loss owns that).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qtarget_jax.train.state import TrainState

# loss_fn(model, batch, teacher_model | None) -> (loss_sum f32[], denominator f32[], sums dict)
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]
DIAGNOSTICS = ("gamma", "p_y", "accuracy", "entropy", "kl_q_p")


def logits_loss(spec, normalization: str, normalizer: float | None = None) -> LossFn:
    """The Q-target loss on full logits [B, T, V]; teacher logits from the frozen teacher."""
    from qtarget_jax.targets import qtarget_loss_sums

    def loss_fn(model, batch, teacher):
        def forward(m):
            return m(batch["tokens"], batch["positions"], batch["segment_ids"])
        teacher_logits = None if teacher is None else jax.lax.stop_gradient(forward(teacher))
        return qtarget_loss_sums(forward(model), batch["labels"], batch["loss_mask"], spec,
                                 teacher_logits=teacher_logits, weights=batch.get("weights"),
                                 normalization=normalization, normalizer=normalizer)
    return loss_fn


def hidden_loss(spec, normalization: str, normalizer: float | None = None,
                sharding=None) -> LossFn:
    """The fused Q-target loss from final hidden states [B, T, D] and the head [D, V]: logits
    exist only chunk by chunk; the teacher's chunks come from its own hidden states and head."""
    from qtarget_jax.targets import fused_qtarget_loss_sums

    def loss_fn(model, batch, teacher):
        def hidden(m):
            return m(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
        h = hidden(model)
        kw = {} if teacher is None else {
            "teacher_hidden": jax.lax.stop_gradient(hidden(teacher)),
            "teacher_lm_head": jax.lax.stop_gradient(teacher.lm_head_kernel().astype(h.dtype))}
        return fused_qtarget_loss_sums(h, model.lm_head_kernel().astype(h.dtype), batch["labels"],
                                       batch["loss_mask"], spec, weights=batch.get("weights"),
                                       normalization=normalization, normalizer=normalizer,
                                       sharding=sharding, **kw)
    return loss_fn


def make_loss_fn(spec, normalization: str, *, fused: bool, mesh=None,
                 normalizer: float | None = None) -> LossFn:
    """The step's loss, chosen once: fused over hidden states (default) or on full logits."""
    if not fused:
        return logits_loss(spec, normalization, normalizer)
    from qtarget_jax.targets import ChunkSharding
    return hidden_loss(spec, normalization, normalizer,
                       None if mesh is None else ChunkSharding(mesh))


def split_microbatches(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, T] -> [n, B/n, T]; microbatch j takes rows j, n+j, 2n+j... so each device's rows stay
    on that device when its local batch is a multiple of n."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch dim {x.shape[0]} is not divisible by microbatches={n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return {k: split(v) for k, v in batch.items()}


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, graphdef, loss_fn: LossFn,
               tx: optax.GradientTransformation, schedule: optax.Schedule, microbatches: int,
               compute_dtype: Any, param_shardings: Any = None) -> tuple[TrainState, dict]:
    """One optimizer step over a global batch of [B, T] arrays (see module docstring)."""
    def micro_loss(params, mb):
        # Modules are merged inside the differentiated function: nnx refuses graph nodes
        # created at another trace level (the teacher is frozen: it gets no gradient).
        model = nnx.merge(graphdef, _cast(params, compute_dtype), state.rest)
        teacher = (None if state.teacher is None else
                   nnx.merge(graphdef, _cast(state.teacher, compute_dtype), state.rest))
        loss_sum, denom, sums = loss_fn(model, mb, teacher)
        return loss_sum, (denom, sums)

    def accumulate(carry, mb):
        grads_acc, totals = carry
        (loss_sum, (denom, sums)), grads = jax.value_and_grad(micro_loss, has_aux=True)(
            state.params, mb)
        new = {"loss_sum": loss_sum, "denominator": denom, **sums}
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        if param_shardings is not None:
            grads_acc = jax.lax.with_sharding_constraint(grads_acc, param_shardings)
        return (grads_acc, jax.tree.map(jnp.add, totals, new)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    abstract = jax.eval_shape(lambda p, mb: micro_loss(p, mb)[1], state.params,
                              jax.tree.map(lambda x: x[:x.shape[0] // microbatches], batch))
    totals0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                           {"loss_sum": abstract[0], "denominator": abstract[0], **abstract[1]})
    (grads, totals), _ = jax.lax.scan(accumulate, (zeros, totals0),
                                      split_microbatches(batch, microbatches))

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
    """jax.jit of `train_step` with explicit in/out shardings and the state donated."""
    step = functools.partial(train_step, param_shardings=shardings.params, **kwargs)
    return jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, rep_sharding), donate_argnums=(0,))
