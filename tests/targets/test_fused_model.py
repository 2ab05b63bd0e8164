"""The fused loss wired the way the train step uses it: a tiny Decoder's hidden states and head.

Gradients with respect to every model parameter (tied embedding included, through both the
input embedding and the head) equal those of the logits path within 1e-5 relative, with a
frozen teacher Decoder for a teacher-reading target.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget_jax.models import Decoder, ModelConfig
from qtarget_jax.targets import fused_qtarget_loss_sums, get_preset, qtarget_loss_sums

CFG = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=32, tie_word_embeddings=True)


def _batch(b=2, t=9, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, size=(b, t + 1)).astype(np.int32)
    labels = tokens[:, 1:].copy()
    labels[0, :3] = -100  # a prompt
    return {"tokens": jnp.asarray(tokens[:, :-1]), "labels": jnp.asarray(labels),
            "loss_mask": jnp.asarray(labels != -100, jnp.float32),
            "positions": jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
            "segment_ids": jnp.ones((b, t), jnp.int32)}


def _losses(spec):
    """(logits path, fused path): loss_fn(model, batch, teacher) -> sums, as in train/step.py."""
    def forward(m, batch, **kw):
        return m(batch["tokens"], batch["positions"], batch["segment_ids"], **kw)

    def logits_path(model, batch, teacher):
        t_logits = jax.lax.stop_gradient(forward(teacher, batch))
        return qtarget_loss_sums(forward(model, batch), batch["labels"], batch["loss_mask"],
                                 spec, teacher_logits=t_logits)

    def fused_path(model, batch, teacher):
        hidden = forward(model, batch, return_hidden=True)
        t_hidden = jax.lax.stop_gradient(forward(teacher, batch, return_hidden=True))
        return fused_qtarget_loss_sums(
            hidden, model.lm_head_kernel().astype(hidden.dtype), batch["labels"],
            batch["loss_mask"], spec, teacher_hidden=t_hidden,
            teacher_lm_head=jax.lax.stop_gradient(teacher.lm_head_kernel()), chunk_size=8)
    return logits_path, fused_path


def test_decoder_param_grads_match_logits_path():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    teacher = Decoder(CFG, rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    batch = _batch()

    def run(params, t_params):
        out = []
        for loss_fn in _losses(get_preset("target_sft")):
            def objective(p):
                s, d, _ = loss_fn(nnx.merge(graphdef, p, rest), batch,
                                  nnx.merge(t_graphdef, t_params, t_rest))
                return s / d
            out.append(jax.value_and_grad(objective)(params))
        return out

    (l_ref, g_ref), (l_got, g_got) = jax.jit(run)(params, t_params)
    np.testing.assert_allclose(float(l_got), float(l_ref), rtol=1e-5)
    ref_leaves, got_leaves = jax.tree.leaves(g_ref), jax.tree.leaves(g_got)
    assert len(ref_leaves) == len(got_leaves) > 0
    for a, b in zip(got_leaves, ref_leaves):
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(scale, 1e-12), (a.shape, scale)
