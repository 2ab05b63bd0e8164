"""A tiny stand-in LM with logical axis names, an independent CE loss and random batches."""
import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

RULES = {"vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "batch": ("data", "fsdp")}
V, D, F = 32, 16, 32


class TinyLM(nnx.Module):
    """Embedding -> RMS-scaled MLP -> tied head; called like the Decoder (tokens, ...).

    Params are float32; like the Decoder's layers, each is cast to `compute_dtype` where used.
    """

    def __init__(self, *, rngs: nnx.Rngs, compute_dtype=jnp.float32):
        init = nnx.initializers.normal(0.5)

        def param(value, axes):
            return nnx.Param(value, out_sharding=axes, eager_sharding=False)
        self.embed = param(init(rngs.params(), (V, D)), ("vocab", "embed"))
        self.norm = param(jnp.ones((D,)), ("embed",))
        self.w1 = param(init(rngs.params(), (D, F)), ("embed", "mlp"))
        self.b1 = param(jnp.zeros((F,)), ("mlp",))
        self.w2 = param(init(rngs.params(), (F, D)), ("mlp", "embed"))
        self.compute_dtype = compute_dtype

    def __call__(self, tokens, positions=None, segment_ids=None):
        embed, norm, w1, b1, w2 = (v[...].astype(self.compute_dtype) for v in (
            self.embed, self.norm, self.w1, self.b1, self.w2))
        x = embed[tokens] * norm[None, None, :]
        x = x + jnp.tanh(x @ w1 + b1[None, None, :]) @ w2
        return x @ embed.T


def ce_loss(model, batch, teacher):
    """Independent CE stand-in with the qtarget_loss_sums contract (token normalisation)."""
    logits = model(batch["tokens"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    labels = jnp.maximum(batch["labels"], 0)
    nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    p_y = jnp.exp(-nll)
    sums = {"p_y": (p_y * mask).sum(), "tokens": mask.sum()}
    return (nll * mask).sum(), mask.sum(), sums


def make_batch(seed: int, b: int = 8, t: int = 12) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (b, t)).astype(np.int32)
    labels = np.roll(tokens, -1, axis=1)
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    labels = np.where(mask > 0, labels, -100).astype(np.int32)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask,
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, t), np.int32)}
